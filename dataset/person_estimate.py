"""Person mask and keypoints for real pictures: the estimator Stage I sees at inference, and in training.

The model is MediaPipe 0.10.21's holistic graph (BlazePose detector + full landmark model with its
person segmentation, the hand landmark model on each wrist, face mesh), whose weights ship inside its
wheel: nothing is downloaded at run time. MediaPipe's pins clash with the project's (``protobuf<5``
against ``tensorboard``'s ``protobuf>=6.31``), so it runs in a virtual environment of its own
(:func:`setup_estimator_venv`, ``serialgen estimator setup`` or ``make estimator``) as a worker
process (:mod:`serialgen.dataset.mediapipe_worker`) that :class:`MediaPipeEstimator` talks to over a
pipe. Where the venv lies: ``$SERIALGEN_ESTIMATOR_VENV``, else :data:`DEFAULT_VENV` (one per
machine, shared by every checkout); ``$SERIALGEN_ESTIMATOR_PYTHON`` names a ready interpreter instead.

What comes back (:class:`PersonEstimate`), in the picture's pixels: a person-probability map, the 66
canonical keypoints (``KEYPOINT_NAMES``: OpenPose-18 body, 6 foot points, 2 x 21 hand points) mapped
from BlazePose's 33 landmarks and the two 21-point hands (:data:`BLAZEPOSE_OF_CANONICAL`; the small
toes have no BlazePose landmark and stay invisible; docs/estimator.md), per-keypoint scores, a
confidence, the number of people (faces found by the full-range face detector) and the person's box.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serialgen.assets_manifest.skeleton import KEYPOINT_NAMES
from serialgen.dataset.mediapipe_worker import read_frame, write_frame
from serialgen.dataset.posemap import Pose, draw_pose_map
from serialgen.errors import SerialgenError, UserInputError

__all__ = [
    "MEDIAPIPE_VERSION",
    "ESTIMATOR_REQUIREMENTS",
    "DEFAULT_VENV",
    "BLAZEPOSE_OF_CANONICAL",
    "EstimatorUnavailable",
    "EstimatorFailed",
    "PersonEstimate",
    "MediaPipeEstimator",
    "estimator_python",
    "setup_estimator_venv",
    "landmarks_to_pose",
    "mask_iou",
    "pck",
]

MEDIAPIPE_VERSION = "0.10.21"
# The whole estimator environment, pinned as pip resolved it for mediapipe==0.10.21 on CPython 3.11
# (Linux x86_64): a full, conflict-free resolve, so the environment is the same on every machine.
# jax/jaxlib, sentencepiece and sounddevice are never imported by the vision graphs but are
# mediapipe's declared requirements; leaving them out would be an environment pip calls broken.
ESTIMATOR_REQUIREMENTS = (
    f"mediapipe=={MEDIAPIPE_VERSION}", "protobuf==4.25.9", "numpy==1.26.4", "opencv-contrib-python==4.11.0.86",
    "matplotlib==3.11.2", "absl-py==2.5.1", "attrs==26.1.0", "flatbuffers==25.12.19", "jax==0.7.1",
    "jaxlib==0.7.1", "ml_dtypes==0.5.4", "opt_einsum==3.4.0", "scipy==1.17.1", "sentencepiece==0.2.3",
    "sounddevice==0.5.6", "cffi==2.1.1", "pycparser==3.12", "contourpy==1.3.3", "cycler==0.12.1",
    "fonttools==4.68.0", "kiwisolver==1.5.1", "packaging==26.4", "pillow==13.0.0", "pyparsing==3.3.3",
    "python-dateutil==4.0.0", "tzdata==2026.6",
)
_REQUIREMENTS_DIGEST = hashlib.sha256("\n".join(ESTIMATOR_REQUIREMENTS).encode()).hexdigest()[:12]
DEFAULT_VENV = Path("~/.cache/serialgen").expanduser() / f"estimator-mediapipe-{MEDIAPIPE_VERSION}"
_STAMP = ".serialgen-estimator"  # written last by setup: its content is the requirements digest
_WORKER = Path(__file__).with_name("mediapipe_worker.py")
SETUP_HINT = "run `serialgen estimator setup` once (about a minute, ~1 GB from PyPI)"

# BlazePose's 33 landmarks by name (MediaPipe's PoseLandmark order).
_BP = {name: i for i, name in enumerate([
    "nose", "left_eye_inner", "left_eye", "left_eye_outer", "right_eye_inner", "right_eye", "right_eye_outer",
    "left_ear", "right_ear", "mouth_left", "mouth_right", "left_shoulder", "right_shoulder", "left_elbow",
    "right_elbow", "left_wrist", "right_wrist", "left_pinky", "right_pinky", "left_index", "right_index",
    "left_thumb", "right_thumb", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
    "left_heel", "right_heel", "left_foot_index", "right_foot_index"])}
# Canonical keypoint -> BlazePose landmark (a tuple: the mean of several). Absent names have none.
BLAZEPOSE_OF_CANONICAL: dict[str, str | tuple[str, ...]] = {
    "nose": "nose", "neck": ("left_shoulder", "right_shoulder"),
    "r_shoulder": "right_shoulder", "r_elbow": "right_elbow", "r_wrist": "right_wrist",
    "l_shoulder": "left_shoulder", "l_elbow": "left_elbow", "l_wrist": "left_wrist",
    "r_hip": "right_hip", "r_knee": "right_knee", "r_ankle": "right_ankle",
    "l_hip": "left_hip", "l_knee": "left_knee", "l_ankle": "left_ankle",
    "r_eye": "right_eye", "l_eye": "left_eye", "r_ear": "right_ear", "l_ear": "left_ear",
    "l_big_toe": "left_foot_index", "l_heel": "left_heel", "r_big_toe": "right_foot_index", "r_heel": "right_heel",
}
_N = len(KEYPOINT_NAMES)
_HAND_START = {"left": KEYPOINT_NAMES.index("l_hand_root"), "right": KEYPOINT_NAMES.index("r_hand_root")}


class EstimatorUnavailable(UserInputError):
    """The estimator environment is missing or broken (one line saying how to set it up)."""


class EstimatorFailed(SerialgenError):
    """The worker died or answered out of step (one line, with the end of its log)."""


# ----------------------------------------------------------------------------------------- environment

def _venv_dir(venv: str | Path | None) -> Path:
    if venv is not None:
        return Path(venv).expanduser()
    env = os.environ.get("SERIALGEN_ESTIMATOR_VENV")
    return Path(env).expanduser() if env else DEFAULT_VENV


def estimator_python(venv: str | Path | None = None) -> Path | None:
    """The interpreter that runs the worker, or None when no estimator environment is ready.

    ``$SERIALGEN_ESTIMATOR_PYTHON`` wins (a Python with mediapipe==0.10.21, taken as is); otherwise
    the venv (argument, ``$SERIALGEN_ESTIMATOR_VENV`` or :data:`DEFAULT_VENV`) counts only when its
    setup finished with the current requirements (its stamp).
    """
    if venv is None and os.environ.get("SERIALGEN_ESTIMATOR_PYTHON"):
        return Path(os.environ["SERIALGEN_ESTIMATOR_PYTHON"])
    root = _venv_dir(venv)
    python = root / "bin" / "python"
    try:
        stamp = (root / _STAMP).read_text().strip()
    except OSError:
        return None
    return python if stamp == _REQUIREMENTS_DIGEST and python.exists() else None


def setup_estimator_venv(venv: str | Path | None = None, *, python: str | None = None, log=None) -> Path:
    """Create (or repair) the estimator venv with :data:`ESTIMATOR_REQUIREMENTS`; returns its python.

    Idempotent and safe to call from several processes at once (a file lock; the stamp is written
    last, so an interrupted setup is redone). ``python``: the CPython 3.11 to base it on (default:
    this interpreter's base). Needs PyPI (or a pip configured to reach a mirror).
    """
    root = _venv_dir(venv)
    root.parent.mkdir(parents=True, exist_ok=True)
    say = log or (lambda msg: None)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ready = estimator_python(root)
        if ready is not None:
            return ready
        base = python or getattr(sys, "_base_executable", None) or sys.executable
        t0 = time.perf_counter()
        if root.exists():
            subprocess.run(["rm", "-rf", str(root)], check=True)
        say(f"estimator: creating {root} (mediapipe=={MEDIAPIPE_VERSION} and its pinned requirements)")
        try:
            subprocess.run([base, "-m", "venv", str(root)], check=True, capture_output=True, text=True)
            subprocess.run([str(root / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
                            "-q", *ESTIMATOR_REQUIREMENTS], check=True, capture_output=True, text=True)
            probe = subprocess.run([str(root / "bin" / "python"), "-c", "import mediapipe; print(mediapipe.__version__)"],
                                   check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError as exc:
            tail = (exc.stderr or exc.stdout or "").strip().splitlines()[-1:] or ["no output"]
            raise EstimatorUnavailable(f"estimator setup in {root} failed: {' '.join(map(str, exc.cmd[:4]))}...: "
                                       f"{tail[0][:300]}") from None
        if probe.stdout.strip() != MEDIAPIPE_VERSION:
            raise EstimatorUnavailable(f"estimator setup in {root}: mediapipe {probe.stdout.strip()} installed, "
                                       f"expected {MEDIAPIPE_VERSION}")
        (root / _STAMP).write_text(_REQUIREMENTS_DIGEST + "\n")
        say(f"estimator: ready in {time.perf_counter() - t0:.0f} s ({root})")
        return root / "bin" / "python"


# ----------------------------------------------------------------------------------------- results

@dataclass
class PersonEstimate:
    """One picture's estimate, in its own pixels.

    person: a person was found. probability: (H, W) uint8 person probability (0..255), None when no
    person. pose: canonical keypoints (`dataset.posemap.Pose`, no face-mesh points: the training
    maps draw none). scores: (66,) per-keypoint confidence in [0, 1] (0 where the keypoint has no
    landmark). confidence: mean BlazePose visibility of the OpenPose-18 points inside the
    picture (0 without a person). people: faces found (at least 1 when a person was found). box: (x0, y0, x1, y1) of the
    person mask and its visible keypoints, or None.
    """

    size: tuple[int, int]
    person: bool
    probability: np.ndarray | None
    pose: Pose
    scores: np.ndarray
    confidence: float
    people: int
    box: tuple[float, float, float, float] | None

    def foreground(self, threshold: int = 128) -> np.ndarray:
        """(H, W) bool person mask (all False without a person)."""
        w, h = self.size
        if self.probability is None:
            return np.zeros((h, w), bool)
        return self.probability >= threshold

    def background_mask(self) -> np.ndarray:
        """(H, W) float32, 1 = background: the Stage I mask convention."""
        return (~self.foreground()).astype(np.float32)

    def pose_map(self) -> np.ndarray:
        """(H, W, 3) uint8 pose map, drawn as the training loader draws exact keypoints."""
        return draw_pose_map(self.pose, self.size)

    def height_fraction(self) -> float:
        """The person's box height over the picture height (0 without a person)."""
        return 0.0 if self.box is None else (self.box[3] - self.box[1]) / self.size[1]

    def placed(self, transform: tuple[float, float, float, float], size: tuple[int, int]) -> "PersonEstimate":
        """This estimate in another frame (x' = sx x + tx, y' = sy y + ty, canvas ``size``): how a
        picture estimated at its own resolution is handed to a model that letterboxes it."""
        from PIL import Image

        sx, sy, tx, ty = transform
        probability = None
        if self.probability is not None:
            # PIL's AFFINE maps output pixels to input ones: x = (x' - tx) / sx; outside the picture: 0.
            probability = np.asarray(Image.fromarray(self.probability, "L").transform(
                tuple(size), Image.Transform.AFFINE, (1 / sx, 0, -tx / sx, 0, 1 / sy, -ty / sy),
                resample=Image.Resampling.BILINEAR, fillcolor=0))
        box = None if self.box is None else (self.box[0] * sx + tx, self.box[1] * sy + ty,
                                             self.box[2] * sx + tx, self.box[3] * sy + ty)
        return PersonEstimate(tuple(size), self.person, probability, self.pose.transformed(sx, sy, tx, ty, tuple(size)),
                              self.scores, self.confidence, self.people, box)

    def pose_record(self, source: str) -> dict:
        """The ``est_pose.json`` record: the ``*_pose.json`` format plus scores and the estimate's summary."""
        w, h = self.size
        return {
            "width": w, "height": h, "names": list(KEYPOINT_NAMES),
            "keypoints": [[round(float(x), 2), round(float(y), 2), int(v)] for (x, y), v in
                          zip(np.where(self.pose.visible[:, None], self.pose.xy, 0.0), self.pose.visible)],
            "scores": [round(float(s), 3) for s in self.scores],
            "person": self.person, "confidence": round(float(self.confidence), 4), "people": int(self.people),
            "box": None if self.box is None else [round(float(v), 1) for v in self.box],
            "source": source,
        }


def landmarks_to_pose(pose: list | None, left_hand: list | None, right_hand: list | None, size: tuple[int, int],
                      visibility: float = 0.5) -> tuple[Pose, np.ndarray]:
    """The worker's landmarks (pixels) -> (canonical `Pose`, (66,) scores).

    A body point is visible when its BlazePose visibility is >= ``visibility`` and it lies inside the
    picture; a mean of landmarks (the neck) needs all of them. Hand points (no per-point score from
    MediaPipe) get the score 1 and are visible inside the picture when the hand was found.
    """
    w, h = size
    xy = np.zeros((_N, 2), np.float32)
    scores = np.zeros(_N, np.float32)
    if pose is not None:
        lm = np.asarray(pose, np.float32)  # (33, 5): x, y, z, visibility, presence
        for i, name in enumerate(KEYPOINT_NAMES):
            src = BLAZEPOSE_OF_CANONICAL.get(name)
            if src is None:
                continue
            rows = [_BP[s] for s in ((src,) if isinstance(src, str) else src)]
            xy[i] = lm[rows, :2].mean(0)
            scores[i] = lm[rows, 3].min()
    for side, hand in (("left", left_hand), ("right", right_hand)):
        if hand is not None:
            start = _HAND_START[side]
            xy[start:start + 21] = np.asarray(hand, np.float32)[:, :2]
            scores[start:start + 21] = 1.0
    inside = (xy[:, 0] >= 0) & (xy[:, 0] < w) & (xy[:, 1] >= 0) & (xy[:, 1] < h)
    visible = (scores >= visibility) & (scores > 0) & inside
    return Pose(xy, visible, (int(w), int(h)), np.zeros((0, 2), np.float32)), scores


def _estimate_from_response(header: dict, payload: bytes, size: tuple[int, int], visibility: float,
                            face_ratio: float) -> PersonEstimate:
    w, h = size
    pose, scores = landmarks_to_pose(header.get("pose"), header.get("left_hand"), header.get("right_hand"), size,
                                     visibility)
    person = header.get("pose") is not None
    probability = np.frombuffer(payload, np.uint8).reshape(h, w) if person and payload else None
    # People: faces at least `face_ratio` the height of the biggest one (a crowd far behind is scenery).
    faces = header.get("faces") or []
    tallest = max((f[3] - f[1] for f in faces), default=0.0)
    people = sum(1 for f in faces if f[3] - f[1] >= face_ratio * tallest) if tallest > 0 else 0
    box = None
    if person:
        people = max(people, 1)
        xs, ys = list(pose.xy[pose.visible, 0]), list(pose.xy[pose.visible, 1])
        if probability is not None:
            rows, cols = np.nonzero(probability.max(axis=1) >= 128)[0], np.nonzero(probability.max(axis=0) >= 128)[0]
            if rows.size:
                ys += [float(rows[0]), float(rows[-1] + 1)]
                xs += [float(cols[0]), float(cols[-1] + 1)]
        if xs:
            box = (min(xs), min(ys), max(xs), max(ys))
    # Confidence: mean visibility of the body points inside the picture (a waist-up photo's legs,
    # placed outside by BlazePose, are not a doubt about the person).
    body = np.arange(18)
    inside = (pose.xy[body, 0] >= 0) & (pose.xy[body, 0] < w) & (pose.xy[body, 1] >= 0) & (pose.xy[body, 1] < h)
    confidence = float(scores[body][inside].mean()) if person and inside.any() else 0.0
    return PersonEstimate((w, h), person, probability, pose, scores, confidence, people, box)


# ----------------------------------------------------------------------------------------- the client

class MediaPipeEstimator:
    """(H, W, 3) uint8 RGB -> :class:`PersonEstimate`, through one long-lived worker process.

    The worker starts on first use (about 1.5 s: MediaPipe's import and graph set-up) and serves
    every later call; a worker that died is restarted once per call. ``min_detection_confidence``:
    BlazePose's person detector threshold (MediaPipe's default 0.5: at 0.2 a motorbike and a logo
    became people); ``retry_padding``: when no person is found, the picture is tried once more with
    its borders extended by this fraction per side (0: no retry); ``visibility``: BlazePose
    visibility at which a body keypoint counts as seen; ``face_ratio``: how tall (relative to the
    biggest face) a face must be to count as another person. Use as a context manager, or
    ``close()``. Not thread-safe: one per process or Ray actor.
    """

    def __init__(self, python: str | Path | None = None, *, min_detection_confidence: float = 0.5,
                 retry_padding: float = 0.25, visibility: float = 0.5, face_ratio: float = 0.5):
        found = Path(python) if python is not None else estimator_python()
        if found is None:
            raise EstimatorUnavailable(f"person estimator not set up ({_venv_dir(None)} has no ready environment): "
                                       f"{SETUP_HINT}, or set SERIALGEN_ESTIMATOR_PYTHON")
        self.python, self.visibility, self.face_ratio = found, float(visibility), float(face_ratio)
        self.options = {"min_detection_confidence": float(min_detection_confidence), "retry_padding": float(retry_padding)}
        self.name = (f"mediapipe-{MEDIAPIPE_VERSION} holistic+selfie (detection {min_detection_confidence:g}, "
                     f"retry padding {retry_padding:g}, visibility {visibility:g})")
        self.version: str | None = None
        self._proc: subprocess.Popen | None = None
        self._log = None

    def _start(self) -> None:
        self._log = tempfile.TemporaryFile()
        env = dict(os.environ, GLOG_minloglevel="2", TF_CPP_MIN_LOG_LEVEL="2", PYTHONNOUSERSITE="1")
        env.pop("PYTHONPATH", None)  # the worker imports nothing of this environment
        argv = [str(self.python), str(_WORKER), "--min-detection-confidence", str(self.options["min_detection_confidence"]),
                "--retry-padding", str(self.options["retry_padding"])]
        self._proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self._log, env=env)
        hello = self._read()
        self.version = hello["hello"]["mediapipe"]
        if self.version != MEDIAPIPE_VERSION:
            self.close()
            raise EstimatorUnavailable(f"{self.python}: mediapipe {self.version}, expected {MEDIAPIPE_VERSION}; {SETUP_HINT}")

    def _log_tail(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        lines = [ln for ln in self._log.read().decode("utf-8", "replace").splitlines() if ln.strip()]
        return lines[-1][:300] if lines else "no output"

    def _read(self) -> dict:
        try:
            frame = read_frame(self._proc.stdout)
        except (EOFError, ValueError) as exc:
            frame, why = None, str(exc)
        else:
            why = "closed its output"
        if frame is None:
            tail = self._log_tail()
            self.close()
            raise EstimatorFailed(f"estimator worker ({self.python}) {why}: {tail}")
        return frame[0] | {"_payload": frame[1]}

    def __call__(self, image: np.ndarray) -> PersonEstimate:
        image = np.ascontiguousarray(image, dtype=np.uint8)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected (H, W, 3) uint8 RGB, got {image.shape}")
        h, w = image.shape[:2]
        for attempt in (0, 1):
            if self._proc is None or self._proc.poll() is not None:
                self._start()
            try:
                write_frame(self._proc.stdin, {"width": w, "height": h}, image.tobytes())
                answer = self._read()
                break
            except (BrokenPipeError, EstimatorFailed):
                self.close()
                if attempt:
                    raise
        if not answer.get("ok"):
            raise EstimatorFailed(f"estimator worker: {answer.get('error')}")
        return _estimate_from_response(answer, answer["_payload"], (w, h), self.visibility, self.face_ratio)

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                proc.stdin.close()
                proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
            proc.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "MediaPipeEstimator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to tell
            pass


# ----------------------------------------------------------------------------------------- metrics

def mask_iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    """IoU of two (H, W) bool foreground masks (1.0 when both are empty)."""
    union = np.logical_or(predicted, truth).sum()
    return 1.0 if union == 0 else float(np.logical_and(predicted, truth).sum() / union)


def pck(predicted: Pose, truth: Pose, threshold_px: float) -> tuple[int, int, np.ndarray]:
    """(correct, counted, per-keypoint correct (66,) bool) over the keypoints visible in ``truth``.

    A truth-visible keypoint the estimate does not report counts as wrong (a miss is an error the
    model sees); one the estimate reports but the truth hides is not counted here.
    """
    counted = truth.visible
    dist = np.linalg.norm(predicted.xy - truth.xy, axis=1)
    correct = counted & predicted.visible & (dist <= threshold_px)
    return int(correct.sum()), int(counted.sum()), correct

"""The person estimator's worker: MediaPipe 0.10.21 in its own virtual environment, over a pipe.

MediaPipe 0.10.21 is the last release whose wheel carries its models (BlazePose detector and full
landmarks with the person segmentation, hand landmarks, face mesh, face detection), so nothing is
downloaded at run time; later releases need `.task` files fetched from the web. Its pins
(``protobuf<5``, ``jax``, ``opencv-contrib-python``) clash with the project's (``tensorboard`` needs
``protobuf>=6.31``), so it lives in a venv of its own (``serialgen estimator setup``) and this file
runs there as a script: ``<estimator venv>/bin/python mediapipe_worker.py``. It imports nothing of
serialgen, and at import time nothing but the standard library and numpy, so the client
(:mod:`serialgen.dataset.person_estimate`) shares its framing functions.

Protocol (binary, stdin -> stdout; stderr carries MediaPipe's own logging):
  frame    = 4-byte big-endian header length, the header as UTF-8 JSON, then ``header["nbytes"]`` bytes.
  start    : the worker writes one frame {"hello": {"mediapipe": version, "models": [...]}}.
  request  : {"width": W, "height": H, "nbytes": W*H*3} + RGB uint8 bytes, row-major.
  response : {"ok": true, "pose": [[x, y, z, visibility, presence] x 33] | null,
              "left_hand" / "right_hand": [[x, y, z] x 21] | null (the person's own left / right),
              "faces": [[x0, y0, x1, y1, score], ...], "padded": bool, "nbytes": H*W or 0}
             + the person-probability map as uint8 (0..255, H x W) when a person was found.
             ``padded``: the person was found only on the retry with the borders extended.
             x, y are pixels (continuous: pixel i spans [i, i + 1)); z is MediaPipe's relative depth.
  failure  : {"ok": false, "error": "..."} (the worker goes on with the next request).
  end      : EOF on stdin.
"""

from __future__ import annotations

import json
import struct
import sys
from typing import BinaryIO

_HEADER = struct.Struct(">I")
MAX_HEADER_BYTES = 1 << 24  # a header is JSON of a few KB; more means the stream is out of step


def write_frame(stream: BinaryIO, header: dict, payload: bytes = b"") -> None:
    header = dict(header, nbytes=len(payload))
    data = json.dumps(header, separators=(",", ":")).encode("utf-8")
    stream.write(_HEADER.pack(len(data)) + data)
    if payload:
        stream.write(payload)
    stream.flush()


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = stream.read(n - got)
        if not chunk:
            raise EOFError(f"stream ended after {got} of {n} bytes")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_frame(stream: BinaryIO) -> tuple[dict, bytes] | None:
    """(header, payload), or None at a clean end of stream."""
    first = stream.read(_HEADER.size)
    if not first:
        return None
    if len(first) < _HEADER.size:
        first += _read_exact(stream, _HEADER.size - len(first))
    (n,) = _HEADER.unpack(first)
    if n > MAX_HEADER_BYTES:
        raise ValueError(f"frame header of {n} bytes: the stream is out of step")
    header = json.loads(_read_exact(stream, n).decode("utf-8"))
    payload = _read_exact(stream, int(header.get("nbytes", 0)))
    return header, payload


def _landmarks(landmarks, size: tuple[int, int], offset: tuple[int, int], with_visibility: bool) -> list | None:
    """Landmarks in pixels of the picture (MediaPipe's are relative to the image it was given, which
    is the picture with ``offset`` pixels of padding on each side when the retry padded it)."""
    if landmarks is None:
        return None
    (width, height), (px, py) = size, offset
    out = []
    for lm in landmarks.landmark:
        row = [lm.x * width - px, lm.y * height - py, lm.z * width]
        if with_visibility:
            row += [lm.visibility, lm.presence]
        out.append([round(float(v), 4) for v in row])
    return out


def _to_u8(np, probability) -> bytes:
    return (np.clip(probability, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).tobytes()


def main(argv: list[str] | None = None) -> int:
    import argparse

    import numpy as np

    import mediapipe as mp

    parser = argparse.ArgumentParser(description="MediaPipe person estimator worker (frames on stdin/stdout)")
    parser.add_argument("--min-detection-confidence", type=float, default=0.5)
    parser.add_argument("--retry-padding", type=float, default=0.25)
    args = parser.parse_args(argv)
    solutions = mp.solutions
    # static_image_mode: every image is detected from scratch (no tracking between unrelated pictures);
    # model_complexity 1 is the full landmark model, the one the wheel ships (0 and 2 would be fetched).
    holistic = solutions.holistic.Holistic(static_image_mode=True, model_complexity=1, enable_segmentation=True,
                                           refine_face_landmarks=False,
                                           min_detection_confidence=args.min_detection_confidence)
    # Full-range face detection counts the people in a picture (the holistic graph follows one).
    faces = solutions.face_detection.FaceDetection(model_selection=1, min_detection_confidence=0.5)
    # The selfie model segments people at the picture's own scale; where the body model found a person,
    # the mask is the larger of the two probabilities (measured on renders: IoU 0.82 against 0.79 for
    # the body model's alone; docs/estimator.md). It is never a person detector (a cat scores 0.9).
    selfie = solutions.selfie_segmentation.SelfieSegmentation(model_selection=0)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    write_frame(stdout, {"hello": {"mediapipe": mp.__version__,
                                   "models": ["pose_detection", "pose_landmark_full", "hand_landmark_full",
                                              "face_landmark", "face_detection_full_range", "selfie_segmentation"],
                                   "min_detection_confidence": args.min_detection_confidence,
                                   "retry_padding": args.retry_padding}})
    while True:
        frame = read_frame(stdin)
        if frame is None:
            return 0
        header, payload = frame
        try:
            w, h = int(header["width"]), int(header["height"])
            image = np.frombuffer(payload, np.uint8).reshape(h, w, 3)
            result, px, py = holistic.process(image), 0, 0
            if result.pose_landmarks is None and args.retry_padding > 0:
                # BlazePose's detector wants some room around the person: close-ups and figures that
                # touch the frame are found far more often with the borders extended (replicated).
                px, py = int(w * args.retry_padding), int(h * args.retry_padding)
                padded = np.ascontiguousarray(np.pad(image, ((py, py), (px, px), (0, 0)), mode="edge"))
                result = holistic.process(padded)
                if result.pose_landmarks is None:
                    px = py = 0
            size = (w + 2 * px, h + 2 * py)
            boxes = []
            for det in faces.process(image).detections or []:
                box = det.location_data.relative_bounding_box
                boxes.append([round(float(v), 2) for v in (box.xmin * w, box.ymin * h, (box.xmin + box.width) * w,
                                                            (box.ymin + box.height) * h)] + [round(float(det.score[0]), 4)])
            mask = b""
            if result.pose_landmarks is not None:
                probability = selfie.process(image).segmentation_mask
                if result.segmentation_mask is not None:
                    probability = np.maximum(probability, result.segmentation_mask[py:py + h, px:px + w])
                mask = _to_u8(np, probability)
            write_frame(stdout, {
                "ok": True,
                "pose": _landmarks(result.pose_landmarks, size, (px, py), True),
                "left_hand": _landmarks(result.left_hand_landmarks, size, (px, py), False),
                "right_hand": _landmarks(result.right_hand_landmarks, size, (px, py), False),
                "faces": boxes,
                "padded": bool(px or py),
            }, mask)
        except Exception as exc:  # noqa: BLE001 - one bad picture must not end the worker
            write_frame(stdout, {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]})


if __name__ == "__main__":
    sys.exit(main())

"""The pose library: exactly N unique poses sampled from the 18 built-in motion sets (and imported
clips), de-duplicated by a documented pose distance, stored as ``DIR/poses.npz`` (contract 4).

Pose distance (``pose_distance``): over the 21 body joints (all but the fingers), with ``theta_j``
the geodesic angle between the two poses' local rotations of joint j,

    d(p, q) = 2 * asin( sqrt( mean_j sin^2(theta_j / 2) ) )        (degrees)

It equals theta when every joint differs by the same theta, and is 2*asin(sin(theta/2)/sqrt(21))
(about theta/4.6) when one joint alone differs. Because ``||R_p - R_q||_F^2 = 8 sin^2(theta/2)``,
it is a monotone function of the Euclidean distance between the flattened rotation matrices, so
all pairwise distances come from one matrix product (fast, exact). Two poses closer than
``DEFAULT_MIN_DISTANCE`` degrees are duplicates.

Sampling is deterministic from the seed: candidates are drawn in rounds, every motion set (and every
imported clip) contributing the same number per round, interleaved, and accepted greedily when they
are at least the threshold away from every pose accepted so far, until exactly N are accepted.
The library is then ordered by (motion, phase).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from serialgen.assets_manifest import skeleton as sk
from serialgen.assets_manifest.motions import MOTION_SETS, sample_motion
from serialgen.errors import UserInputError

__all__ = [
    "POSES_SCHEMA",
    "POSES_SCHEMA_VERSION",
    "DEFAULT_POSES",
    "DEFAULT_MIN_DISTANCE",
    "BODY_JOINTS",
    "PoseLibrary",
    "batch_forward_kinematics",
    "pose_features",
    "pose_distance",
    "pairwise_min_distance",
    "build_pose_library",
    "save_pose_library",
    "load_pose_library",
    "render_pose_sheet",
]

POSES_SCHEMA = "serialgen.poses/1"
POSES_SCHEMA_VERSION = 1
DEFAULT_POSES = 3817  # the paper's pose count
DEFAULT_MIN_DISTANCE = 4.0  # degrees of pose distance; see the module docstring
BODY_JOINTS: list[str] = [n for n in sk.JOINT_NAMES if n not in sk.HAND_JOINTS]

_J = len(sk.JOINT_NAMES)
_BODY = np.array([sk.JOINT_INDEX[n] for n in BODY_JOINTS])
_PARENT = np.array([sk.JOINT_INDEX[j.parent] if j.parent else -1 for j in sk.JOINTS])
_REST_HEAD = np.array([j.head for j in sk.JOINTS], dtype=np.float64)
_REST_TAIL = np.array([j.tail for j in sk.JOINTS], dtype=np.float64)
_ROUND = 256  # candidates per motion set per sampling round


@dataclass
class PoseLibrary:
    """N poses. ``angles`` float32 (N, J, 3) degrees in skeleton.JOINT_NAMES order; ``root_translation``
    float32 (N, 3) metres (relative to the rest pose; z puts the lowest body point on the floor);
    ``motion_index`` int64 (N,) into ``motion_names``; ``phase`` float32 (N,) in [0, 1]."""

    angles: np.ndarray
    root_translation: np.ndarray
    motion_index: np.ndarray
    phase: np.ndarray
    motion_names: list[str]
    schema_version: int = POSES_SCHEMA_VERSION
    joint_names: list[str] = field(default_factory=lambda: list(sk.JOINT_NAMES))
    min_distance: float = DEFAULT_MIN_DISTANCE
    seed: int = 0

    def __len__(self) -> int:
        return int(self.angles.shape[0])

    def counts(self) -> dict[str, int]:
        """Poses per motion name."""
        c = np.bincount(self.motion_index, minlength=len(self.motion_names))
        return {n: int(k) for n, k in zip(self.motion_names, c)}


# ---------------------------------------------------------------------------------------------
# Kinematics and distance
# ---------------------------------------------------------------------------------------------


def batch_forward_kinematics(angles: np.ndarray, root_translation: np.ndarray | None = None):
    """Vectorised ``skeleton.forward_kinematics``: angles (N, J, 3) -> heads, tails (N, J, 3) and
    world rotations (N, J, 3, 3) of the reference figure."""
    angles = np.asarray(angles, dtype=np.float64)
    n = angles.shape[0]
    local = sk.local_rotations(angles)
    world = np.empty_like(local)
    heads = np.empty((n, _J, 3))
    root = np.zeros((n, 3)) if root_translation is None else np.asarray(root_translation, dtype=np.float64)
    for j in range(_J):  # JOINTS lists every parent before its children
        p = _PARENT[j]
        if p < 0:
            world[:, j] = local[:, j]
            heads[:, j] = _REST_HEAD[j] + root
        else:
            world[:, j] = world[:, p] @ local[:, j]
            heads[:, j] = heads[:, p] + world[:, p] @ (_REST_HEAD[j] - _REST_HEAD[p])
    tails = heads + np.einsum("njab,jb->nja", world, _REST_TAIL - _REST_HEAD)
    return heads, tails, world


_FOOT = [sk.JOINT_INDEX["l_foot"], sk.JOINT_INDEX["r_foot"]]
_HEEL = np.array([0.0, 0.35, -0.40])  # skeleton's heel keypoint offset, foot-length units


def _lowest_z(heads, tails, world) -> np.ndarray:
    """Lowest z (N,) over body-joint heads/tails and the heels (the soles' back end)."""
    z = np.minimum(heads[:, _BODY, 2].min(axis=1), tails[:, _BODY, 2].min(axis=1))
    for f in _FOOT:
        length = np.linalg.norm(_REST_TAIL[f] - _REST_HEAD[f])
        heel = heads[:, f] + world[:, f] @ (_HEEL * length)
        z = np.minimum(z, heel[:, 2])
    return z


_REST_LOW = float(_lowest_z(*batch_forward_kinematics(np.zeros((1, _J, 3))))[0])


def _ground_offsets(angles: np.ndarray) -> np.ndarray:
    """Root z offsets (N,) that keep the lowest body point at its rest height (feet on the floor)."""
    return _REST_LOW - _lowest_z(*batch_forward_kinematics(angles))


def pose_features(angles: np.ndarray) -> np.ndarray:
    """Flattened body-joint local rotations (N, 9 * len(BODY_JOINTS)), scaled so that the squared
    Euclidean distance between two rows is ``mean_j sin^2(theta_j / 2)``."""
    rot = sk.local_rotations(np.asarray(angles, dtype=np.float64))[:, _BODY]
    return rot.reshape(rot.shape[0], -1) / np.sqrt(8.0 * len(_BODY))


_features = pose_features


def _to_degrees(sq: np.ndarray) -> np.ndarray:
    return np.rad2deg(2.0 * np.arcsin(np.sqrt(np.clip(sq, 0.0, 1.0))))


def pose_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pose distance in degrees between poses a (..., J, 3) and b (..., J, 3) (broadcast)."""
    a, b = np.broadcast_arrays(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
    shape = a.shape[:-2]
    fa = _features(a.reshape(-1, _J, 3))
    fb = _features(b.reshape(-1, _J, 3))
    return _to_degrees(np.sum((fa - fb) ** 2, axis=1)).reshape(shape)


def _sqdist(fa: np.ndarray, fb: np.ndarray, na: np.ndarray, nb: np.ndarray) -> np.ndarray:
    return np.maximum(na[:, None] + nb[None, :] - 2.0 * (fa @ fb.T), 0.0)


def pairwise_min_distance(angles: np.ndarray, block: int = 2048) -> float:
    """Smallest pose distance (degrees) between any two of the poses (N, J, 3), in blocks."""
    f = _features(angles)
    n2 = np.sum(f * f, axis=1)
    best = np.inf
    for i in range(0, len(f), block):
        d = _sqdist(f[i:i + block], f, n2[i:i + block], n2)
        rows = np.arange(d.shape[0])
        d[rows, rows + i] = np.inf
        best = min(best, float(d.min()))
    return float(_to_degrees(np.array(best)))


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def _normalise_extra(extra_motions) -> list[tuple[str, np.ndarray]]:
    """Imported clips -> [(name, angles (F, J, 3) clamped)]. Each item is a mapping with ``name``
    and ``angles`` (and optional ``root_translation``, not used: ground contact decides z) or a
    ``(name, angles)`` pair."""
    out = []
    for k, item in enumerate(extra_motions or ()):
        if isinstance(item, Mapping):
            name, angles = item.get("name"), item.get("angles")
        else:
            name, angles = item[0], item[1]
        angles = np.asarray(angles, dtype=np.float64)
        if angles.ndim != 3 or angles.shape[1:] != (_J, 3) or angles.shape[0] == 0:
            raise UserInputError(
                f"extra motion {name or k!r}: angles must have shape (frames, {_J}, 3), got {angles.shape}")
        if not np.isfinite(angles).all():
            raise UserInputError(f"extra motion {name or k!r}: angles contain NaN or infinite values")
        out.append((str(name or f"clip-{k}"), sk.clamp_to_limits(angles)))
    return out


class _Sources:
    """Candidate generators, one per motion set / clip, drawing ``_ROUND`` candidates per round."""

    def __init__(self, rng: np.random.Generator, extra: list[tuple[str, np.ndarray]]):
        self.rng = rng
        self.extra = extra
        self.names = [m.name for m in MOTION_SETS] + [n for n, _ in extra]
        # Each clip's frames in a seeded random order, consumed _ROUND at a time.
        self.frame_order = [rng.permutation(a.shape[0]) for _, a in extra]
        self.frame_pos = [0] * len(extra)

    def round(self):
        """-> angles (C, J, 3), root offset (C, 3), motion index (C,), phase (C,), interleaved."""
        chunks = []
        for mi, m in enumerate(MOTION_SETS):
            phase = self.rng.random(_ROUND)
            u = self.rng.random((_ROUND, m.n_params))
            mirror = self.rng.random(_ROUND) < 0.5
            angles, root = sample_motion(m, phase, u, mirror)
            angles = sk.clamp_to_limits(angles + _jitter(self.rng, _ROUND))
            chunks.append((angles, root, np.full(_ROUND, mi), phase))
        for ci, (_, clip) in enumerate(self.extra):
            pos = self.frame_pos[ci]
            frames = self.frame_order[ci][pos:pos + _ROUND]
            self.frame_pos[ci] = pos + len(frames)
            if len(frames) == 0:
                continue
            phase = frames / max(clip.shape[0] - 1, 1)
            chunks.append((clip[frames], np.zeros((len(frames), 3)), np.full(len(frames), len(MOTION_SETS) + ci), phase))
        # Interleave: candidate k of every source before candidate k + 1 of any, so the greedy
        # acceptance shares the library evenly between motions.
        order_key = np.concatenate([np.arange(len(c[3])) for c in chunks])
        src = np.concatenate([np.full(len(c[3]), s) for s, c in enumerate(chunks)])
        order = np.lexsort((src, order_key))
        return [np.concatenate([c[i] for c in chunks])[order] for i in range(4)]


# Small per-sample "style" noise (degrees, standard deviation) on the spine, head and wrists, so
# two people doing the same motion are not identical; far below the de-duplication threshold
# on its own.
_JITTER = np.zeros((_J, 3))
for _name, _sd in (("spine", 2.0), ("chest", 2.0), ("neck", 3.0), ("head", 3.0), ("l_hand", 5.0),
                   ("r_hand", 5.0), ("l_clavicle", 2.0), ("r_clavicle", 2.0)):
    _JITTER[sk.JOINT_INDEX[_name]] = _sd


def _jitter(rng: np.random.Generator, m: int) -> np.ndarray:
    return rng.standard_normal((m, _J, 3)) * _JITTER


def build_pose_library(
    n: int = DEFAULT_POSES,
    seed: int = 0,
    extra_motions: Iterable = (),
    min_distance: float = DEFAULT_MIN_DISTANCE,
    progress=None,
    max_rounds: int = 200,
) -> PoseLibrary:
    """Exactly ``n`` unique poses (pairwise ``pose_distance`` >= ``min_distance`` degrees).

    ``extra_motions``: imported clips (see ``_normalise_extra``), merged as extra motion sources
    before de-duplication. ``progress``: optional callable(accepted_count) for a progress bar.
    Deterministic: the same (n, seed, extra_motions, min_distance) gives identical arrays.
    """
    if int(n) != n or n < 1:
        raise UserInputError(f"--poses: expected a positive integer, got {n!r}")
    n = int(n)
    rng = np.random.default_rng(seed)
    src = _Sources(rng, _normalise_extra(extra_motions))
    thr = float(np.sin(np.deg2rad(min_distance) / 2.0) ** 2)  # on the squared feature distance
    dim = 9 * len(_BODY)
    feats = np.empty((n, dim))
    norms = np.empty(n)
    keep_a, keep_r, keep_m, keep_p = [], [], [], []
    count = 0
    for _ in range(max_rounds):
        angles, root, midx, phase = src.round()
        f = _features(angles)
        nf = np.sum(f * f, axis=1)
        # Against everything accepted in earlier rounds: one matrix product.
        ok = np.ones(len(f), dtype=bool)
        for i in range(0, count, 4096):
            ok &= _sqdist(f, feats[i:min(count, i + 4096)], nf, norms[i:min(count, i + 4096)]).min(axis=1) >= thr
        # Within the round: greedy in candidate order, on the small candidate x candidate matrix.
        cand = np.flatnonzero(ok)
        dd = _sqdist(f[cand], f[cand], nf[cand], nf[cand])
        alive = np.ones(len(cand), dtype=bool)
        chosen = []
        for k in range(len(cand)):
            if not alive[k]:
                continue
            chosen.append(cand[k])
            alive &= dd[k] >= thr
            alive[k] = False
            if count + len(chosen) == n:
                break
        chosen = np.asarray(chosen, dtype=int)
        feats[count:count + len(chosen)] = f[chosen]
        norms[count:count + len(chosen)] = nf[chosen]
        count += len(chosen)
        keep_a.append(angles[chosen]); keep_r.append(root[chosen])
        keep_m.append(midx[chosen]); keep_p.append(phase[chosen])
        if progress is not None:
            progress(count)
        if count == n:
            break
    else:
        raise UserInputError(
            f"--poses {n}: only {count} poses are {min_distance} degrees apart after {max_rounds} rounds; "
            "ask for fewer poses or a smaller minimum distance")
    angles = np.concatenate(keep_a)
    root = np.concatenate(keep_r)
    midx = np.concatenate(keep_m)
    phase = np.concatenate(keep_p)
    root[:, 2] += _ground_offsets(angles)
    order = np.lexsort((phase, midx))
    return PoseLibrary(
        angles=angles[order].astype(np.float32),
        root_translation=root[order].astype(np.float32),
        motion_index=midx[order].astype(np.int64),
        phase=phase[order].astype(np.float32),
        motion_names=list(src.names),
        min_distance=float(min_distance),
        seed=int(seed),
    )


# ---------------------------------------------------------------------------------------------
# File format
# ---------------------------------------------------------------------------------------------


def save_pose_library(lib: PoseLibrary, path: str | Path) -> Path:
    """Write ``poses.npz`` (uncompressed, deterministic bytes: numpy's zip entries carry a fixed
    date). Written to a temporary name and renamed, so a crash never leaves half a file."""
    path = Path(path)
    buf = io.BytesIO()
    np.savez(
        buf,
        schema=np.array(POSES_SCHEMA),
        schema_version=np.array(lib.schema_version, dtype=np.int64),
        skeleton_version=np.array(sk.SKELETON_VERSION, dtype=np.int64),
        joint_names=np.array(lib.joint_names),
        motion_names=np.array(lib.motion_names),
        angles=lib.angles.astype(np.float32),
        root_translation=lib.root_translation.astype(np.float32),
        motion_index=lib.motion_index.astype(np.int64),
        phase=lib.phase.astype(np.float32),
        min_distance=np.array(lib.min_distance, dtype=np.float64),
        seed=np.array(lib.seed, dtype=np.int64),
    )
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)
    return path


def load_pose_library(path: str | Path) -> PoseLibrary:
    """Read ``poses.npz``; a missing file, another format or an unknown version is one clear error."""
    path = Path(path)
    if path.is_dir():
        path = path / "poses.npz"
    if not path.is_file():
        raise UserInputError(f"{path}: pose library not found (run `serialgen assets build --out DIR`)")
    try:
        z = np.load(path, allow_pickle=False)
        schema = str(z["schema"])
    except Exception as exc:  # noqa: BLE001 - any decode failure is the same user-facing problem
        raise UserInputError(f"{path}: not a pose library ({type(exc).__name__}: {exc})") from None
    if not schema.startswith("serialgen.poses/"):
        raise UserInputError(f"{path}: schema {schema!r} is not a pose library")
    version = int(z["schema_version"])
    if version != POSES_SCHEMA_VERSION:
        raise UserInputError(f"{path}: pose library version {version} unsupported (expected {POSES_SCHEMA_VERSION})")
    joints = [str(x) for x in z["joint_names"]]
    if joints != list(sk.JOINT_NAMES):
        raise UserInputError(f"{path}: built for a different skeleton ({len(joints)} joints, expected {_J})")
    return PoseLibrary(
        angles=z["angles"], root_translation=z["root_translation"], motion_index=z["motion_index"],
        phase=z["phase"], motion_names=[str(x) for x in z["motion_names"]], schema_version=version,
        joint_names=joints, min_distance=float(z["min_distance"]), seed=int(z["seed"]),
    )


# ---------------------------------------------------------------------------------------------
# Looking at poses: a stick-figure contact sheet (front and side views)
# ---------------------------------------------------------------------------------------------

_BONE_COLOURS = {"l_": (40, 110, 230), "r_": (220, 60, 50)}
_NOSE = np.array(sk.FACE_LANDMARK_DEFAULTS["nose"])


def render_pose_sheet(lib: PoseLibrary, out: str | Path, per_motion: int = 6, cell: int = 150) -> Path:
    """Draw ``per_motion`` poses of every motion (evenly spread in phase) as stick figures, each in
    a front view (camera in front, looking along +Y) and a side view (from the character's right,
    facing right), one motion per row. Left limbs blue, right limbs red, spine grey, a
    black dot for the nose. The grey number is the phase."""
    from PIL import Image, ImageDraw

    rows = [m for m in range(len(lib.motion_names)) if np.any(lib.motion_index == m)]
    label_w = 70
    sheet = Image.new("RGB", (label_w + per_motion * 2 * cell, max(1, len(rows)) * cell), "white")
    draw = ImageDraw.Draw(sheet)
    scale = cell / 2.1  # metres -> pixels: a 1.75 m figure fits with a margin
    head_j = sk.JOINT_INDEX["head"]
    for r, m in enumerate(rows):
        idx = np.flatnonzero(lib.motion_index == m)
        pick = idx[np.linspace(0, len(idx) - 1, min(per_motion, len(idx))).round().astype(int)]
        heads, tails, world = batch_forward_kinematics(lib.angles[pick], lib.root_translation[pick])
        y0 = r * cell
        draw.text((4, y0 + cell // 2 - 6), lib.motion_names[m][:11], fill="black")
        for c in range(len(pick)):
            h, t = heads[c], tails[c]
            length = np.linalg.norm(t[head_j] - h[head_j])
            nose = h[head_j] + world[c, head_j] @ (_NOSE * length)
            centre = h[0]
            for view in range(2):
                x0 = label_w + (2 * c + view) * cell
                draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], outline=(225, 225, 225))
                # Front view: the camera looks at the face, so the character's left (+X) is on the
                # right of the cell; side view: the character faces right (-Y to the right).
                def proj(p, view=view, x0=x0):
                    sx = (p[0] - centre[0]) if view == 0 else -(p[1] - centre[1])
                    return (x0 + cell / 2 + sx * scale, y0 + cell - 6 - p[2] * scale)
                draw.line([(x0 + 4, y0 + cell - 6), (x0 + cell - 4, y0 + cell - 6)], fill=(200, 200, 200))
                for j in _BODY:
                    col = _BONE_COLOURS.get(sk.JOINT_NAMES[j][:2], (90, 90, 90))
                    draw.line([proj(h[j]), proj(t[j])], fill=col, width=2)
                hc = proj((h[head_j] + t[head_j]) / 2)
                rad = 0.09 * scale
                draw.ellipse([hc[0] - rad, hc[1] - rad, hc[0] + rad, hc[1] + rad], outline=(60, 60, 60), width=2)
                nx, ny = proj(nose)
                draw.ellipse([nx - 2, ny - 2, nx + 2, ny + 2], fill="black")
                if view == 0:
                    draw.text((x0 + 3, y0 + 2), f"{float(lib.phase[pick[c]]):.2f}", fill=(120, 120, 120))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out

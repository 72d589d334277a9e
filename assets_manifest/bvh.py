"""A small BVH (Biovision hierarchy) reader and forward kinematics in numpy. Blender-free.

BVH is Y-up by convention; :func:`read_bvh` converts to our Z-up frame with the same axis change
Blender's BVH importer uses, ``(x, y, z)_bvh -> (x, -z, y)``, so a capture facing +Z in BVH faces -Y
here. Some exporters (MakeHuman) write Z-up files: pass ``up="z"`` (the motion scanner tries both and
keeps the one whose skeleton stands up).
Rotations are read per joint in the order of its channels (``Zrotation Xrotation Yrotation`` means
``R = Rz @ Rx @ Ry``, intrinsic), the standard BVH convention.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["BvhError", "BvhMotion", "read_bvh", "parse_bvh"]

# Y-up BVH -> Z-up: x stays, y_new = -z_old, z_new = y_old.
_TO_ZUP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])


class BvhError(ValueError):
    """A file that is not a readable BVH (the message names the problem); ``reason`` is the manifest
    reason (``import_failed``, or ``too_large``)."""

    def __init__(self, message: str, reason: str = "import_failed"):
        super().__init__(message)
        self.reason = reason


@dataclass
class BvhMotion:
    """A parsed BVH clip, already in the Z-up frame.

    names: joint names (J,), parents: index or -1 (J,), offsets: (J, 3) rest offsets from the parent,
    end_offsets: (J, 3) the End Site offset of leaf joints (NaN elsewhere), frame_time: seconds between
    the file's frames, rotations: (F, J, 3, 3) local rotations, root_positions: (F, 3), frame_step:
    every how many of the file's frames one was kept (``parse_bvh(max_fps=...)``).
    """

    names: list[str]
    parents: np.ndarray
    offsets: np.ndarray
    end_offsets: np.ndarray
    frame_time: float
    rotations: np.ndarray
    root_positions: np.ndarray
    frame_step: int = 1

    @property
    def n_frames(self) -> int:
        return int(self.rotations.shape[0])

    def rest_heads(self) -> np.ndarray:
        """(J, 3) joint positions in the rest pose (all rotations identity), root at its offset."""
        heads = np.zeros((len(self.names), 3))
        for j, p in enumerate(self.parents):
            heads[j] = self.offsets[j] if p < 0 else heads[p] + self.offsets[j]
        return heads

    def world(self, frames: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """World rotations (F, J, 3, 3) and joint positions (F, J, 3) for ``frames`` (all by default)."""
        rot = self.rotations if frames is None else self.rotations[frames]
        root = self.root_positions if frames is None else self.root_positions[frames]
        f, j = rot.shape[:2]
        wr = np.zeros((f, j, 3, 3))
        wp = np.zeros((f, j, 3))
        for k, p in enumerate(self.parents):
            if p < 0:
                wr[:, k] = rot[:, k]
                wp[:, k] = root
            else:
                wr[:, k] = wr[:, p] @ rot[:, k]
                wp[:, k] = wp[:, p] + np.einsum("fij,j->fi", wr[:, p], self.offsets[k])
        return wr, wp

    def bones(self) -> list[dict]:
        """Rest bones for :func:`serialgen.assets_manifest.bone_maps.map_skeleton` (heads/tails Z-up)."""
        heads = self.rest_heads()
        children: dict[int, list[int]] = {}
        for k, p in enumerate(self.parents):
            if p >= 0:
                children.setdefault(int(p), []).append(k)
        out = []
        for k, name in enumerate(self.names):
            kids = children.get(k, [])
            if len(kids) == 1:
                tail = heads[kids[0]]
            elif kids:
                tail = heads[kids].mean(axis=0)
            elif np.isfinite(self.end_offsets[k]).all():
                tail = heads[k] + self.end_offsets[k]
            else:
                tail = heads[k] + np.array([0.0, 0.0, 1e-3])
            p = int(self.parents[k])
            out.append({"name": name, "parent": None if p < 0 else self.names[p],
                        "head": heads[k].tolist(), "tail": np.asarray(tail).tolist()})
        return out


def _axis_rot(axis: str, deg: np.ndarray) -> np.ndarray:
    t = np.deg2rad(deg)
    c, s = np.cos(t), np.sin(t)
    z, o = np.zeros_like(t), np.ones_like(t)
    if axis == "X":
        m = [o, z, z, z, c, -s, z, s, c]
    elif axis == "Y":
        m = [c, z, s, z, o, z, -s, z, c]
    else:
        m = [c, -s, z, s, c, z, z, z, o]
    return np.stack(m, axis=-1).reshape(t.shape + (3, 3))


_CHANNELS = {f"{axis}{kind}" for axis in "XYZ" for kind in ("POSITION", "ROTATION")}
_MOTION = re.compile(r"(?<!\S)MOTION(?!\S)", re.IGNORECASE)
_MOTION_HEAD = re.compile(r"\s*MOTION\s+Frames\s*:\s*(\S+)\s+Frame\s+Time\s*:\s*(\S+)", re.IGNORECASE)
# Frames x joints kept in memory at most (rotations are 72 bytes each): a 10-minute capture at 30 fps
# of a 100-joint skeleton is 1.8 M; a file that asks for more is rejected, not allocated.
MAX_JOINT_FRAMES = 20_000_000


def _number(tok: str, source: str, what: str) -> float:
    try:
        v = float(tok)
    except ValueError:
        raise BvhError(f"{source}: {what}: expected a number, got {tok[:40]!r}") from None
    if not np.isfinite(v):
        raise BvhError(f"{source}: {what}: not a finite number ({tok[:40]!r})")
    return v


def _parse_hierarchy(toks: list[str], source: str):
    """(names, parents, offsets, end_offsets, channels) of the HIERARCHY tokens. Every step consumes
    at least one token, and every malformed construct is a BvhError (no loop can stall)."""
    if not toks or toks[0].upper() != "HIERARCHY":
        raise BvhError(f"{source}: not a BVH file (no HIERARCHY header)")
    names: list[str] = []
    parents: list[int] = []
    offsets: list[list[float]] = []
    end_offsets: list[list[float]] = []
    channels: list[list[str] | None] = []
    stack: list[int] = []  # open blocks: a joint index, or -1 for an End Site
    opened: int | None = None  # what the next "{" opens (None: a "{" is not expected)
    i, n = 1, len(toks)
    while i < n:
        t = toks[i].upper()
        if opened is not None and t != "{":
            raise BvhError(f"{source}: expected '{{' after the joint or End Site, got {toks[i][:40]!r}")
        if t in ("ROOT", "JOINT"):
            if t == "ROOT" and stack:
                raise BvhError(f"{source}: ROOT inside a joint")
            if t == "JOINT" and (not stack or stack[-1] < 0):
                raise BvhError(f"{source}: JOINT outside a joint")
            if i + 1 >= n:
                raise BvhError(f"{source}: {t} without a name")
            names.append(toks[i + 1])
            parents.append(stack[-1] if stack else -1)
            offsets.append([0.0, 0.0, 0.0])
            end_offsets.append([np.nan] * 3)
            channels.append(None)
            opened = len(names) - 1
            i += 2
        elif t == "END":
            if i + 1 >= n or toks[i + 1].upper() != "SITE":
                raise BvhError(f"{source}: 'End' not followed by 'Site'")
            if not stack or stack[-1] < 0:
                raise BvhError(f"{source}: End Site outside a joint")
            opened = -1
            i += 2
        elif t == "{":
            if opened is None:
                raise BvhError(f"{source}: unexpected '{{'")
            stack.append(opened)
            opened = None
            i += 1
        elif t == "}":
            if not stack:
                raise BvhError(f"{source}: unbalanced '}}'")
            stack.pop()
            i += 1
        elif t == "OFFSET":
            if not stack or i + 3 >= n:
                raise BvhError(f"{source}: OFFSET outside a joint or cut short")
            vals = [_number(v, source, "OFFSET") for v in toks[i + 1: i + 4]]
            if stack[-1] < 0:
                end_offsets[stack[-2]] = vals
            else:
                offsets[stack[-1]] = vals
            i += 4
        elif t == "CHANNELS":
            if not stack or stack[-1] < 0:
                raise BvhError(f"{source}: CHANNELS outside a joint")
            if channels[stack[-1]] is not None:
                raise BvhError(f"{source}: joint {names[stack[-1]][:40]!r} has two CHANNELS lines")
            count = toks[i + 1] if i + 1 < n else ""
            if not count.isdigit() or int(count) > 6:
                raise BvhError(f"{source}: CHANNELS count must be 0..6, got {count[:40]!r}")
            k = int(count)
            chans = [c.upper() for c in toks[i + 2: i + 2 + k]]
            if len(chans) < k or not set(chans) <= _CHANNELS or len(set(chans)) < k:
                raise BvhError(f"{source}: CHANNELS of joint {names[stack[-1]][:40]!r} must be distinct "
                               f"X/Y/Z position/rotation names, got {' '.join(toks[i + 2: i + 2 + k])[:80]!r}")
            channels[stack[-1]] = chans
            i += 2 + k
        else:
            raise BvhError(f"{source}: unexpected token {toks[i][:40]!r} in HIERARCHY")
    if opened is not None or stack:
        raise BvhError(f"{source}: HIERARCHY ends inside a joint (unbalanced braces)")
    if not names:
        raise BvhError(f"{source}: no joints")
    return names, parents, offsets, end_offsets, [c or [] for c in channels]


def parse_bvh(text: str, source: str = "<bvh>", up: str = "y", max_fps: float | None = None) -> BvhMotion:
    """Parse BVH text. ``up``: the file's up axis, "y" (the BVH convention, CMU) or "z" (MakeHuman
    exports); the result is always Z-up. ``max_fps``: keep every k-th frame so that at most this
    many frames per second remain (``frame_step`` = k; the rotations of the others are never built).
    Raises :class:`BvhError` naming ``source`` and the problem: a malformed header (unbalanced
    braces, a CHANNELS count outside 0..6 or unknown channel names, a non-numeric OFFSET ...), no
    frames, a frame time that is not a positive number, motion data that is not numbers; reason
    ``too_large`` when the frames x joints to keep exceed :data:`MAX_JOINT_FRAMES`."""
    if up not in ("y", "z"):
        raise ValueError(f"up must be 'y' or 'z', not {up!r}")
    conv = _TO_ZUP if up == "y" else np.eye(3)
    text = text.lstrip("\ufeff")
    m = _MOTION.search(text)
    names, parents, offsets, end_offsets, channels = _parse_hierarchy(
        text[: m.start() if m else len(text)].split(), source)
    if m is None:
        raise BvhError(f"{source}: no MOTION section")
    head = _MOTION_HEAD.match(text, m.start())
    if head is None:
        raise BvhError(f"{source}: expected 'Frames: N' and 'Frame Time: t' after MOTION")
    if not head.group(1).isdigit():
        raise BvhError(f"{source}: Frames: expected a whole number, got {head.group(1)[:40]!r}")
    n_frames = int(head.group(1))
    frame_time = _number(head.group(2), source, "Frame Time")
    if frame_time <= 0:
        raise BvhError(f"{source}: Frame Time must be positive, got {head.group(2)[:40]!r}")
    n_ch = sum(len(c) for c in channels)
    if n_frames <= 0 or n_ch == 0:
        raise BvhError(f"{source}: no frames")
    with warnings.catch_warnings():
        # numpy warns (and stops) at the first token that is not a number: make that an error.
        warnings.simplefilter("error", DeprecationWarning)
        try:
            data = np.fromstring(text[head.end():], dtype=np.float64, sep=" ")
        except (DeprecationWarning, ValueError):
            raise BvhError(f"{source}: motion data holds something that is not a number") from None
    if data.size < n_frames * n_ch:
        # A truncated capture: keep the complete frames, if any.
        n_frames = data.size // n_ch
        if n_frames == 0:
            raise BvhError(f"{source}: motion data is shorter than one frame")
    data = data[: n_frames * n_ch].reshape(n_frames, n_ch)
    fps = 1.0 / frame_time
    step = max(1, int(round(fps / max_fps))) if max_fps and fps > max_fps else 1
    data = data[::step]
    n_frames = data.shape[0]
    n_j = len(names)
    if n_frames * n_j > MAX_JOINT_FRAMES:
        raise BvhError(f"{source}: {n_frames} frames x {n_j} joints is more than {MAX_JOINT_FRAMES} to keep",
                       reason="too_large")
    if not np.isfinite(data).all():
        raise BvhError(f"{source}: motion data has non-finite values")

    rot = np.tile(np.eye(3), (n_frames, n_j, 1, 1))
    root_pos = np.zeros((n_frames, 3))
    col = 0
    for j, chans in enumerate(channels):
        r = np.tile(np.eye(3), (n_frames, 1, 1))
        pos = np.zeros((n_frames, 3))
        has_pos = False
        for c in chans:
            v = data[:, col]
            col += 1
            if c.endswith("ROTATION"):
                r = r @ _axis_rot(c[0], v)
            else:
                pos[:, "XYZ".index(c[0])] = v
                has_pos = True
        # Change of basis to Z-up: R' = C R C^T, p' = C p.
        rot[:, j] = conv @ r @ conv.T
        if parents[j] < 0:
            root_pos = pos @ conv.T if has_pos else np.tile(np.asarray(offsets[j]) @ conv.T, (n_frames, 1))
    offs = np.asarray(offsets, dtype=np.float64) @ conv.T
    ends = np.asarray(end_offsets, dtype=np.float64) @ conv.T
    return BvhMotion(names, np.asarray(parents), offs, ends, frame_time, rot, root_pos, step)


def read_bvh(path, up: str = "y", max_fps: float | None = None) -> BvhMotion:
    """Read a ``.bvh`` file (see :func:`parse_bvh`)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise BvhError(f"{p}: cannot read ({e.strerror})") from e
    return parse_bvh(text, str(p), up, max_fps)

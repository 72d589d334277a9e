"""A small BVH (Biovision hierarchy) reader and forward kinematics in numpy. Blender-free.

BVH is Y-up by convention; :func:`read_bvh` converts to our Z-up frame with the same axis change
Blender's BVH importer uses, ``(x, y, z)_bvh -> (x, -z, y)``, so a capture facing +Z in BVH faces -Y
here. Some exporters (MakeHuman) write Z-up files: pass ``up="z"`` (the motion scanner tries both and
keeps the one whose skeleton stands up).
Rotations are read per joint in the order of its channels (``Zrotation Xrotation Yrotation`` means
``R = Rz @ Rx @ Ry``, intrinsic), the standard BVH convention.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["BvhError", "BvhMotion", "read_bvh", "parse_bvh"]

# Y-up BVH -> Z-up: x stays, y_new = -z_old, z_new = y_old.
_TO_ZUP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])


class BvhError(ValueError):
    """A file that is not a readable BVH (the message names the problem)."""


@dataclass
class BvhMotion:
    """A parsed BVH clip, already in the Z-up frame.

    names: joint names (J,), parents: index or -1 (J,), offsets: (J, 3) rest offsets from the parent,
    end_offsets: (J, 3) the End Site offset of leaf joints (NaN elsewhere), frame_time: seconds,
    rotations: (F, J, 3, 3) local rotations, root_positions: (F, 3).
    """

    names: list[str]
    parents: np.ndarray
    offsets: np.ndarray
    end_offsets: np.ndarray
    frame_time: float
    rotations: np.ndarray
    root_positions: np.ndarray

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


def parse_bvh(text: str, source: str = "<bvh>", up: str = "y") -> BvhMotion:
    """Parse BVH text. ``up``: the file's up axis, "y" (the BVH convention, CMU) or "z" (MakeHuman
    exports); the result is always Z-up. Raises :class:`BvhError` naming ``source`` and the problem."""
    if up not in ("y", "z"):
        raise ValueError(f"up must be 'y' or 'z', not {up!r}")
    conv = _TO_ZUP if up == "y" else np.eye(3)
    toks = text.split()
    i = 0
    names: list[str] = []
    parents: list[int] = []
    offsets: list[list[float]] = []
    end_offsets: list[list[float]] = []
    channels: list[list[str]] = []
    stack: list[int] = []
    pending_end = False

    def need(n=1):
        if i + n > len(toks):
            raise BvhError(f"{source}: unexpected end of file in HIERARCHY")

    try:
        need()
        if toks[0].upper() != "HIERARCHY":
            raise BvhError(f"{source}: not a BVH file (no HIERARCHY header)")
        i = 1
        while i < len(toks) and toks[i].upper() != "MOTION":
            t = toks[i].upper()
            if t in ("ROOT", "JOINT"):
                need(2)
                names.append(toks[i + 1])
                parents.append(stack[-1] if stack else -1)
                offsets.append([0.0, 0.0, 0.0])
                end_offsets.append([np.nan] * 3)
                channels.append([])
                i += 2
            elif t == "END":
                pending_end = True
                i += 2  # "End Site"
            elif t == "{":
                stack.append(-2 if pending_end else len(names) - 1)
                i += 1
            elif t == "}":
                if pending_end:
                    pending_end = False
                stack.pop()
                i += 1
            elif t == "OFFSET":
                need(4)
                vals = [float(v) for v in toks[i + 1: i + 4]]
                if pending_end:
                    end_offsets[stack[-2] if len(stack) >= 2 else -1] = vals
                else:
                    offsets[-1] = vals
                i += 4
            elif t == "CHANNELS":
                need(2)
                n = int(toks[i + 1])
                need(2 + n)
                channels[-1] = toks[i + 2: i + 2 + n]
                i += 2 + n
            else:
                raise BvhError(f"{source}: unexpected token {toks[i]!r} in HIERARCHY")
        if not names:
            raise BvhError(f"{source}: no joints")
        if i >= len(toks):
            raise BvhError(f"{source}: no MOTION section")
        # MOTION / Frames: N / Frame Time: t
        i += 1
        if toks[i].rstrip(":").lower() != "frames":
            raise BvhError(f"{source}: expected 'Frames:' after MOTION")
        n_frames = int(toks[i + 1])
        if toks[i + 2].lower() != "frame" or toks[i + 3].rstrip(":").lower() != "time":
            raise BvhError(f"{source}: expected 'Frame Time:'")
        frame_time = float(toks[i + 4])
        i += 5
    except (IndexError, ValueError) as e:
        if isinstance(e, BvhError):
            raise
        raise BvhError(f"{source}: malformed BVH ({e})") from e
    n_ch = sum(len(c) for c in channels)
    data = np.array(toks[i:], dtype=np.float64) if len(toks) > i else np.zeros(0)
    if n_frames <= 0 or n_ch == 0:
        raise BvhError(f"{source}: no frames")
    if data.size < n_frames * n_ch:
        # A truncated capture: keep the complete frames, if any.
        n_frames = data.size // n_ch
        if n_frames == 0:
            raise BvhError(f"{source}: motion data is shorter than one frame")
    data = data[: n_frames * n_ch].reshape(n_frames, n_ch)
    if not np.isfinite(data).all():
        raise BvhError(f"{source}: motion data has non-finite values")

    n_j = len(names)
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
            cu = c.upper()
            if cu.endswith("ROTATION"):
                r = r @ _axis_rot(cu[0], v)
            elif cu.endswith("POSITION"):
                pos[:, "XYZ".index(cu[0])] = v
                has_pos = True
        # Change of basis to Z-up: R' = C R C^T, p' = C p.
        rot[:, j] = conv @ r @ conv.T
        if parents[j] < 0:
            root_pos = pos @ conv.T if has_pos else np.tile(np.asarray(offsets[j]) @ conv.T, (n_frames, 1))
    offs = np.asarray(offsets, dtype=np.float64) @ conv.T
    ends = np.asarray(end_offsets, dtype=np.float64) @ conv.T
    return BvhMotion(names, np.asarray(parents), offs, ends, frame_time, rot, root_pos)


def read_bvh(path, up: str = "y") -> BvhMotion:
    """Read a ``.bvh`` file (see :func:`parse_bvh`)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise BvhError(f"{p}: cannot read ({e.strerror})") from e
    return parse_bvh(text, str(p), up)

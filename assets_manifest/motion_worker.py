"""BVH worker: parse and retarget ONE motion file in this process and report as JSON. Blender-free.

    python -m serialgen.assets_manifest.motion_worker FILE OUT.npz [--max-fps F] [--max-bytes N]

A BVH file is text from a stranger: a malformed header once made the parser loop forever inside the
build process, where no timeout applied. The build's probe (``render.asset_build.BlenderProbe
.retarget_bvh``) runs this module as a subprocess with the same timeout as a character import, so
a file that hangs or exhausts the parser costs one file (``import_timeout`` / ``import_failed``).

The last stdout line is one JSON object: ``{"ok": true, "up": "y"|"z", "frames": F}`` with the
retargeted clip in OUT.npz (``angles`` (F, J, 3), ``root_translation`` (F, 3), ``fps``, ``name``,
``mapped_joints``), or ``{"ok": false, "reason", "detail"}`` (``import_failed`` for a malformed
file, ``too_large``, ``not_humanoid``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from .bvh import BvhError
from .manifest import format_bytes
from .motions_scan import retarget_bvh
from .retarget import RetargetedMotion

__all__ = ["run", "save_motion", "load_motion"]


def save_motion(path, motion: RetargetedMotion) -> None:
    np.savez(path, angles=motion.angles, root_translation=motion.root_translation, fps=np.array(motion.fps),
             name=np.array(motion.name), mapped_joints=np.array(json.dumps(list(motion.mapped_joints))))


def load_motion(path) -> RetargetedMotion:
    with np.load(path, allow_pickle=False) as z:
        return RetargetedMotion(str(z["name"]), z["angles"], z["root_translation"], float(z["fps"]),
                                json.loads(str(z["mapped_joints"])))


def run(file: str, out_npz: str, max_fps: float, max_bytes: int | None) -> dict:
    path = Path(file)
    try:
        size = os.stat(path).st_size
    except OSError as e:
        return {"ok": False, "reason": "import_failed", "detail": f"{path.name}: cannot read ({e.strerror})"}
    if max_bytes is not None and size > max_bytes:
        return {"ok": False, "reason": "too_large",
                "detail": f"{path.name}: {format_bytes(size)}, over the limit of {format_bytes(max_bytes)}"}
    try:
        motion, up = retarget_bvh(path, max_fps)
    except BvhError as e:
        return {"ok": False, "reason": e.reason, "detail": str(e)[:500]}
    except ValueError as e:
        return {"ok": False, "reason": "not_humanoid", "detail": f"{path.name}: {str(e)[:500]}"}
    save_motion(out_npz, motion)
    return {"ok": True, "up": up, "frames": int(motion.angles.shape[0])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serialgen.assets_manifest.motion_worker",
                                 description="Parse and retarget one BVH file; last stdout line is JSON.")
    ap.add_argument("file")
    ap.add_argument("out", metavar="NPZ")
    ap.add_argument("--max-fps", type=float, default=30.0)
    ap.add_argument("--max-bytes", type=int, default=None)
    args = ap.parse_args(argv)
    try:
        res = run(args.file, args.out, args.max_fps, args.max_bytes)
    except Exception as e:  # noqa: BLE001 - the worker reports, the scanner decides
        res = {"ok": False, "reason": "import_failed", "detail": f"{type(e).__name__}: {e}"[:500]}
    sys.stdout.write("\n" + json.dumps(res) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Time the procedural character pipeline: describe, build (anny + clothing + hair + atlas), save,
and in Blender: build the objects, pose, set an expression, read keypoints, remove + purge.

    .venv/bin/python benchmarks/procedural_characters.py [--n 8] [--out /tmp/serialgen-bench-chars]

Prints one table (median and max seconds per character) and the npz sizes. The first anny model
construction on a machine builds anny's cache (~1 min); it is timed separately.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8, help="characters (default 8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("/tmp/serialgen-bench-chars"))
    args = ap.parse_args()

    from serialgen.assets_manifest import procedural as pr
    from serialgen.assets_manifest import skeleton as sk

    t = time.perf_counter()
    pr.anny_model()
    model_s = time.perf_counter() - t
    times: dict[str, list[float]] = {k: [] for k in ("describe", "build", "save", "bpy_load", "pose", "expression",
                                                      "keypoints", "remove")}
    sizes = []
    records = []
    for i in range(args.n):
        cid = f"proc-{i:06d}"
        t = time.perf_counter()
        desc = pr.describe_character(cid, args.seed)
        times["describe"].append(time.perf_counter() - t)
        t = time.perf_counter()
        mesh = pr.build_mesh_data(desc)
        times["build"].append(time.perf_counter() - t)
        t = time.perf_counter()
        path = pr.save_mesh_data(mesh, args.out / "meshes" / f"{cid}.npz")
        times["save"].append(time.perf_counter() - t)
        sizes.append(path.stat().st_size)
        records.append({"id": cid, "kind": "procedural", "mesh_file": f"meshes/{cid}.npz"})

    from serialgen.render import bpy_utils
    from serialgen.render.characters import load_character

    bpy_utils.reset_scene()
    rng = np.random.default_rng(0)
    for rec in records:
        t = time.perf_counter()
        rig = load_character(rec, args.out)
        times["bpy_load"].append(time.perf_counter() - t)
        angles = sk.clamp_to_limits(rng.normal(0, 25, (len(sk.JOINTS), 3)))
        t = time.perf_counter()
        rig.apply_pose(angles)
        times["pose"].append(time.perf_counter() - t)
        t = time.perf_counter()
        rig.set_expression("smile")
        times["expression"].append(time.perf_counter() - t)
        t = time.perf_counter()
        rig.keypoints()
        times["keypoints"].append(time.perf_counter() - t)
        t = time.perf_counter()
        rig.remove()
        bpy_utils.purge_orphans()
        times["remove"].append(time.perf_counter() - t)

    print(f"anny model (cached): {model_s:.2f} s   first build includes the per-process atlas raster")
    print(f"{'step':<12}{'median s':>10}{'max s':>10}")
    for k, v in times.items():
        print(f"{k:<12}{statistics.median(v):>10.4f}{max(v):>10.4f}")
    print(f"npz size: median {statistics.median(sizes) / 1e6:.2f} MB, max {max(sizes) / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What the render-farm tests share: procedural characters built once, asset folders around them, and
the `serialgen` command run as a separate process (so a test can kill it or its workers)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

SERIALGEN = [sys.executable, "-c", "import sys; from serialgen.cli import main; sys.exit(main(sys.argv[1:]))"]


def build_characters(root: Path, chars: tuple[str, ...], poses: int = 30) -> tuple[Path, Path]:
    """(meshes dir, poses.npz) of procedural characters ``chars`` and a ``poses``-pose library under ``root``."""
    from serialgen.assets_manifest.poses import build_pose_library, save_pose_library
    from serialgen.assets_manifest.procedural import build_mesh_data, describe_character, save_mesh_data

    for char_id in chars:
        save_mesh_data(build_mesh_data(describe_character(char_id, 0)), root / "meshes" / f"{char_id}.npz")
    return root / "meshes", save_pose_library(build_pose_library(poses, seed=0), root / "poses.npz")


def write_assets(root: Path, meshes: Path, poses: Path, records: list[dict]) -> Path:
    """An asset folder whose manifest holds ``records``, sharing the built meshes and poses by links."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "meshes").symlink_to(meshes)
    (root / "poses.npz").symlink_to(poses)
    (root / "characters.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def character_record(char_id: str, **extra) -> dict:
    """An accepted procedural character record (``extra``: e.g. a fault to inject)."""
    return {"schema": "serialgen.character/1", "id": char_id, "kind": "procedural", "status": "accepted",
            "mesh_file": f"meshes/{char_id}.npz", **extra}

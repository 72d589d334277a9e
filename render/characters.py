"""``load_character(record, assets_dir) -> CharacterRig``: one entry point for every character kind.

``LOADERS`` maps a manifest record's ``kind`` to a loader ``(record, assets_dir) -> CharacterRig``.
This module registers ``"procedural"``; the importers of real formats add theirs with
``register_loader("gltf", load_gltf)`` (or by extending ``LOADERS``). Unknown kinds and missing
files raise ``UserInputError`` naming the record and the problem.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from serialgen.errors import UserInputError

__all__ = ["LOADERS", "register_loader", "load_character", "load_procedural"]

Loader = Callable[[dict, Path], "object"]


def load_procedural(record: dict, assets_dir: Path):
    """Build a procedural character from its ``mesh_file`` (written by ``assets build``)."""
    from serialgen.assets_manifest.procedural import load_mesh_data
    from serialgen.render.procedural_build import build_character

    rel = record.get("mesh_file")
    if not rel:
        raise UserInputError(f"character {record.get('id')!r}: procedural record has no mesh_file")
    path = Path(assets_dir) / rel
    if not path.is_file():
        raise UserInputError(f"{path}: mesh file of character {record.get('id')!r} not found "
                             "(run `serialgen assets build` to write it)")
    try:
        mesh = load_mesh_data(path)
    except ValueError as exc:
        raise UserInputError(str(exc)) from exc
    if mesh.char_id != record.get("id"):
        raise UserInputError(f"{path}: holds character {mesh.char_id!r}, record says {record.get('id')!r}")
    return build_character(mesh)


#: kind -> loader. The import engineer registers "gltf", "vrm", "fbx", "blend".
LOADERS: dict[str, Loader] = {"procedural": load_procedural}


def register_loader(kind: str, loader: Loader) -> None:
    """Add or replace the loader of one record kind."""
    LOADERS[kind] = loader


def load_character(record: dict, assets_dir) -> "object":
    """Load the character of a manifest record into the current Blender scene -> ``CharacterRig``."""
    if not isinstance(record, dict):
        raise UserInputError(f"character record must be a dict, got {type(record).__name__}")
    kind = record.get("kind")
    loader = LOADERS.get(kind)
    if loader is None:
        raise UserInputError(f"character {record.get('id')!r}: unknown kind {kind!r}; "
                             f"known kinds: {', '.join(sorted(LOADERS))}")
    if record.get("status", "accepted") != "accepted":
        raise UserInputError(f"character {record.get('id')!r} is {record.get('status')!r} "
                             f"({record.get('reason')}); only accepted records can be loaded")
    return loader(record, Path(assets_dir))


# Real formats (import engineer): glTF/GLB, VRM, FBX, .blend -> render/real_character.py.
def _load_real(record: dict, assets_dir: Path):
    from serialgen.render.real_character import load_real_character

    return load_real_character(record, assets_dir)


for _kind in ("gltf", "vrm", "fbx", "blend"):
    register_loader(_kind, _load_real)

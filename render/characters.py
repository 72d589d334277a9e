"""``load_character(record, assets_dir) -> Rig``: one entry point for every character kind.

``LOADERS`` maps a manifest record's ``kind`` to a loader ``(record, assets_dir) -> Rig``:
``"procedural"`` (a mesh file written by ``assets build``), the real formats ``"gltf"``, ``"vrm"``,
``"fbx"``, ``"blend"`` (``render/real_character.py``) and ``"mannequin"`` (the test character,
``render/mannequin.py``; record field ``variant``). A new kind is one more entry. Unknown kinds and
missing files raise ``UserInputError`` naming the record and the problem.

Loaders import their Blender modules when called, so this table loads without ``bpy``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

from serialgen.errors import UserInputError

if TYPE_CHECKING:
    from serialgen.render.rig import Rig

__all__ = ["LOADERS", "load_character"]

Loader = Callable[[dict, Path], "Rig"]


def _load_procedural(record: dict, assets_dir: Path) -> Rig:
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


def _load_real(record: dict, assets_dir: Path) -> Rig:
    """glTF/GLB, VRM, FBX, .blend: import and normalise the file the record points at."""
    from serialgen.render.real_character import load_real_character

    return load_real_character(record, assets_dir)


def _load_mannequin(record: dict, assets_dir: Path) -> Rig:
    """The built-in test character; ``variant`` picks its proportions (default "adult")."""
    from serialgen.render.mannequin import build_mannequin

    return build_mannequin(record.get("variant", "adult"))


#: kind -> loader.
LOADERS: dict[str, Loader] = {
    "procedural": _load_procedural,
    **{kind: _load_real for kind in ("gltf", "vrm", "fbx", "blend")},
    "mannequin": _load_mannequin,
}


def load_character(record: dict, assets_dir) -> Rig:
    """Load the character of a manifest record into the current Blender scene."""
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

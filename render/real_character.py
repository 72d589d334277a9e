"""Load an accepted real character record (gltf / vrm / fbx / blend) as a ``CharacterRig`` (bpy).

The record comes from ``assets_manifest.characters_scan``; loading repeats the worker's import and
normalisation with the record's own numbers (``scale``, ``stats.yaw_deg``), so a character looks the
same in every render, then makes the rig ready for forward-kinematic posing:

* rig repairs from the record (IK-style feet re-parented to the shins);
* bone tails the alignment relies on are made meaningful where the next canonical joint is not
  mapped (glTF has no tails; importers guess them): chest -> head when there is no neck, head
  straight up, a hand continues its forearm, a foot points forward to the ground;
* image textures whose file is missing show the flat colour the record's ``texture_fallback``
  gives for them (the material's base colour; ``assets build --allow-texture-fallback``) instead of
  Blender's missing-image magenta: the image node gets a 2x2 image of that colour, so every engine
  (Workbench draws a material's active image node, whatever it is linked to) shows the colour.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from serialgen.errors import UserInputError
from serialgen.render.bpy_utils import import_bpy, import_mathutils

bpy = import_bpy()  # this module runs only in Blender processes
Vector = import_mathutils().Vector

__all__ = ["load_real_character", "fix_tails", "flat_texture_fallback"]


def _resolve(record: dict, assets_dir) -> Path:
    p = record.get("path")
    if not p:
        raise UserInputError(f"character {record.get('id')!r}: record has no path")
    path = Path(p)
    if not path.is_absolute():
        path = Path(assets_dir) / path
    if not path.is_file():
        raise UserInputError(f"{path}: file of character {record.get('id')!r} not found")
    return path


def fix_tails(arm, bone_map: dict[str, str]) -> list[str]:
    """Give mapped bones whose next canonical joint is unmapped a tail that points the right way."""
    m = bone_map
    plan: dict[str, Vector] = {}
    bones = arm.data.bones
    h = {j: Vector(bones[b].head_local) for j, b in m.items() if b in bones}
    height = max((v.z for v in h.values()), default=1.0) or 1.0
    if "head" in h:
        below = h.get("neck") or h.get("chest") or h.get("spine") or h.get("pelvis")
        length = max((h["head"] - below).length if below is not None else 0.0, 0.08 * height)
        plan[m["head"]] = h["head"] + Vector((0.0, 0.0, length))
    for top, nxt_choices in (("chest", ("neck", "head")), ("spine", ("chest", "neck", "head"))):
        nxt = "neck" if top == "chest" else "chest"
        if top in h and nxt not in h:
            for c in nxt_choices:
                if c in h and (h[c] - h[top]).length > 1e-6:
                    plan[m[top]] = h[c]
                    break
    for s in ("l", "r"):
        hand, fore = f"{s}_hand", f"{s}_lower_arm"
        if hand in h and f"{s}_middle1" not in h and fore in h:
            d = h[hand] - h[fore]
            plan[m[hand]] = h[hand] + d * 0.35
        foot, toe = f"{s}_foot", f"{s}_toe"
        if foot in h and toe not in h:
            ankle = h[foot]
            plan[m[foot]] = Vector((ankle.x, ankle.y - max(0.6 * ankle.z, 0.05 * height), 0.25 * ankle.z))
    if not plan:
        return []
    view_layer = bpy.context.view_layer
    prev = view_layer.objects.active
    view_layer.objects.active = arm
    bpy.ops.object.mode_set(mode="EDIT")
    try:
        eb = arm.data.edit_bones
        for name, tail in plan.items():
            if name not in eb:
                continue
            for child in eb[name].children:
                child.use_connect = False  # moving the tail must not drag connected children
            if (tail - eb[name].head).length > 1e-6:
                eb[name].tail = tail
    finally:
        bpy.ops.object.mode_set(mode="OBJECT")
        view_layer.objects.active = prev
    return sorted(plan)


#: What a missing image shows when the record names no colour for it: Blender's default grey.
_DEFAULT_FALLBACK = (0.8, 0.8, 0.8, 1.0)


def _linear_to_srgb(c: np.ndarray) -> np.ndarray:
    c = np.clip(c, 0.0, 1.0)
    return np.where(c <= 0.0031308, c * 12.92, 1.055 * c ** (1 / 2.4) - 0.055)


def _flat_image(colour) -> object:
    """A packed 2x2 sRGB image of one scene-linear RGBA colour (shared by every node that needs it)."""
    rgba = np.asarray(list(colour) + [1.0] * (4 - len(colour)), dtype=np.float64)[:4]
    name = "serialgen-fallback-" + "-".join(f"{v:.4f}" for v in rgba)
    img = bpy.data.images.get(name)
    if img is None:
        img = bpy.data.images.new(name, 2, 2, alpha=True)
        img.colorspace_settings.name = "sRGB"  # byte pixels are the sRGB-encoded values
        px = np.concatenate([_linear_to_srgb(rgba[:3]), rgba[3:]])
        img.pixels.foreach_set(np.tile(px, 4).astype(np.float32))
        img.pack()
    return img


def _has_pixels(img) -> bool:
    if img is None:
        return False
    if img.has_data:
        return True
    try:
        img.reload()
        return img.size[0] > 0 and len(img.pixels) > 0
    except RuntimeError:
        return False


def flat_texture_fallback(meshes, fallback: list[dict] | None) -> int:
    """Give image nodes whose image has no pixels (a missing file) a flat image of the colour the
    record's ``texture_fallback`` entry names for that image (or its material; else
    :data:`_DEFAULT_FALLBACK`). Returns how many nodes were changed."""
    by_image = {e.get("image"): e.get("colour") for e in fallback or [] if e.get("image")}
    by_material = {e.get("material"): e.get("colour") for e in fallback or [] if e.get("material")}
    n = 0
    for ob in meshes:
        for slot in ob.material_slots:
            mat = slot.material
            if mat is None or mat.node_tree is None:
                continue
            for node in mat.node_tree.nodes:
                if node.type != "TEX_IMAGE" or _has_pixels(node.image):
                    continue
                name = node.image.name if node.image is not None else None
                colour = by_image.get(name) or by_material.get(mat.name) or _DEFAULT_FALLBACK
                node.image = _flat_image(colour)
                n += 1
    return n


def _object_named(name: str, candidates):
    for ob in candidates:
        if ob.name == name:
            return ob
    pat = re.compile(re.escape(name) + r"\.\d{3}$")
    for ob in candidates:
        if pat.match(ob.name):
            return ob
    return None


def load_real_character(record: dict, assets_dir):
    """Import, normalise and rig an accepted real character record -> ``CharacterRig``."""
    from serialgen.render import importers as imp
    from serialgen.render.rig import CharacterRig

    path = _resolve(record, assets_dir)
    bone_map = dict(record.get("bone_map") or {})
    stats = record.get("stats") or {}
    try:
        objects = imp.import_objects(path)
    except imp.ImportFailed as e:
        raise UserInputError(f"{path}: {e}") from e
    col = imp.collect_character(objects)
    arm, meshes = col["armature"], col["meshes"]
    if arm is None or not meshes:
        raise UserInputError(f"{path}: no armature with meshes (did the file change since the scan?)")
    missing = [b for b in bone_map.values() if b not in arm.data.bones]
    if missing:
        raise UserInputError(f"{path}: bones {missing[:5]} of the record are not in the file (re-run assets build)")
    imp.normalise_character(arm, meshes, yaw_deg=float(stats.get("yaw_deg", 0.0)),
                            scale=float(record.get("scale", 1.0)), pelvis_bone=bone_map.get("pelvis"),
                            head_bone=bone_map.get("head"), others=col["other"])
    imp.fix_material_alpha(meshes)
    if stats.get("texture_fallback") or record.get("texture_fallback"):
        flat_texture_fallback(meshes, record.get("texture_fallback"))
    imp.apply_repairs(arm, stats.get("repairs") or {})
    fix_tails(arm, bone_map)
    expressions = {}
    for expr, binds in (record.get("expressions") or {}).items():
        out = []
        for mesh_name, key, weight in binds:
            ob = _object_named(mesh_name, meshes)
            if ob is not None:
                out.append((ob.name, key, float(weight)))
        if out or expr == "neutral":
            expressions[expr] = out
    return CharacterRig(record["id"], arm, meshes, bone_map, expressions, record.get("face_landmarks"))

"""Inspection worker: import ONE asset in this process (bpy) and report facts as JSON.

    python -m serialgen.render.inspect_asset FILE [--json OUT]          # a character
    python -m serialgen.render.inspect_asset FILE --motions OUT.npz    # its animation clips

``render.asset_build.BlenderProbe`` starts this as a subprocess with a timeout, so a crashing or
hanging importer costs one asset and the build process never imports bpy. The last line of stdout
is always one JSON object: ``{"ok": true, ...facts}`` or ``{"ok": false, "reason", "detail"}``.
Decisions (accept/reject) are made by the scanners in ``assets_manifest`` from these facts.

Before importing, a file over ``--max-bytes`` (with a glTF's external resources) is ``too_large``
and a glTF image/buffer URI leading out of the file's folder is ``resource_outside_asset``; after
the import (FBX, .blend), so is any external file the data refers to outside that folder (texture
paths, libraries), judged from the path alone. Nothing outside is ever read or described.

Character facts: import time, armature count, the normalised rest bones (Z up, metres, facing -Y),
the bone mapping, meshes (skinned / bone-parented / unskinned), height and scale, textures (missing,
unreadable or blank; a missing one with the flat colour to show instead), the visible materials
(textured or the flat colour they show), shape keys, VRM expressions, a geometry fingerprint, action
names.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import stat
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from serialgen.assets_manifest.bone_maps import map_skeleton
from serialgen.assets_manifest.characters_scan import geometry_fingerprint
from serialgen.assets_manifest.gltf_probe import probe_gltf, resolve_uri
from serialgen.assets_manifest.manifest import format_bytes
from serialgen.render import importers as imp
from serialgen.render.bpy_utils import import_bpy, reset_scene

__all__ = ["inspect_character", "sample_motions", "external_files_check", "main"]


def _image_status(img) -> dict:
    bpy = import_bpy()

    info = {"name": img.name, "source": img.source, "packed": img.packed_file is not None,
            "filepath": img.filepath, "size": list(img.size)}
    if img.source not in ("FILE", "GENERATED"):
        info["status"] = "ok"
        return info
    if img.packed_file is None and img.source == "FILE":
        f = Path(bpy.path.abspath(img.filepath)) if img.filepath else None
        if f is None or not f.is_file():
            info["status"] = "missing"
            return info
    try:
        w, h = img.size
        if w == 0 or h == 0 or not img.has_data:
            img.reload()
            _ = img.pixels[0] if len(img.pixels) else None
            w, h = img.size
        if w == 0 or h == 0 or len(img.pixels) == 0:
            info["status"] = "unreadable"
            return info
        px = np.empty(len(img.pixels), dtype=np.float32)
        img.pixels.foreach_get(px)
        px = px.reshape(-1, img.channels if img.channels else 4)
        info["size"] = [int(w), int(h)]
        info["std"] = float(px[:, :3].std())
        info["mean"] = [round(float(v), 4) for v in px.mean(axis=0)]
        # Byte images hold sRGB-encoded values; a flat stand-in for this image (should its file go
        # missing later) is a Base Color, which is linear.
        lin = px[:, :3] if img.is_float or img.colorspace_settings.name != "sRGB" else np.where(
            px[:, :3] <= 0.04045, px[:, :3] / 12.92, ((px[:, :3] + 0.055) / 1.055) ** 2.4)
        alpha = px[:, 3] if px.shape[1] == 4 else np.ones(len(px), dtype=np.float32)
        info["mean_linear"] = [round(float(v), 4) for v in [*lin.mean(axis=0), alpha.mean()]]
        blank = float(np.ptp(px[:, :3], axis=0).max()) < 1e-3
        if px.shape[1] == 4 and float(px[:, 3].max()) < 1e-3:
            blank = True
        info["status"] = "blank" if blank else "ok"
    except (RuntimeError, ReferenceError) as e:
        info["status"] = "unreadable"
        info["error"] = str(e)[:200]
    return info


def _textures(meshes) -> list[dict]:
    seen, out = set(), []
    for ob in meshes:
        for slot in ob.material_slots:
            mat = slot.material
            if mat is None or mat.node_tree is None:
                continue
            for node in mat.node_tree.nodes:
                if node.type == "TEX_IMAGE":
                    img = node.image
                    if img is None:
                        continue
                    if img.name in seen:
                        continue
                    seen.add(img.name)
                    st = _image_status(img)
                    st["material"] = mat.name
                    out.append(st)
    return out


def _fail(reason: str, detail: str) -> dict:
    return {"ok": False, "reason": reason, "detail": detail}


def _resource_check(p: Path, max_bytes: int | None) -> dict | None:
    """Before anything is imported: the file's size, and for glTF/VRM every image/buffer URI inside
    the file's folder and the total size (``gltf_probe.probe_gltf``). A failure dict, or None."""
    kind = imp.format_of(p)
    if kind in ("gltf", "vrm"):
        probe = probe_gltf(p, max_bytes)
        return None if probe["ok"] else _fail(probe["reason"], probe["detail"])
    size = p.stat().st_size
    if max_bytes is not None and size > max_bytes:
        return _fail("too_large", f"{p.name}: {format_bytes(size)}, over the limit of {format_bytes(max_bytes)}")
    return None


def _resources(p: Path, probe: dict | None) -> list[dict]:
    """The external files the character reads (all inside its folder by now), with the size and
    mtime the scanner's re-scans compare: a changed, deleted or swapped texture is noticed even when
    the character file itself did not change."""
    bpy = import_bpy()
    files = {os.path.realpath(f) for f in bpy.utils.blend_paths(absolute=True, packed=True) if f}
    files.update((probe or {}).get("external_files") or [])  # glTF buffers too (Blender lists images only)
    out = []
    for f in sorted(files):
        try:
            st = os.stat(f)
            out.append({"path": f, "file_size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)})
        except OSError:
            out.append({"path": f, "file_size": None, "mtime_ns": None})
    return out


def external_files_check(p: Path, max_bytes: int | None = None) -> dict | None:
    """After an import of ``p``: every external file the loaded data refers to (FBX texture paths, a
    .blend's images, libraries, caches ...) must lie inside ``p``'s folder, judged from the path
    alone before it is looked at, and the whole must stay under ``max_bytes``. A failure dict
    (``{"ok": False, "reason", "detail"}``), or None. The render path's loader can call it after its
    own import of an FBX/.blend file that changed since the scan."""
    bpy = import_bpy()
    root = os.path.realpath(p.parent)
    paths = sorted({f for f in bpy.utils.blend_paths(absolute=True, packed=True) if f})
    for f in paths:
        real = os.path.realpath(f)
        if os.path.commonpath([real, root]) != root:
            # The path as the file wrote it (no resolved target: that could tell what exists outside).
            return _fail("resource_outside_asset", f"{p.name}: refers to {Path(f).name!r} outside the asset's folder")
    total = p.stat().st_size
    for f in paths:
        try:
            st = os.stat(f)
        except OSError:
            continue  # missing: the texture check reports it
        if not stat.S_ISREG(st.st_mode):
            return _fail("import_failed", f"{p.name}: refers to {Path(f).name!r}, which is not a regular file")
        total += st.st_size
    if max_bytes is not None and total > max_bytes:
        return _fail("too_large", f"{p.name}: {format_bytes(total)} with its {len(paths)} external file(s), over "
                                  f"the limit of {format_bytes(max_bytes)}")
    return None


def _upstream(socket) -> list:
    """Every node that feeds ``socket`` (through any chain of links)."""
    seen, stack, out = set(), [link.from_node for link in socket.links], []
    while stack:
        node = stack.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        out.append(node)
        for inp in node.inputs:
            stack.extend(link.from_node for link in inp.links)
    return out


def _materials(meshes, gltf_materials: list[dict]) -> list[dict]:
    """The materials the meshes show (on at least one face): name, whether the base colour is fed
    by anything (``linked``), the images feeding it, and the flat colour it shows without them
    (linear RGBA: the glTF ``baseColorFactor``, else the BSDF's Base Color / viewport colour)."""
    gltf = {m["name"]: m for m in gltf_materials}
    used: dict[str, object] = {}
    bare = False
    for ob in meshes:
        n = len(ob.data.polygons)
        if n == 0:
            continue
        idx = np.empty(n, dtype=np.int32)
        ob.data.polygons.foreach_get("material_index", idx)
        slots = ob.material_slots
        for k in np.unique(idx).tolist():
            mat = slots[k].material if 0 <= k < len(slots) else None
            if mat is None:
                bare = True
            else:
                used.setdefault(mat.name, mat)
    out = []
    for name, mat in used.items():
        colour = list(mat.diffuse_color)
        linked, images = False, []
        bsdf = next((nd for nd in mat.node_tree.nodes if nd.type == "BSDF_PRINCIPLED"), None) if mat.node_tree else None
        if bsdf is not None:
            sock = bsdf.inputs["Base Color"]
            colour = list(sock.default_value)
            linked = sock.is_linked
            images = [nd.image.name for nd in _upstream(sock) if nd.type == "TEX_IMAGE" and nd.image is not None]
        elif mat.node_tree is not None:
            feeds = [nd for nd in mat.node_tree.nodes if nd.type in ("TEX_IMAGE", "ATTRIBUTE", "VERTEX_COLOR")]
            linked = bool(feeds)
            images = [nd.image.name for nd in feeds if nd.type == "TEX_IMAGE" and nd.image is not None]
        g = gltf.get(re.sub(r"\.\d{3}$", "", name))
        if g is not None:
            colour = list(g["base_colour"])
        out.append({"name": name, "linked": bool(linked), "images": images,
                    "colour": [round(float(v), 4) for v in colour]})
    if bare:  # faces without a material render in Blender's default grey
        out.append({"name": None, "linked": False, "images": [], "colour": [0.8, 0.8, 0.8, 1.0]})
    return out


def _fallback_colours(textures: list[dict], materials: list[dict], gltf_materials: list[dict], probe) -> None:
    """Give every missing texture the colour to show instead (in place): its material's flat base
    colour (see :func:`_materials`). A missing image has no pixels, so its mean is not known."""
    by_image = {}
    for m in materials:
        for img in m["images"]:
            by_image.setdefault(img, m)
    images = (probe or {}).get("images") or []
    for t in textures:
        if t.get("status") != "missing":
            continue
        m = by_image.get(t["name"])
        if m is None and t.get("uri") is not None:
            # A glTF image Blender dropped: the material whose base colour texture shows it.
            index = next((i["index"] for i in images if i.get("uri") == t["uri"]), None)
            g = next((g for g in gltf_materials if index is not None and g["base_colour_image"] == index), None)
            if g is not None:
                m = {"name": g["name"], "colour": g["base_colour"]}
        t["material"] = t.get("material") or (m or {}).get("name")
        t["fallback_colour"] = [round(float(v), 4) for v in (m or {}).get("colour", [0.8, 0.8, 0.8, 1.0])]
        t["fallback_source"] = "base_colour" if m is not None else "default_grey"


def inspect_character(path: str, max_bytes: int | None = None) -> dict:
    """Import, map, normalise and describe one character file; first the checks that need no
    import (size, where a glTF's resources are), then, after the import, where every external file
    the data refers to is."""
    bpy = import_bpy()
    reset_scene()
    p = Path(path)
    kind = imp.format_of(p)
    failed = _resource_check(p, max_bytes)
    if failed is not None:
        return failed
    probe = probe_gltf(p, max_bytes) if kind in ("gltf", "vrm") else None
    gltf_materials = (probe or {}).get("materials") or []
    # Blender's importer silently drops missing images; report them from the JSON.
    missing_json = list(probe["missing_images"]) if probe is not None else []
    t0 = time.perf_counter()
    objects = imp.import_objects(p)
    t_import = time.perf_counter() - t0
    failed = external_files_check(p, max_bytes)
    if failed is not None:
        return failed
    bpy.context.view_layer.update()
    col = imp.collect_character(objects)
    arm = col["armature"]
    facts = {"ok": True, "format": kind, "import_s": round(t_import, 4), "armatures": col["armatures"],
             "n_objects": len(objects), "actions": [a.name for a in bpy.data.actions],
             "meshopt": bool(probe and probe.get("meshopt"))}
    if arm is None:
        facts.update(armature=False, meshes=[o.name for o in col["meshes"]],
                     n_vertices=sum(len(o.data.vertices) for o in col["meshes"]))
        return facts
    vrm = (probe or {}).get("vrm") if probe else None
    raw_bones = imp.world_bones(arm)
    mapping = map_skeleton(raw_bones, (vrm or {}).get("humanoid"), vrm1=bool(vrm and vrm.get("version") == 1))
    meshes = col["meshes"]
    if not meshes:
        facts.update(armature=True, n_bones=len(raw_bones), meshes=[], n_vertices=0, skinned=[],
                     bone_parented={}, unskinned=[], mapping=mapping.to_json(), bones=raw_bones)
        return facts
    norm = imp.normalise_character(arm, meshes, yaw_deg=mapping.yaw_deg,
                                   pelvis_bone=mapping.bone_map.get("pelvis"),
                                   head_bone=mapping.bone_map.get("head"), others=col["other"])
    alpha_fixed = imp.fix_material_alpha(meshes)
    bones = imp.world_bones(arm)
    verts = imp.rest_vertices(meshes)
    shape_keys = {}
    for ob in meshes:
        sk = ob.data.shape_keys
        if sk is not None:
            ref = sk.reference_key.name if sk.reference_key else None
            names = [k.name for k in sk.key_blocks if k.name != ref]
            if names:
                shape_keys[ob.name] = names
    textures = _textures(meshes)
    known = {os.path.realpath(bpy.path.abspath(t["filepath"])) for t in textures if t.get("filepath")}
    for uri in missing_json:
        f = resolve_uri(p.parent, uri)
        if f is not None and str(f) not in known:  # an image Blender's importer dropped
            textures.append({"name": uri, "uri": uri, "status": "missing", "source": "FILE", "packed": False,
                             "filepath": uri})
    materials = _materials(meshes, gltf_materials)
    _fallback_colours(textures, materials, gltf_materials, probe)
    facts.update(materials=materials, resources=_resources(p, probe),
        armature=True, n_bones=len(bones), bones=bones, mapping=mapping.to_json(),
        meshes=[{"name": o.name, "vertices": len(o.data.vertices)} for o in meshes],
        n_vertices=int(len(verts)), skinned=col["skinned"], bone_parented=col["bone_parented"],
        unskinned=col["unskinned"], normalise=norm, alpha_fixed=alpha_fixed, textures=textures,
        shape_keys=shape_keys, vrm_expressions=(vrm or {}).get("expressions") if vrm else None,
        fingerprint=geometry_fingerprint(verts),
        bounds=[verts.min(axis=0).round(4).tolist(), verts.max(axis=0).round(4).tolist()],
    )
    return facts


def sample_motions(path: str, out_npz: str, max_fps: float = 30.0, max_bytes: int | None = None) -> dict:
    """Sample every action of the file's main armature: world rotations and joint positions per
    frame (after the same size and resource checks as a character)."""
    bpy = import_bpy()
    reset_scene()
    p = Path(path)
    failed = _resource_check(p, max_bytes)
    if failed is not None:
        return failed
    t0 = time.perf_counter()
    objects = imp.import_objects(p)
    t_import = time.perf_counter() - t0
    failed = external_files_check(p, max_bytes)
    if failed is not None:
        return failed
    arms = [o for o in objects if o.type == "ARMATURE"]
    if not arms:
        return {"ok": False, "reason": "no_armature", "detail": "no armature in the file"}
    arm = max(arms, key=lambda a: len(a.data.bones))
    # Meshes only slow the per-frame evaluation down.
    for o in objects:
        if o.type == "MESH":
            bpy.data.objects.remove(o, do_unlink=True)
    bpy.context.view_layer.update()
    bones = imp.world_bones(arm)
    names = [b["name"] for b in bones]
    mw = np.array(arm.matrix_world, dtype=np.float64)
    rest = np.stack([np.array(arm.data.bones[n].matrix_local, dtype=np.float64) for n in names])
    rest_w = mw[None] @ rest
    rest_rot = _orthonormal(rest_w[:, :3, :3])
    scene = bpy.context.scene
    fps = scene.render.fps / (scene.render.fps_base or 1.0)
    stride = max(1, int(round(fps / max_fps))) if fps > max_fps else 1
    ad = arm.animation_data or arm.animation_data_create()
    actions = [a for a in bpy.data.actions if _drives(a, arm)]
    if hasattr(ad, "use_nla"):
        ad.use_nla = False
    for t in ad.nla_tracks:
        t.mute = True
    arrays = {"bones": np.array(json.dumps(bones)), "rest_rot": rest_rot}
    clips = []
    for a in actions:
        ad.action = a
        if getattr(ad, "action_slot", None) is None and len(getattr(a, "slots", [])):
            ad.action_slot = a.slots[0]
        f0, f1 = int(math.floor(a.frame_range[0])), int(math.ceil(a.frame_range[1]))
        frames = list(range(f0, f1 + 1, stride))
        rot = np.zeros((len(frames), len(names), 3, 3))
        pos = np.zeros((len(frames), len(names), 3))
        for k, f in enumerate(frames):
            scene.frame_set(f)
            m = mw[None] @ np.stack([np.array(arm.pose.bones[n].matrix, dtype=np.float64) for n in names])
            rot[k] = _orthonormal(m[:, :3, :3])
            pos[k] = m[:, :3, 3]
        arrays[f"rot_{len(clips)}"] = rot.astype(np.float32)
        arrays[f"pos_{len(clips)}"] = pos.astype(np.float32)
        clips.append({"name": a.name.split("|")[-1], "fps": fps / stride, "frames": len(frames)})
    arrays["clips"] = np.array(json.dumps(clips))
    np.savez_compressed(out_npz, **arrays)
    return {"ok": True, "import_s": round(t_import, 4), "clips": clips, "n_bones": len(names)}


def _drives(action, arm) -> bool:
    """True when an action animates pose bones of ``arm`` (by data path)."""
    paths = []
    try:
        for layer in action.layers:
            for strip in layer.strips:
                for bag in strip.channelbags:
                    paths += [fc.data_path for fc in bag.fcurves]
    except AttributeError:  # legacy actions
        paths = [fc.data_path for fc in getattr(action, "fcurves", [])]
    bones = set(arm.data.bones.keys())
    for p in paths:
        if p.startswith('pose.bones["'):
            name = p[len('pose.bones["'):].split('"]', 1)[0]
            if name in bones:
                return True
    return False


def _orthonormal(m: np.ndarray) -> np.ndarray:
    """Strip scale from (…, 3, 3) matrices (polar decomposition via SVD)."""
    u, _s, vt = np.linalg.svd(m)
    r = u @ vt
    det = np.linalg.det(r)
    u[..., :, -1] *= np.sign(det)[..., None]
    return u @ vt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serialgen.render.inspect_asset",
                                 description="Import one asset with bpy and print its facts as JSON (last stdout line).")
    ap.add_argument("file")
    ap.add_argument("--json", default=None, help="also write the JSON here")
    ap.add_argument("--motions", default=None, metavar="NPZ", help="sample the file's animation clips into NPZ")
    ap.add_argument("--max-fps", type=float, default=30.0)
    ap.add_argument("--max-bytes", type=int, default=None, help="size limit of the file with its resources")
    args = ap.parse_args(argv)
    try:
        if args.motions:
            res = sample_motions(args.file, args.motions, args.max_fps, args.max_bytes)
        else:
            res = inspect_character(args.file, args.max_bytes)
    except Exception as e:  # noqa: BLE001 - the worker reports, the scanner decides
        if isinstance(e, imp.ImportFailed):
            res = {"ok": False, "reason": e.reason, "detail": str(e)}
        else:
            res = {"ok": False, "reason": "import_failed", "detail": f"{type(e).__name__}: {e}"[:500],
                   "traceback": traceback.format_exc()[-2000:]}
    line = json.dumps(res)
    if args.json:
        Path(args.json).write_text(line)
    sys.stdout.write("\n" + line + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

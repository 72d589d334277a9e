"""Inspection worker: import ONE asset in this process (bpy) and report facts as JSON.

    python -m serialgen.render.inspect_asset FILE [--json OUT]          # a character
    python -m serialgen.render.inspect_asset FILE --motions OUT.npz    # its animation clips

``render.asset_build.BlenderProbe`` starts this as a subprocess with a timeout, so a crashing or
hanging importer costs one asset and the build process never imports bpy. The last line of stdout
is always one JSON object: ``{"ok": true, ...facts}`` or ``{"ok": false, "reason", "detail"}``.
Decisions (accept/reject) are made by the scanners in ``assets_manifest`` from these facts.

Character facts: import time, armature count, the normalised rest bones (Z up, metres, facing -Y),
the bone mapping, meshes (skinned / bone-parented / unskinned), height and scale, textures (missing,
unreadable or blank), shape keys, VRM expressions, a geometry fingerprint, action names.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from serialgen.assets_manifest.bone_maps import map_skeleton
from serialgen.assets_manifest.characters_scan import geometry_fingerprint
from serialgen.assets_manifest.gltf_probe import probe_gltf
from serialgen.render import importers as imp
from serialgen.render.bpy_utils import import_bpy, reset_scene

__all__ = ["inspect_character", "sample_motions", "main"]


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


def inspect_character(path: str) -> dict:
    """Import, map, normalise and describe one character file."""
    bpy = import_bpy()
    reset_scene()
    p = Path(path)
    kind = imp.format_of(p)
    probe = probe_gltf(p) if kind in ("gltf", "vrm") else None
    if probe is not None and probe.get("ok") and probe["missing_images"]:
        # Blender's importer silently drops missing images; report them from the JSON.
        missing_json = list(probe["missing_images"])
    else:
        missing_json = []
    t0 = time.perf_counter()
    objects = imp.import_objects(p)
    t_import = time.perf_counter() - t0
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
    for uri in missing_json:
        textures.append({"name": uri, "status": "missing", "source": "FILE", "packed": False, "filepath": uri})
    facts.update(
        armature=True, n_bones=len(bones), bones=bones, mapping=mapping.to_json(),
        meshes=[{"name": o.name, "vertices": len(o.data.vertices)} for o in meshes],
        n_vertices=int(len(verts)), skinned=col["skinned"], bone_parented=col["bone_parented"],
        unskinned=col["unskinned"], normalise=norm, alpha_fixed=alpha_fixed, textures=textures,
        shape_keys=shape_keys, vrm_expressions=(vrm or {}).get("expressions") if vrm else None,
        fingerprint=geometry_fingerprint(verts),
        bounds=[verts.min(axis=0).round(4).tolist(), verts.max(axis=0).round(4).tolist()],
    )
    return facts


def sample_motions(path: str, out_npz: str, max_fps: float = 30.0) -> dict:
    """Sample every action of the file's main armature: world rotations and joint positions per frame."""
    bpy = import_bpy()
    reset_scene()
    t0 = time.perf_counter()
    objects = imp.import_objects(path)
    t_import = time.perf_counter() - t0
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
    args = ap.parse_args(argv)
    try:
        if args.motions:
            res = sample_motions(args.file, args.motions, args.max_fps)
        else:
            res = inspect_character(args.file)
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

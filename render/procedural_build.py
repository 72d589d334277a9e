"""``CharacterMesh`` (numpy, from ``assets_manifest.procedural``) -> Blender objects -> ``CharacterRig``.

Builds, in one new collection: an armature from the bone heads/tails/parents (rest = the canonical
A-pose), the body mesh (triangles, UVs, one material per region, vertex groups from the top-4
weights, an Armature modifier, one shape key per expression) and the extra parts (hair, skirt),
skinned to the same armature. Materials are Principled BSDF with the region colour; patterned
clothing regions sample the character's texture atlas through an Image Texture node that is the
active node, so Workbench in ``TEXTURE`` colour mode shows the pattern; ``diffuse_color`` carries
the flat colour for Workbench ``MATERIAL`` mode.
"""

from __future__ import annotations

import numpy as np

from serialgen.assets_manifest import skeleton as sk
from serialgen.assets_manifest.procedural import REGION_NAMES, CharacterMesh
from serialgen.render.bpy_utils import import_bpy, srgb_to_linear
from serialgen.render.rig import CharacterRig

__all__ = ["build_character", "EXPRESSION_KEY_PREFIX"]

EXPRESSION_KEY_PREFIX = "expr_"


def _new_mesh(bpy, name: str, verts: np.ndarray, faces: np.ndarray):
    me = bpy.data.meshes.new(name)
    me.vertices.add(len(verts))
    me.vertices.foreach_set("co", np.ascontiguousarray(verts, dtype=np.float32).ravel())
    n_f = len(faces)
    me.loops.add(n_f * 3)
    me.loops.foreach_set("vertex_index", np.ascontiguousarray(faces, dtype=np.int32).ravel())
    me.polygons.add(n_f)
    me.polygons.foreach_set("loop_start", np.arange(0, 3 * n_f, 3, dtype=np.int32))
    me.update(calc_edges=True)
    me.validate(clean_customdata=False)
    return me


def _set_uvs(me, loop_uvs: np.ndarray) -> None:
    layer = me.uv_layers.new(name="UVMap")
    layer.data.foreach_set("uv", np.ascontiguousarray(loop_uvs, dtype=np.float32).ravel())


def _atlas_image(bpy, name: str, texture: np.ndarray):
    size_y, size_x = texture.shape[:2]
    img = bpy.data.images.new(name, width=size_x, height=size_y, alpha=False)
    # Colour space first: changing it later regenerates (blanks) a generated image's buffer.
    img.colorspace_settings.name = "sRGB"
    rgba = np.ones((size_y, size_x, 4), dtype=np.float32)
    rgba[..., :3] = texture[::-1].astype(np.float32) / 255.0  # Blender rows go up
    img.pixels.foreach_set(rgba.ravel())
    img.pack()
    return img


def _material(bpy, name: str, srgb, image=None):
    mat = bpy.data.materials.new(name)
    lin = srgb_to_linear(srgb)
    mat.diffuse_color = (*lin.tolist(), 1.0)
    mat.roughness = 0.8
    if hasattr(mat, "use_nodes"):
        mat.use_nodes = True
    nodes = mat.node_tree.nodes
    bsdf = next((n for n in nodes if n.type == "BSDF_PRINCIPLED"), None)
    if bsdf is None:
        bsdf = nodes.new("ShaderNodeBsdfPrincipled")
        out = next((n for n in nodes if n.type == "OUTPUT_MATERIAL"), None) or nodes.new("ShaderNodeOutputMaterial")
        mat.node_tree.links.new(bsdf.outputs["BSDF"], out.inputs["Surface"])
    bsdf.inputs["Base Color"].default_value = (*lin.tolist(), 1.0)
    bsdf.inputs["Roughness"].default_value = 0.8
    if image is not None:
        tex = nodes.new("ShaderNodeTexImage")
        tex.image = image
        tex.interpolation = "Closest" if image.size[0] <= 256 else "Linear"
        mat.node_tree.links.new(tex.outputs["Color"], bsdf.inputs["Base Color"])
        nodes.active = tex
    return mat


def _skin(obj, bone_names: list[str], idx: np.ndarray, val: np.ndarray) -> None:
    """Vertex groups from top-4 weights: one ``add`` call per (bone, weight) value group."""
    groups = {}
    for b in np.unique(idx[val > 0]):
        groups[int(b)] = obj.vertex_groups.new(name=bone_names[int(b)])
    q = np.round(val.astype(np.float64), 4)
    pairs = np.stack([idx.ravel().astype(np.int64), np.round(q.ravel() * 10000).astype(np.int64)], 1)
    vert = np.repeat(np.arange(len(idx)), idx.shape[1])
    keep = pairs[:, 1] > 0
    pairs, vert = pairs[keep], vert[keep]
    order = np.lexsort((pairs[:, 1], pairs[:, 0]))
    pairs, vert = pairs[order], vert[order]
    cut = np.nonzero(np.any(np.diff(pairs, axis=0) != 0, axis=1))[0] + 1
    for chunk_pairs, chunk_verts in zip(np.split(pairs, cut), np.split(vert, cut)):
        b, w = int(chunk_pairs[0, 0]), chunk_pairs[0, 1] / 10000.0
        groups[b].add(chunk_verts.tolist(), float(w), "REPLACE")


def _armature(bpy, name: str, mesh: CharacterMesh, collection):
    data = bpy.data.armatures.new(name)
    obj = bpy.data.objects.new(name, data)
    collection.objects.link(obj)
    view_layer = bpy.context.view_layer
    view_layer.objects.active = obj
    obj.select_set(True)
    bpy.ops.object.mode_set(mode="EDIT")
    ebs = []
    for b, bname in enumerate(mesh.bone_names):
        eb = data.edit_bones.new(bname)
        eb.head = mesh.bone_heads[b].tolist()
        eb.tail = mesh.bone_tails[b].tolist()
        eb.align_roll(mesh.bone_z_axes[b].tolist())
        ebs.append(eb)
    for b, p in enumerate(mesh.bone_parents):
        if p >= 0:
            ebs[b].parent = ebs[int(p)]
            ebs[b].use_connect = False
    bpy.ops.object.mode_set(mode="OBJECT")
    obj.select_set(False)
    return obj


def _attach(obj, arm_obj) -> None:
    obj.parent = arm_obj
    mod = obj.modifiers.new("Armature", "ARMATURE")
    mod.object = arm_obj
    mod.use_vertex_groups = True


def build_character(mesh: CharacterMesh, collection=None) -> CharacterRig:
    """Create the Blender objects of ``mesh`` and return its ``CharacterRig``."""
    bpy = import_bpy()
    cid = mesh.char_id
    coll = bpy.data.collections.new(cid)
    (collection or bpy.context.scene.collection).children.link(coll)
    arm_obj = _armature(bpy, f"{cid}_armature", mesh, coll)

    # Body.
    me = _new_mesh(bpy, f"{cid}_body", mesh.vertices, mesh.faces)
    _set_uvs(me, mesh.uv_coords[mesh.face_uvs].reshape(-1, 2))
    image = _atlas_image(bpy, f"{cid}_atlas", mesh.texture) if mesh.textured_regions else None
    slot = {}
    for r in sorted(set(np.unique(mesh.face_region).tolist())):
        name = REGION_NAMES[r]
        mat = _material(bpy, f"{cid}_{name}", mesh.region_colors[r],
                        image if name in mesh.textured_regions else None)
        slot[r] = mat
    body_slots = sorted(set(np.unique(mesh.face_region).tolist()))
    for r in body_slots:
        me.materials.append(slot[r])
    lookup = np.zeros(len(REGION_NAMES), dtype=np.int32)
    lookup[body_slots] = np.arange(len(body_slots))
    me.polygons.foreach_set("material_index", lookup[mesh.face_region.astype(np.int64)])
    me.polygons.foreach_set("use_smooth", np.ones(len(mesh.faces), dtype=bool))
    body = bpy.data.objects.new(f"{cid}_body", me)
    coll.objects.link(body)
    _skin(body, mesh.bone_names, mesh.weight_indices, mesh.weight_values)
    _attach(body, arm_obj)

    # Expressions as shape keys on the body.
    expressions = {}
    if mesh.expression_names:
        body.shape_key_add(name="Basis", from_mix=False)
        base = mesh.vertices.astype(np.float32)
        for name in mesh.expression_names:
            vi, delta = mesh.expression(name)
            co = base.copy()
            co[vi] += delta
            key = body.shape_key_add(name=EXPRESSION_KEY_PREFIX + name, from_mix=False)
            key.data.foreach_set("co", co.ravel())
            key.value = 0.0
            expressions[name] = [(body.name, key.name, 1.0)]

    meshes = [body]
    for part in mesh.parts:
        pm = _new_mesh(bpy, f"{cid}_{part.name}", part.vertices, part.faces)
        _set_uvs(pm, part.uvs[part.faces].reshape(-1, 2))
        # Parts have UVs of their own: never the body atlas; their own pattern texture or flat.
        part_img = _atlas_image(bpy, f"{cid}_{part.name}_texture", part.texture) if part.texture.size else None
        pm.materials.append(_material(bpy, f"{cid}_{part.name}", mesh.region_colors[part.region], part_img))
        pm.polygons.foreach_set("use_smooth", np.ones(len(part.faces), dtype=bool))
        po = bpy.data.objects.new(f"{cid}_{part.name}", pm)
        coll.objects.link(po)
        _skin(po, mesh.bone_names, part.weight_indices, part.weight_values)
        _attach(po, arm_obj)
        meshes.append(po)

    landmarks = {k: tuple(v) for k, v in mesh.face_landmarks.items()}
    rig = CharacterRig(cid, arm_obj, meshes, mesh.bone_map, expressions, landmarks, owned=[coll])
    rig.apply_pose(np.zeros((len(sk.JOINTS), 3)))
    return rig

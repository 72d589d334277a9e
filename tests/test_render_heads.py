"""Heads of real characters (real bpy renders, tiny frames): the measured head geometry drives the
standard form, the head/upper-body framings and the face landmarks (``docs/rendering.md``).

Characters: Knight (KayKit chibi, head ~5 head-bone lengths tall with its helmet), RobotExpressive
(head wider than the body), CesiumMan (a head ~3.5 bone lengths), all from ../shared/assets (skip
when absent), plus one procedural character (measured landmarks of its own, must not regress).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest


W, H = 96, 144
REAL = {"Knight": "kaykit/Knight.glb", "RobotExpressive": "quaternius/RobotExpressive.glb",
        "CesiumMan": "khronos/CesiumMan.glb"}
FACE = ("nose", "l_eye", "r_eye")


@pytest.fixture(scope="module")
def characters(shared_assets, tmp_path_factory):
    """(assets dir, {name: accepted manifest record}) for the three real and one procedural character."""
    from serialgen.assets_manifest.characters_scan import scan_characters
    from serialgen.render.asset_build import BlenderProbe
    from serialgen.assets_manifest.procedural import build_mesh_data, describe_character, save_mesh_data

    root = tmp_path_factory.mktemp("heads")
    files = [shared_assets / "characters" / rel for rel in REAL.values()]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        pytest.skip(f"real test characters not found: {missing}")
    by_path = {Path(r["path"]).name: r for r in scan_characters(files, probe=BlenderProbe())}
    records = {}
    for name, rel in REAL.items():
        rec = by_path[Path(rel).name]
        assert rec["status"] == "accepted", rec
        records[name] = rec
    desc = describe_character("proc-000001", 0)
    save_mesh_data(build_mesh_data(desc), root / "meshes" / "proc-000001.npz")
    records["procedural"] = {"schema": "serialgen.character/1", "id": "proc-000001", "kind": "procedural",
                             "status": "accepted", "mesh_file": "meshes/proc-000001.npz",
                             "expressions": desc["expressions"]}
    return root, records


@pytest.fixture(scope="module")
def library():
    from serialgen.assets_manifest.poses import build_pose_library

    return build_pose_library(40, seed=0)


@pytest.fixture(scope="module")
def worker(library):
    from serialgen.render.job import BlenderWorker
    from serialgen.render.scene import RenderSettings

    w = BlenderWorker(RenderSettings(width=W, height=H, threads=2))
    w.pose_library_override = library
    yield w
    w.unload()


def _png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)))


def _project(camera_json: dict, pts: np.ndarray) -> np.ndarray:
    """Pixels (N, 2) of world points through a meta.json camera (K and world_to_camera)."""
    k, e = np.array(camera_json["K"]), np.array(camera_json["world_to_camera"])
    q = pts @ e[:3, :3].T + e[:3, 3]
    return (q[:, :2] / q[:, 2:]) @ k[:2, :2].T + k[:2, 2]


def _head_vertices(rig) -> np.ndarray:
    """Evaluated world vertices whose dominant bone is the head bone or a descendant (measured
    here independently of ``head_geometry``)."""
    from serialgen.render.bpy_utils import import_bpy

    bpy = import_bpy()
    arm = rig.armature
    head_bone = arm.data.bones[rig.bone_map["head"]]
    head_set = {head_bone.name, *(c.name for c in head_bone.children_recursive)}
    dg = bpy.context.evaluated_depsgraph_get()
    out = []
    for obj in rig.meshes:
        names = [g.name for g in obj.vertex_groups]
        keep = []
        for v in obj.data.vertices:
            ws = [(g.weight, names[g.group]) for g in v.groups if names[g.group] in arm.data.bones]
            keep.append(bool(ws) and max(ws)[1] in head_set)
        if not any(keep):
            continue
        ev = obj.evaluated_get(dg)
        me = ev.to_mesh()
        co = np.array([list(v.co) for v in me.vertices])
        ev.to_mesh_clear()
        m = np.array(obj.matrix_world)
        out.append((co @ m[:3, :3].T + m[:3, 3])[np.array(keep)])
    return np.concatenate(out)


def _job(record, assets, out, library, k):
    from serialgen.dataset.shards import split_of
    from serialgen.render.job import RenderJob

    split = split_of(record["id"])
    return RenderJob(record, str(assets), str(out), f"{split}/{record['id']}-p000000-{k:06d}.tar", split, 0, k,
                     k, 0, "unused")


def _samples(result, out):
    from serialgen.dataset.shards import iter_shard

    assert result["status"] == "ok", result.get("traceback")
    return list(iter_shard(Path(out) / result["shard"]["path"]))


@pytest.mark.blender
def test_head_geometry_is_the_head_mesh(worker, characters, library):
    """The measured head points move rigidly with the head and lie on the evaluated head mesh;
    the chibis' heads are several head-bone lengths tall, a human's about 1.5."""
    from scipy.spatial import cKDTree

    assets, records = characters
    ratio = {}
    for name, record in records.items():
        rig = worker._load_character(record, str(assets)).rig
        geo = rig.head_geometry
        assert geo.source in ("weights", "influence"), (name, geo.source)
        rig.apply_pose(library.angles[7], library.root_translation[7])
        skel = rig.posed_skeleton()
        dist, _ = cKDTree(_head_vertices(rig)).query(geo.world_points(skel))
        assert np.median(dist) < 1e-3 and dist.max() < 0.03 * geo.height, (name, dist.max())
        ratio[name] = geo.height / geo.bone_length
    assert ratio["Knight"] > 4.0 and ratio["RobotExpressive"] > 4.0 and ratio["CesiumMan"] > 2.5
    assert 1.3 < ratio["procedural"] < 2.2, ratio


@pytest.mark.blender
def test_standard_image_face_at_the_documented_place(worker, characters, library, tmp_path):
    """The face box (eyes, mouth) is at the standard place for chibis, robots and humans alike; the
    head box (helmets and hats included) is what ``std.fit`` checks against the frame."""
    from serialgen.assets_manifest.geometry.standard_form import STANDARD_FACE_CENTER, STANDARD_FACE_SIDE, standard_angles

    assets, records = characters
    for name, record in records.items():
        from serialgen.dataset.shards import iter_shard

        result = worker.run(_job(record, assets, tmp_path / name, library, 1))
        (key, sample), = _samples(result, tmp_path / name)
        (_, standard), = iter_shard(tmp_path / name / result["standard"]["path"])
        std = _png(standard["std.png"])
        meta = {"std": json.loads(standard["meta.json"])}
        box = meta["std"]["face_box"]
        assert box["center"] == pytest.approx([STANDARD_FACE_CENTER[0] * W, STANDARD_FACE_CENTER[1] * H], abs=0.01), name
        assert box["side"] == pytest.approx(STANDARD_FACE_SIDE * H, abs=0.01), name
        rig = worker._loaded.rig
        rig.set_expression(None)
        rig.apply_pose(standard_angles())
        uv = _project(meta["std"]["camera"], _head_vertices(rig))
        lo, hi = uv.min(0), uv.max(0)
        fit = meta["std"]["fit"]
        assert fit["head_inside"] == bool(lo[1] >= 0 and lo[0] >= 0 and hi[0] <= W), (name, fit, lo, hi)
        if fit["head_inside"]:  # white above the head: hats and helmets are the top of the character
            top = int(np.floor(lo[1] - 0.02 * H))
            assert top <= 0 or (std[:top] == 255).all(), name
        pose = json.loads(standard["std_pose.json"])
        kp = {n: pose["keypoints"][i] for i, n in enumerate(pose["names"])}
        for n in FACE:  # on the face: visible, inside the head box, on drawn pixels
            x, y, v = kp[n]
            assert v, (name, n)
            assert lo[0] <= x <= hi[0] and lo[1] <= y <= hi[1], (name, n, x, y)
            assert (std[int(y), int(x)] < 250).any(), (name, n)
        assert kp["l_eye"][0] > kp["nose"][0] > kp["r_eye"][0], name  # front view, mirrored
        assert kp["l_eye"][1] < kp["nose"][1] and kp["r_eye"][1] < kp["nose"][1], name  # eyes above


@pytest.mark.blender
def test_head_close_up_shows_the_head(worker, characters):
    from serialgen.assets_manifest.skeleton import KEYPOINT_NAMES
    from serialgen.assets_manifest.geometry import camera as cm
    from serialgen.render.camera import apply_camera

    assets, records = characters
    for name, record in records.items():
        loaded = worker._load_character(record, str(assets))
        rig = loaded.rig
        rig.set_expression(None)
        rig.apply_pose(np.zeros((len(rig.posed_skeleton().names), 3)))
        skel = rig.posed_skeleton()
        for azimuth in (0.0, 35.0, -30.0):
            view = cm.ViewSample(azimuth, 10.0, 50.0, "head", 0.55, (0.2, -0.2))
            cam = worker.view_camera(rig, view, skel)
            apply_camera(worker.scene.camera, cam)
            alpha = worker._render(worker.scene)[..., 3]
            assert (alpha > 0).mean() > 0.2, (name, azimuth, (alpha > 0).mean())
            (cx, cy), = cam.project(rig.head_geometry.world_center(skel)[None])[0]
            assert alpha[int(cy), int(cx)] > 0, (name, azimuth)
            kps, _ = worker._keypoints(loaded, cam, skel)
            for n in FACE:
                x, y, v = kps[KEYPOINT_NAMES.index(n)]
                assert v, (name, azimuth, n)
                assert alpha[int(y), int(x)] > 0, (name, azimuth, n)


@pytest.mark.blender
@pytest.mark.slow
def test_no_view_puts_the_camera_in_the_character(worker, characters, library, tmp_path):
    """30 drawn views per character through the real job: the camera is outside the posed mesh
    bounds by the clearance, every frame shows a good part of the character, and visible keypoints
    fall on the silhouette (>= 95% for the real characters)."""
    from serialgen.assets_manifest.geometry import camera as cm
    from serialgen.render.camera import apply_camera

    assets, records = characters
    inside = total = 0
    for name, record in records.items():
        out = tmp_path / name
        samples = _samples(worker.run(_job(record, assets, out, library, 30)), out)
        assert len(samples) == 30
        rig = worker._loaded.rig
        for key, sample in samples:
            meta = json.loads(sample["meta.json"])
            rig.set_expression(meta["expression"])
            rig.apply_pose(library.angles[meta["pose_id"]], library.root_translation[meta["pose_id"]])
            pts = rig.evaluated_vertices()
            lo, hi = pts.min(0), pts.max(0)
            margin = cm.clearance_for(lo, hi)
            loc = np.array(meta["camera"]["location"])
            assert ((loc <= lo - margin + 1e-4) | (loc >= hi + margin - 1e-4)).any(), (key, loc, lo, hi)
            # What the camera sees is farther than the near clip plane and most of the clearance
            # (mesh points behind the camera, such as the feet under a face close-up, do not count).
            depth = (pts - loc) @ -cm.view_direction(meta["view"]["azimuth"], meta["view"]["elevation"])
            uv = _project(meta["camera"], pts)
            seen = (depth > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < W) & (uv[:, 1] >= 0) & (uv[:, 1] < H)
            assert seen.any() and depth[seen].min() > max(0.5 * margin, cm.CLIP_START), key
            alpha = _png(sample["ref.png"])[..., 3]
            cover = (alpha > 0).mean()
            # A round head spanning fill (>= 0.4) of the frame width covers ~ fill^2 W/H pi/4 >= 8%.
            assert cover > (0.07 if meta["framing"] == "head" else 0.05), (key, meta["framing"], cover)
            if name != "procedural":
                kps = np.array(json.loads(sample["ref_pose.json"])["keypoints"])
                vis = kps[kps[:, 2] > 0]
                xs = np.clip(vis[:, 0].astype(int), 0, W - 1)
                ys = np.clip(vis[:, 1].astype(int), 0, H - 1)
                inside += int((alpha[ys, xs] > 0).sum())
                total += len(vis)
    assert total > 300
    assert inside / total >= 0.95, f"{inside}/{total} visible keypoints inside the silhouette"


def test_keep_clear_and_head_fallbacks():
    """Pure numpy: a camera inside the grown bounds is pushed out along its axis; a degenerate head
    region falls back to the influence region, then to the bone box; a sphere with a nose gets its
    nose on the nose and its eyes above it on the front surface."""
    from serialgen.assets_manifest.geometry import camera as cm
    from serialgen.assets_manifest.geometry.head import HeadGeometry, measure_head

    cam = cm.CameraSpec(np.array([0.0, -0.2, 1.0]), cm.look_rotation([0.0, 1.0, 0.0]), 50.0, W, H)
    moved = cm.keep_clear(cam, np.array([0.0, -1.0, 0.0]), np.array([-0.5, -0.3, 0.0]), np.array([0.5, 0.3, 1.8]), 0.1)
    assert moved == pytest.approx(0.2, abs=1e-4) and cam.location[1] == pytest.approx(-0.4, abs=1e-4)
    assert cm.keep_clear(cam, np.array([0.0, -1.0, 0.0]), np.array([-0.5, -0.3, 0.0]), np.array([0.5, 0.3, 1.8]), 0.1) == 0.0

    # A unit-ish sphere head (radius 0.1 m, centre 0.1 m above the head joint) with a nose bump.
    u, v = np.meshgrid(np.linspace(0, np.pi, 25), np.linspace(0, 2 * np.pi, 48, endpoint=False), indexing="ij")
    pts = np.stack([np.sin(u) * np.sin(v), -np.sin(u) * np.cos(v), np.cos(u)], -1).reshape(-1, 3) * 0.1
    nose_dir = np.array([0.0, -1.0, -0.15]) / np.linalg.norm([0.0, -1.0, -0.15])
    pts = pts + 0.03 * np.clip((pts / 0.1) @ nose_dir - 0.97, 0, None)[:, None] / 0.03 * nose_dir[None]
    pts[:, 2] += 0.1
    n_v = 48
    tris = [(i * n_v + j, (i + 1) * n_v + j, (i + 1) * n_v + (j + 1) % n_v) for i in range(24) for j in range(n_v)]
    tris += [(i * n_v + j, (i + 1) * n_v + (j + 1) % n_v, i * n_v + (j + 1) % n_v) for i in range(24) for j in range(n_v)]
    dominant = np.ones(len(pts), bool)
    geo = measure_head(pts, dominant, np.ones(len(pts)), 0.12, np.array(tris))
    assert geo.source == "weights" and geo.height == pytest.approx(0.2, abs=0.01)
    nose, l_eye, r_eye = (np.array(geo.landmarks[k]) * 0.12 for k in ("nose", "l_eye", "r_eye"))
    assert nose[1] < -0.1 and abs(nose[0]) < 0.01  # on the bump, in front of the sphere
    assert l_eye[0] > 0.02 > -0.02 > r_eye[0] and l_eye[2] > nose[2] and r_eye[2] > nose[2]
    assert -0.1 < l_eye[1] < -0.07  # on the front surface, not on the box face
    # Degenerate regions: two dominant vertices -> the influence region; nothing -> the bone box.
    few = np.zeros(len(pts), bool)
    few[:2] = True
    assert measure_head(pts, few, np.full(len(pts), 0.2), 0.12).source == "influence"
    bone = measure_head(pts, few, np.zeros(len(pts)), 0.12)
    assert bone.source == "bone" and bone.landmarks == {}
    assert bone.height == pytest.approx(HeadGeometry.from_bone(0.12).height)

"""Real bpy renders (small, 128x192): keypoints vs silhouette, the standard form, expressions,
determinism, and the shard a job writes. Characters: the mannequin variants (child, adult, heavy)
and, when the procedural characters are available, procedural ones too."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

pytestmark = pytest.mark.blender

W, H = 128, 192
VARIANTS = ("child", "adult", "heavy")


def _record(variant):
    return {"id": f"mannequin-{variant}", "kind": "mannequin", "variant": variant, "status": "accepted"}


@pytest.fixture(scope="module")
def poses_path(tmp_path_factory):
    from serialgen.assets_manifest.poses import build_pose_library, save_pose_library

    path = tmp_path_factory.mktemp("assets") / "poses.npz"
    save_pose_library(build_pose_library(40, seed=0), path)
    return path


@pytest.fixture(scope="module")
def worker():
    from serialgen.render.job import BlenderWorker
    from serialgen.render.scene import RenderSettings

    w = BlenderWorker(RenderSettings(width=W, height=H, threads=2))
    yield w
    w.unload()


def _job(record, out, poses_path, k=4, seed=0):
    from serialgen.dataset.shards import split_of
    from serialgen.render.job import RenderJob

    split = split_of(record["id"])
    return RenderJob(record, "", str(out), f"{split}/{record['id']}-p000000-{k:06d}.tar", split, 0, k, k, seed,
                     str(poses_path))


def _samples(result, out):
    from serialgen.dataset.shards import iter_shard

    assert result["status"] == "ok", result.get("traceback")
    return list(iter_shard(out / result["shard"]["path"]))


def _png(data):
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)))


def test_projection_matches_blender(worker):
    import bpy
    from bpy_extras.object_utils import world_to_camera_view
    from mathutils import Vector

    from serialgen.render import camera as cm

    scene = worker.scene
    pts = np.random.default_rng(1).normal(0.0, 0.4, (6, 3)) + [0.0, 0.0, 1.0]
    view = cm.ViewSample(70.0, 20.0, 50.0, "full_body", 0.8, (0.3, -0.2))
    cam = cm.fit_camera(view, pts, W, H)
    cam.shift_x, cam.shift_y = 0.05, -0.2
    cm.apply_camera(scene.camera, cam)
    bpy.context.view_layer.update()
    uv, _ = cam.project(pts)
    ref = np.array([world_to_camera_view(scene, scene.camera, Vector(p))[:2] for p in pts])
    np.testing.assert_allclose(uv, np.stack([ref[:, 0] * W, (1 - ref[:, 1]) * H], 1), atol=1e-3)


def test_visible_keypoints_inside_silhouette(worker, poses_path, tmp_path):
    inside = total = 0
    for variant in VARIANTS:
        result = worker.run(_job(_record(variant), tmp_path, poses_path, k=5))
        for key, sample in _samples(result, tmp_path):
            alpha = _png(sample["ref.png"])[..., 3]
            assert alpha.shape == (H, W)
            kps = np.array(json.loads(sample["ref_pose.json"])["keypoints"])
            vis = kps[kps[:, 2] > 0]
            x = np.clip(vis[:, 0].astype(int), 0, W - 1)
            y = np.clip(vis[:, 1].astype(int), 0, H - 1)
            inside += int((alpha[y, x] > 0).sum())
            total += len(vis)
    assert total > 100  # enough visible points for the rate to mean something
    assert inside / total >= 0.95, f"{inside}/{total} visible keypoints inside the silhouette"


def test_standard_image_places_the_head(worker, poses_path, tmp_path):
    from serialgen.render.standard import STANDARD_HEAD_CENTER, STANDARD_HEAD_HEIGHT

    heights = []
    for variant in VARIANTS:
        result = worker.run(_job(_record(variant), tmp_path, poses_path, k=1))
        (key, sample), = _samples(result, tmp_path)
        std = _png(sample["std.png"])
        assert std.shape == (H, W, 3)
        border = np.concatenate([std[0], std[-1], std[:, 0], std[:, -1]])
        assert (border == 255).all(), "standard image border is not pure white"
        assert (std < 250).any(axis=-1).sum() > 0.03 * W * H  # a character is drawn
        meta = json.loads(sample["meta.json"])
        box = meta["std"]["head_box"]
        assert abs(box["center"][0] - STANDARD_HEAD_CENTER[0] * W) <= 0.02 * H
        assert abs(box["center"][1] - STANDARD_HEAD_CENTER[1] * H) <= 0.02 * H
        assert abs(box["height"] - STANDARD_HEAD_HEIGHT * H) <= 0.02 * H
        pose = json.loads(sample["std_pose.json"])
        names = pose["names"]
        kp = {n: pose["keypoints"][i] for i, n in enumerate(names)}
        # Eyes sit at mid head height (face landmarks), visible, left/right mirrored about the centre.
        eyes_y = (kp["l_eye"][1] + kp["r_eye"][1]) / 2
        eyes_x = (kp["l_eye"][0] + kp["r_eye"][0]) / 2
        assert kp["l_eye"][2] and kp["r_eye"][2] and kp["nose"][2]
        assert abs(eyes_y - STANDARD_HEAD_CENTER[1] * H) <= 0.02 * H
        assert abs(eyes_x - STANDARD_HEAD_CENTER[0] * W) <= 0.02 * H
        assert kp["l_eye"][0] > kp["r_eye"][0]  # front view: the character's left is image right
        # The head is drawn where the keypoints say: skin pixels around the eye line.
        y0 = int(eyes_y)
        assert (std[y0, int(eyes_x) - 2:int(eyes_x) + 3] < 250).any()
        heights.append(box["height"])
    assert np.ptp(heights) <= 0.02 * H  # same head size for child, adult and heavy


def test_expression_changes_only_the_face(worker):
    import bpy

    from serialgen.render import camera as cm
    from serialgen.render.scene import render_rgba
    from serialgen.render.standard import standard_angles

    loaded = worker._load_character(_record("adult"), "")
    rig = loaded.rig
    rig.apply_pose(standard_angles())
    skel = rig.posed_skeleton()
    i = skel.joint("head")
    head, tail = skel.heads[i], skel.tails[i]
    view = cm.ViewSample(20.0, 10.0, 50.0, "upper_body", 0.9, (0.0, 0.0))
    cam = cm.fit_camera(view, np.stack([head, tail, skel.heads[skel.joint("chest")]]), W, H)
    cm.apply_camera(worker.scene.camera, cam)
    images = {}
    for name in ("neutral", "open_mouth", "smile"):
        rig.set_expression(name)
        bpy.context.view_layer.update()
        images[name] = render_rgba(worker.scene).astype(int)
    rig.set_expression(None)
    centre, length = 0.5 * (head + tail), float(np.linalg.norm(tail - head))
    skull = centre + 0.7 * length * np.concatenate([np.eye(3), -np.eye(3)])
    uv, _ = cam.project(skull)
    lo, hi = uv.min(0) - 0.03 * H, uv.max(0) + 0.03 * H  # the face region, plus a small margin
    yy, xx = np.mgrid[0:H, 0:W]
    near = (xx >= lo[0]) & (xx <= hi[0]) & (yy >= lo[1]) & (yy <= hi[1])
    for name in ("open_mouth", "smile"):
        changed = (np.abs(images[name] - images["neutral"]) > 2).any(axis=-1)
        assert changed[near].sum() >= 3, f"{name}: face pixels did not change"
        assert changed[~near].sum() == 0, f"{name}: pixels far from the face changed"


def test_same_seed_same_bytes(worker, poses_path, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    rec = _record("heavy")
    ra = worker.run(_job(rec, a, poses_path, k=3))
    worker.unload()  # the second run loads the character afresh
    rb = worker.run(_job(rec, b, poses_path, k=3))
    rc = worker.run(_job(rec, c, poses_path, k=3, seed=1))
    pa = (a / ra["shard"]["path"]).read_bytes()
    assert pa == (b / rb["shard"]["path"]).read_bytes()
    assert ra["shard"]["sha256"] == rb["shard"]["sha256"]
    assert pa != (c / rc["shard"]["path"]).read_bytes()  # another seed, other views


def test_failed_character_is_recorded(worker, poses_path, tmp_path):
    bad = {"id": "mannequin-bad", "kind": "mannequin", "variant": "no-such-variant"}
    result = worker.run(_job(bad, tmp_path, poses_path, k=2))
    assert result["status"] == "failed" and "no-such-variant" in result["error"]
    assert result["shard"] is None
    assert not list(tmp_path.rglob("*.tar")) and not list(tmp_path.rglob(".*.tmp"))
    ok = worker.run(_job(_record("child"), tmp_path, poses_path, k=1))
    assert ok["status"] == "ok"  # the worker goes on

"""Real bpy renders (small, 128x192): keypoints vs silhouette, the standard form, expressions,
determinism, exposure, texture fallback and the shards a job writes (format 3: pairs + one
standard tar per character); and, without Blender, the frame read-back and anti-aliasing. Characters: three procedural characters (a child, an
adult, a heavy adult, picked by their descriptions) and the mannequin test character."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

W, H = 128, 192
VARIANTS = ("child", "adult", "heavy")


def _record(variant):
    return {"id": f"mannequin-{variant}", "kind": "mannequin", "variant": variant, "status": "accepted"}


def _pick_procedural() -> dict[str, str]:
    """First ids whose description is a child, a mid-weight adult and a heavy adult (seed 0)."""
    from serialgen.assets_manifest.procedural import describe_character

    found: dict[str, str] = {}
    for i in range(500):
        d = describe_character(f"proc-{i:06d}", 0)
        group, weight = d["age_group"], d["phenotype"]["weight"]
        if group == "child":
            found.setdefault("child", d["id"])
        elif group == "adult" and 0.4 < weight < 0.6:
            found.setdefault("adult", d["id"])
        elif group == "adult" and weight > 0.8:
            found.setdefault("heavy", d["id"])
        if len(found) == 3:
            return found
    raise AssertionError(f"no child/adult/heavy among 500 descriptions: {found}")


@pytest.fixture(scope="module")
def procedural(tmp_path_factory):
    """(assets dir, {"child"|"adult"|"heavy": manifest record}) of three built procedural characters."""
    from serialgen.assets_manifest.procedural import build_mesh_data, describe_character, save_mesh_data

    root = tmp_path_factory.mktemp("procedural")
    records = {}
    for role, char_id in _pick_procedural().items():
        desc = describe_character(char_id, 0)
        save_mesh_data(build_mesh_data(desc), root / "meshes" / f"{char_id}.npz")
        records[role] = {"schema": "serialgen.character/1", "id": char_id, "kind": "procedural",
                         "status": "accepted", "mesh_file": f"meshes/{char_id}.npz",
                         "expressions": desc["expressions"]}
    return root, records


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


def _job(record, out, poses_path, k=4, seed=0, assets=""):
    from serialgen.dataset.shards import split_of
    from serialgen.render.job import RenderJob

    split = split_of(record["id"])
    return RenderJob(record, str(assets), str(out), f"{split}/{record['id']}-p000000-{k:06d}.tar", split, 0, k, k, seed,
                     str(poses_path))


def _samples(result, out):
    from serialgen.dataset.shards import iter_shard

    assert result["status"] == "ok", result.get("traceback")
    return list(iter_shard(out / result["shard"]["path"]))


def _standard(result, out) -> dict:
    """The members of the standard tar the job wrote (shard format 3)."""
    from serialgen.dataset.shards import iter_shard

    (key, sample), = iter_shard(out / result["standard"]["path"])
    return sample


def _png(data):
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)))


@pytest.mark.blender
def test_projection_matches_blender(worker):
    from serialgen.assets_manifest.geometry import camera as cm
    from serialgen.render.bpy_utils import import_bpy, import_bpy_extras, import_mathutils
    from serialgen.render.camera import apply_camera

    bpy = import_bpy()
    world_to_camera_view = import_bpy_extras().object_utils.world_to_camera_view
    Vector = import_mathutils().Vector

    scene = worker.scene
    pts = np.random.default_rng(1).normal(0.0, 0.4, (6, 3)) + [0.0, 0.0, 1.0]
    view = cm.ViewSample(70.0, 20.0, 50.0, "full_body", 0.8, (0.3, -0.2))
    cam = cm.fit_camera(view, pts, W, H)
    cam.shift_x, cam.shift_y = 0.05, -0.2
    apply_camera(scene.camera, cam)
    bpy.context.view_layer.update()
    uv, _ = cam.project(pts)
    ref = np.array([world_to_camera_view(scene, scene.camera, Vector(p))[:2] for p in pts])
    np.testing.assert_allclose(uv, np.stack([ref[:, 0] * W, (1 - ref[:, 1]) * H], 1), atol=1e-3)


@pytest.mark.blender
def test_visible_keypoints_inside_silhouette(worker, poses_path, procedural, tmp_path):
    assets, records = procedural
    inside = total = 0
    for record in [*records.values(), _record("adult")]:
        result = worker.run(_job(record, tmp_path, poses_path, k=5, assets=assets))
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


@pytest.mark.blender
@pytest.mark.parametrize("kind", ["procedural", "mannequin"])
def test_standard_image_places_the_face(worker, poses_path, procedural, tmp_path, kind):
    from serialgen.assets_manifest.geometry.standard_form import STANDARD_FACE_CENTER, STANDARD_FACE_SIDE
    from serialgen.render.job import RENDERING_VERSION

    assets, records = procedural
    sides = []
    for role in VARIANTS:
        record = records[role] if kind == "procedural" else _record(role)
        result = worker.run(_job(record, tmp_path, poses_path, k=1, assets=assets))
        (key, sample), = _samples(result, tmp_path)
        assert set(sample) == {"ref.png", "ref_pose.json", "std_pose.json", "meta.json"}  # format 3
        standard = _standard(result, tmp_path)
        assert standard["std_pose.json"] == sample["std_pose.json"]
        std = _png(standard["std.png"])
        assert std.shape == (H, W, 3)
        border = np.concatenate([std[0], std[-1], std[:, 0], std[:, -1]])
        assert (border == 255).all(), "standard image border is not pure white"
        assert (std < 250).any(axis=-1).sum() > 0.03 * W * H  # a character is drawn
        meta = json.loads(standard["meta.json"])
        assert meta["rendering_version"] == RENDERING_VERSION and meta["character"] == record["id"]
        box = meta["face_box"]
        assert box["center"] == pytest.approx([STANDARD_FACE_CENTER[0] * W, STANDARD_FACE_CENTER[1] * H], abs=0.01)
        assert box["side"] == pytest.approx(STANDARD_FACE_SIDE * H, abs=0.01)
        assert meta["fit"]["head_inside"] and meta["fit"]["body_inside"]
        assert json.loads(sample["meta.json"])["std"]["face_box"] == box
        pose = json.loads(sample["std_pose.json"])
        names = pose["names"]
        kp = {n: pose["keypoints"][i] for i, n in enumerate(names)}
        # The eyes sit just above the box centre, visible, left/right mirrored about the centre line.
        eyes_y = (kp["l_eye"][1] + kp["r_eye"][1]) / 2
        eyes_x = (kp["l_eye"][0] + kp["r_eye"][0]) / 2
        assert kp["l_eye"][2] and kp["r_eye"][2] and kp["nose"][2]
        assert 0 < box["center"][1] - eyes_y <= 0.1 * box["side"]
        assert abs(eyes_x - STANDARD_FACE_CENTER[0] * W) <= 0.01 * W
        assert kp["l_eye"][0] > kp["r_eye"][0]  # front view: the character's left is image right
        # The face is drawn where the keypoints say: skin pixels around the eye line.
        y0 = int(eyes_y)
        assert (std[y0, int(eyes_x) - 2:int(eyes_x) + 3] < 250).any()
        sides.append(box["side"])
    assert np.ptp(sides) <= 0.01  # the same face size for child, adult and heavy


@pytest.mark.blender
@pytest.mark.parametrize("kind", ["procedural", "mannequin"])
def test_expression_changes_only_the_face(worker, procedural, kind):
    from serialgen.assets_manifest.geometry import camera as cm
    from serialgen.assets_manifest.geometry.standard_form import standard_angles
    from serialgen.render.bpy_utils import import_bpy
    from serialgen.render.camera import apply_camera

    bpy = import_bpy()

    assets, records = procedural
    record = records["adult"] if kind == "procedural" else _record("adult")
    loaded = worker._load_character(record, str(assets))
    rig = loaded.rig
    rig.apply_pose(standard_angles())
    skel = rig.posed_skeleton()
    i = skel.joint("head")
    head, tail = skel.heads[i], skel.tails[i]
    view = cm.ViewSample(20.0, 10.0, 50.0, "upper_body", 0.95, (0.0, 0.0))
    # Head to knees, hands included: the face is a small part of the frame.
    framed = [tail] + [skel.heads[skel.joint(j)] for j in ("l_hand", "r_hand", "l_lower_leg", "r_lower_leg")]
    cam = cm.fit_camera(view, np.stack(framed), W, H)
    apply_camera(worker.scene.camera, cam)
    images = {}
    for name in ("neutral", "open_mouth", "smile"):
        rig.set_expression(name)
        bpy.context.view_layer.update()
        images[name] = worker._render(worker.scene).astype(int)
    rig.set_expression(None)
    # The head and jaw: the head bone runs from the top of the neck to the top of the skull, and a
    # dropping jaw reaches below its start; plus a margin of a tenth of that box.
    length = float(np.linalg.norm(tail - head))
    box = np.array([[x, y, z] for x in (-0.7, 0.7) for y in (-0.7, 0.7) for z in (-0.8, 1.2)]) * length + head
    uv, _ = cam.project(box)
    margin = 0.1 * float(np.ptp(uv[:, 1]))
    lo, hi = uv.min(0) - margin, uv.max(0) + margin
    assert (hi - lo).prod() < 0.25 * W * H  # "near" is a part of the image, not all of it
    yy, xx = np.mgrid[0:H, 0:W]
    near = (xx >= lo[0]) & (xx <= hi[0]) & (yy >= lo[1]) & (yy <= hi[1])
    for name in ("open_mouth", "smile"):
        changed = (np.abs(images[name] - images["neutral"]) > 2).any(axis=-1)
        assert changed[near].sum() >= 3, f"{name}: face pixels did not change"
        assert changed[~near].sum() == 0, f"{name}: pixels far from the face changed"


@pytest.mark.blender
def test_same_seed_same_bytes(worker, poses_path, procedural, tmp_path):
    # Procedural characters: one closed body surface. (The mannequin's overlapping ellipsoids can
    # flip a pixel on an intersection line between loads: see docs/rendering.md, determinism.)
    assets, records = procedural
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    rec = records["heavy"]
    ra = worker.run(_job(rec, a, poses_path, k=3, assets=assets))
    worker.unload()  # the second run loads the character afresh
    worker.run(_job(records["child"], tmp_path / "other", poses_path, k=1, assets=assets))
    rb = worker.run(_job(rec, b, poses_path, k=3, assets=assets))
    rc = worker.run(_job(rec, c, poses_path, k=3, seed=1, assets=assets))
    pa = (a / ra["shard"]["path"]).read_bytes()
    assert pa == (b / rb["shard"]["path"]).read_bytes()
    assert ra["shard"]["sha256"] == rb["shard"]["sha256"]
    assert (a / ra["standard"]["path"]).read_bytes() == (b / rb["standard"]["path"]).read_bytes()
    assert ra["stats"] == rb["stats"]
    assert pa != (c / rc["shard"]["path"]).read_bytes()  # another seed, other views
    # A job whose range does not start at 0 writes no standard tar (the first job of the character does).
    from serialgen.render.job import RenderJob

    later = RenderJob(rec, str(assets), str(tmp_path / "d"), "train/later.tar", "train", 1, 3, 3, 0, str(poses_path))
    rd = worker.run(later)
    assert rd["status"] == "ok" and rd["standard"] is None
    assert not (tmp_path / "d" / "train" / "standard").exists()


@pytest.mark.blender
def test_encoding_ahead_gives_the_same_shard_and_a_bad_encode_loses_one_sample(worker, poses_path, procedural,
                                                                               tmp_path, monkeypatch):
    """The job encodes sample i in a background thread while sample i + 1 renders: the shard is
    byte for byte the one of encoding in line; a sample whose encoding fails is counted as one
    failure and the others are written, in order."""
    assets, records = procedural
    rec = records["adult"]
    assert worker.encode_ahead is False  # CPU workers encode in line; the farm turns it on for GPU workers
    inline = worker.run(_job(rec, tmp_path / "inline", poses_path, k=4, assets=assets))
    monkeypatch.setattr(worker, "encode_ahead", True)
    ahead = worker.run(_job(rec, tmp_path / "ahead", poses_path, k=4, assets=assets))
    assert (tmp_path / "ahead" / ahead["shard"]["path"]).read_bytes() == \
        (tmp_path / "inline" / inline["shard"]["path"]).read_bytes()
    keys = [k for k, _ in _samples(ahead, tmp_path / "ahead")]
    real = worker._encode_sample

    def flaky(rendered):
        if rendered.key == keys[1]:
            raise OSError("disk hiccup")
        return real(rendered)

    monkeypatch.setattr(worker, "_encode_sample", flaky)
    result = worker.run(_job(rec, tmp_path / "flaky", poses_path, k=4, assets=assets))
    assert result["status"] == "ok" and result["pairs"] == 3
    assert [f["key"] for f in result["failures"]] == [keys[1]] and "disk hiccup" in result["failures"][0]["error"]
    assert [k for k, _ in _samples(result, tmp_path / "flaky")] == [keys[0], keys[2], keys[3]]


@pytest.mark.blender
@pytest.mark.slow
def test_meta_records_exposure_and_the_job_its_stats(worker, poses_path, procedural, tmp_path):
    """meta.json's ``fg_luminance`` is the median foreground luminance of ref.png (0..1), and the job
    result carries the shard's ``render_stats.Histograms`` built from its samples (interface 5)."""
    from serialgen.dataset.render_stats import Histograms, sample_row
    from serialgen.render.lighting import fg_luminance

    assets, records = procedural
    result = worker.run(_job(records["adult"], tmp_path, poses_path, k=4, assets=assets))
    expected = Histograms()
    for key, sample in _samples(result, tmp_path):
        meta = json.loads(sample["meta.json"])
        ref = _png(sample["ref.png"])
        assert meta["fg_luminance"] == pytest.approx(fg_luminance(ref), abs=1e-4)
        assert meta["fg_luminance"] >= 25 / 255
        assert meta["exposure"]["gain"] >= 1.0 and meta["exposure"]["redraws"] >= 0
        expected.add(sample_row(meta, json.loads(sample["ref_pose.json"])))
    assert Histograms.from_json(result["stats"]) == expected
    assert result["stats"]["samples"] == 4


@pytest.mark.blender
def test_failed_character_is_recorded(worker, poses_path, tmp_path):
    bad = {"id": "mannequin-bad", "kind": "mannequin", "variant": "no-such-variant"}
    result = worker.run(_job(bad, tmp_path, poses_path, k=2))
    assert result["status"] == "failed" and "no-such-variant" in result["error"]
    assert result["shard"] is None
    assert not list(tmp_path.rglob("*.tar")) and not list(tmp_path.rglob(".*.tmp"))
    assert result["standard"] is None and result["stats"] is None
    ok = worker.run(_job(_record("child"), tmp_path, poses_path, k=1))
    assert ok["status"] == "ok"  # the worker goes on


@pytest.mark.blender
def test_face_keypoints_hidden_from_behind(worker, procedural):
    from serialgen.assets_manifest import skeleton as sk
    from serialgen.assets_manifest.geometry import camera as cm
    from serialgen.assets_manifest.geometry.standard_form import standard_angles
    from serialgen.render.camera import apply_camera

    assets, records = procedural
    loaded = worker._load_character(records["adult"], str(assets))
    rig = loaded.rig
    rig.set_expression(None)
    rig.apply_pose(standard_angles())
    skel = rig.posed_skeleton()
    pts, _ = sk.compute_keypoints(skel, rig.face_landmarks)
    face = [sk.KEYPOINT_NAMES.index(n) for n in ("nose", "l_eye", "r_eye")]
    body = [sk.KEYPOINT_NAMES.index(n) for n in ("neck", "l_hip", "r_knee")]
    seen = {}
    for azimuth in (0.0, 180.0):
        cam = cm.fit_camera(cm.ViewSample(azimuth, 5.0, 50.0, "full_body", 0.9, (0.0, 0.0)),
                            rig.evaluated_vertices(), W, H)
        apply_camera(worker.scene.camera, cam)
        kps, defined = worker._keypoints(loaded, cam, skel)
        seen[azimuth] = kps[:, 2]
        assert defined[face + body].all()
    assert seen[0.0][face].all() and not seen[180.0][face].any()
    assert seen[0.0][body].all() and seen[180.0][body].all()  # joints inside the body stay visible


@pytest.mark.blender
@pytest.mark.slow
def test_missing_texture_renders_the_fallback_colour(worker, tmp_path):
    """A glTF whose image file is gone, accepted with ``texture_fallback``: the character is drawn in
    the record's fallback colour (its material's base colour), never Blender's missing-image
    magenta (which the unlinked node of rendering/2 still showed in Workbench)."""
    from serialgen.render.bpy_utils import import_bpy
    from serialgen.render.mannequin import build_mannequin

    bpy = import_bpy()
    worker.unload()
    m = build_mannequin("adult")
    for obj in bpy.context.scene.objects:
        obj.select_set(obj in (m.armature, *m.meshes))
    gltf = tmp_path / "missing-texture.gltf"
    bpy.ops.export_scene.gltf(filepath=str(gltf), export_format="GLTF_SEPARATE", use_selection=True)
    bones = list(m.bone_map)
    m.remove()
    images = json.loads(gltf.read_text())["images"]
    for image in images:
        (tmp_path / image["uri"]).unlink()
    colour = [0.05, 0.45, 0.05, 1.0]  # scene-linear green
    record = {"id": "char-missing-texture", "kind": "gltf", "status": "accepted", "path": str(gltf),
              "bone_map": {b: b for b in bones}, "scale": 1.0, "stats": {"texture_fallback": True},
              "texture_fallback": [{"image": images[0]["name"], "material": None, "colour": colour,
                                    "source": "base_colour"}]}
    loaded = worker._load_character(record, str(tmp_path))
    worker._render_standard(loaded)
    rgba = worker._render(worker.scene)
    fg = rgba[rgba[..., 3] == 255][:, :3].astype(int)
    assert len(fg) > 500
    magenta = (fg[:, 0] > 180) & (fg[:, 1] < 80) & (fg[:, 2] > 180)
    assert magenta.sum() == 0, f"{magenta.sum()} magenta pixels"
    r, g, b = np.median(fg, axis=0)
    assert g > 1.5 * r and g > 1.5 * b, (r, g, b)
    worker.unload()


def test_read_tga_matches_pillow(tmp_path):
    """The numpy TGA reader gives Pillow's pixels for both row orders."""
    from PIL import Image

    from serialgen.render.scene import read_tga

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (7, 5, 4), dtype=np.uint8)
    path = tmp_path / "f.tga"
    Image.fromarray(img, "RGBA").save(path, compression=None)
    assert (read_tga(path) == img).all()
    raw = bytearray(path.read_bytes())
    raw[17] ^= 0x20  # flip the origin bit: rows now read top-down
    path.write_bytes(bytes(raw))
    assert (read_tga(path) == img[::-1]).all()
    with pytest.raises(ValueError, match="not an uncompressed 32-bit TGA"):
        path.write_bytes(b"x" * 30)
        read_tga(path)


def test_antialias_is_the_2x2_supersample_kernel():
    """A hard vertical edge of an opaque red square on transparent ground: the 1x filter gives the
    edge pixels the coverage a 2x2 supersample of a half-pixel shifted edge has (1/8 outside, 7/8
    inside), keeps the colour (premultiplied alpha: no dark fringe), leaves pixels far from the
    figure untouched and gives the same bytes every time."""
    from serialgen.render.scene import antialias

    img = np.zeros((20, 20, 4), np.uint8)
    img[5:15, 5:15] = (200, 10, 10, 255)
    out = antialias(img)
    assert (out == antialias(img)).all()
    assert out[10, 4, 3] == 32 and out[10, 5, 3] == 223  # (1/8, 7/8) x 255 on the edge's two sides
    assert np.abs(out[10, 4, :3].astype(int) - (200, 10, 10)).max() <= 4  # colour kept (8-bit premultiplied)
    assert (out[10, 10] == img[10, 10]).all()  # inside: unchanged
    assert (out[0] == 0).all() and (out[:, 19] == 0).all()
    assert (antialias(np.zeros((8, 8, 4), np.uint8)) == 0).all()  # nothing drawn: nothing to filter


def _pillow_antialias(rgba):
    """The 1x anti-aliasing as rendering/3 first wrote it, with Pillow (the reference bytes)."""
    from PIL import Image, ImageFilter

    alpha = rgba[..., 3]
    rows, cols = np.flatnonzero(alpha.any(1)), np.flatnonzero(alpha.any(0))
    if not len(rows):
        return rgba.copy()
    h, w = alpha.shape
    box = (slice(max(rows[0] - 2, 0), min(rows[-1] + 3, h)), slice(max(cols[0] - 2, 0), min(cols[-1] + 3, w)))
    im = Image.fromarray(np.ascontiguousarray(rgba[box]), "RGBA").convert("RGBa")
    out = rgba.copy()
    out[box] = np.asarray(im.filter(ImageFilter.BoxBlur(1 / 6)).convert("RGBA"))
    return out


def test_compiled_antialias_and_gain_give_pillows_bytes():
    """The compiled passes (render/frame_kernels.py) give exactly the bytes of the Pillow calls they
    replaced: random frames with every kind of alpha (0, 255, the rim), figures touching the frame's
    edges (where the blur repeats edge pixels) and random gains, clipping included."""
    from PIL import Image

    from serialgen.render.lighting import apply_gain
    from serialgen.render.scene import antialias

    rng = np.random.default_rng(3)
    for trial in range(60):
        h, w = (int(v) for v in rng.integers(3, 48, 2))
        img = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
        img[..., 3] = rng.choice(np.array([0, 0, 255, 255, 1, 64, 127, 128, 254], np.uint8), (h, w))
        if trial % 2:  # a figure inside transparent ground, not touching the edges
            frame = np.zeros((h + 9, w + 7, 4), np.uint8)
            frame[4:4 + h, 3:3 + w] = img
            img = frame
        assert (antialias(img) == _pillow_antialias(img)).all(), trial
        gain = rng.uniform(0.3, 2.5, 3)
        levels = np.arange(256, dtype=np.float64)
        lut = np.concatenate([np.clip(np.floor(levels * g + 0.5), 0, 255).astype(np.uint8) for g in gain]
                             + [levels.astype(np.uint8)]).tolist()
        assert (apply_gain(img, gain) == np.asarray(Image.fromarray(img, "RGBA").point(lut))).all(), trial

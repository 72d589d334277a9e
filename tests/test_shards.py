"""The shard format without Blender: keys, splits, deterministic tars, index, verify, and reading the
shards back with stock webdataset and Ray Data. Also the camera maths the renderer relies on."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from serialgen.dataset import shards as S


def _pose(w=6, h=8):
    return {"width": w, "height": h, "names": ["nose", "neck"], "keypoints": [[1.0, 2.0, 1], [3.0, 4.0, 0]]}


def _members(key, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "ref.png": S.encode_png(rng.integers(0, 255, (8, 6, 4), dtype=np.uint8)),
        "std.png": S.encode_png(rng.integers(0, 255, (8, 6, 3), dtype=np.uint8)),
        "ref_pose.json": S.json_bytes(_pose()),
        "std_pose.json": S.json_bytes(_pose()),
        "meta.json": S.json_bytes({"schema": S.SAMPLE_SCHEMA, "key": key, "character": key.split("_p")[0]}),
    }


def _write_set(root, characters=("proc-000001", "proc-000002", "proc-000003"), per=3):
    summaries = []
    for c in characters:
        split = S.split_of(c)
        with S.ShardWriter(root, f"{split}/{c}-p000000-{per:06d}.tar", split) as w:
            for p in range(per):
                key = S.sample_key(c, p, 0)
                w.write(key, _members(key, p))
            summaries.append(w.close())
    S.write_index(root, summaries, {"seed": 0}, [])
    return summaries


def test_keys_have_no_dots_and_bad_keys_say_why():
    assert S.sample_key("proc-000123", 7, 1) == "proc-000123_p00007_v1"
    assert "." not in S.sample_key("char.v1.glb", 1, 0)
    with pytest.raises(ValueError, match="first dot"):
        S.validate_key("a.b")


def test_split_is_deterministic_and_near_80_20():
    ids = [f"proc-{i:06d}" for i in range(2000)]
    splits = [S.split_of(i) for i in ids]
    assert splits == [S.split_of(i) for i in ids]
    share = splits.count("test") / len(ids)
    assert 0.17 < share < 0.23
    assert all(S.split_of(i, 0.0) == "train" for i in ids[:50])


def test_writer_is_byte_deterministic_and_atomic(tmp_path):
    a = _write_set(tmp_path / "a")
    b = _write_set(tmp_path / "b")
    assert [s.sha256 for s in a] == [s.sha256 for s in b]
    assert (tmp_path / "a" / S.INDEX_NAME).read_bytes() == (tmp_path / "b" / S.INDEX_NAME).read_bytes()
    assert not list((tmp_path / "a").rglob("*.tmp"))
    import tarfile

    with tarfile.open(tmp_path / "a" / a[0].path) as tar:
        infos = tar.getmembers()
    assert all(i.mtime == 0 and i.uid == 0 and i.uname == "" for i in infos)
    assert [i.name.split(".", 1)[1] for i in infos[:5]] == list(S.MEMBERS)


def test_aborted_writer_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with S.ShardWriter(tmp_path, "train/x-p000000-000001.tar", "train") as w:
            w.write("x_p00000_v0", _members("x_p00000_v0"))
            raise RuntimeError("render crashed")
    assert not list(tmp_path.rglob("*.tar")) and not list(tmp_path.rglob("*.tmp"))


def test_verify_passes_then_catches_a_flipped_byte(tmp_path):
    summaries = _write_set(tmp_path)
    assert S.verify(tmp_path) == []
    path = tmp_path / summaries[1].path
    data = bytearray(path.read_bytes())
    data[700] ^= 0x01
    path.write_bytes(bytes(data))
    problems = S.verify(tmp_path)
    assert len(problems) == 1 and summaries[1].path in problems[0] and "sha256" in problems[0]


def test_verify_catches_missing_extra_and_incomplete(tmp_path):
    summaries = _write_set(tmp_path)
    (tmp_path / summaries[0].path).unlink()
    with S.ShardWriter(tmp_path, "train/stray-p000000-000001.tar", "train") as w:
        w.write("stray_p00000_v0", _members("stray_p00000_v0"))
        w.close()
    problems = S.verify(tmp_path)
    assert any("missing" in p for p in problems)
    assert any("stray" in p and "not in the index" in p for p in problems)
    # A sample without its std.png: the index matches the bytes, the sample check does not.
    import tarfile

    bad = tmp_path / "train" / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        for name, data in _members("bad_p00000_v0").items():
            if name == "std.png":
                continue
            info = tarfile.TarInfo(f"bad_p00000_v0.{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    entry = S.summarize_shard(tmp_path, "train/bad.tar", "train")
    S.write_index(tmp_path, summaries[1:] + [entry], {}, [])
    problems = S.verify(tmp_path)
    assert any("bad_p00000_v0 has members" in p for p in problems)
    assert not (tmp_path / "nothing").exists() and "index.json: not found; expected a shard set written by " \
        "`serialgen render`" in S.verify(tmp_path / "nothing")[0]


def test_stock_webdataset_reads_every_member(tmp_path):
    import webdataset as wds

    summaries = _write_set(tmp_path)
    urls = [str(tmp_path / s.path) for s in summaries]
    ds = wds.WebDataset(urls, shardshuffle=False).decode("rgb8")
    samples = list(ds)
    assert len(samples) == 9
    s = samples[0]
    assert set(S.MEMBERS) <= set(s)
    assert s["ref.png"].shape == (8, 6, 3)  # decoded (rgb8 drops alpha)
    raw = next(iter(wds.WebDataset(urls[:1], shardshuffle=False)))
    from PIL import Image

    assert Image.open(io.BytesIO(raw["ref.png"])).mode == "RGBA"
    assert Image.open(io.BytesIO(raw["std.png"])).mode == "RGB"
    assert json.loads(raw["ref_pose.json"])["keypoints"][0] == [1.0, 2.0, 1]


def test_ray_data_reads_the_shards(tmp_path):
    ray = pytest.importorskip("ray")
    summaries = _write_set(tmp_path)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        ds = ray.data.read_webdataset([str(tmp_path / s.path) for s in summaries], decoder=False)
        rows = ds.take_all()
    finally:
        ray.shutdown()
    assert len(rows) == 9
    row = rows[0]
    assert {"ref.png", "std.png", "ref_pose.json", "std_pose.json", "meta.json"} <= set(row)
    meta = row["meta.json"]  # Ray decodes .json members itself
    meta = json.loads(meta) if isinstance(meta, (bytes, str)) else meta
    assert meta["key"] == row["__key__"]
    assert sorted(r["__key__"] for r in rows) == sorted(k for s in summaries for k in s.keys)


# -- camera maths (no Blender) -------------------------------------------------------------------


def test_fit_camera_frames_the_points():
    from serialgen.assets_manifest.geometry import camera as cm

    rng = np.random.default_rng(0)
    pts = rng.normal(0.0, [0.3, 0.2, 0.5], (200, 3)) + [0.0, 0.0, 1.0]
    for i in range(20):
        view = cm.sample_view(rng)
        cam = cm.fit_camera(view, pts, 512, 768)
        uv, z = cam.project(pts)
        assert (z > 0).all()
        assert uv.min() >= -1 and (uv[:, 0] <= 513).all() and (uv[:, 1] <= 769).all()
        span = max(np.ptp(uv[:, 0]) / 512, np.ptp(uv[:, 1]) / 768)
        assert abs(span - view.fill) < 0.03, (view, span)


def test_standard_camera_puts_the_head_bone_in_place():
    from serialgen.assets_manifest import skeleton as sk
    from serialgen.assets_manifest.geometry.standard_form import (STANDARD_HEAD_CENTER, STANDARD_HEAD_HEIGHT, head_box,
                                           standard_camera)

    for scale in (0.65, 1.0, 1.1):
        skel = sk.forward_kinematics(np.zeros((len(sk.JOINT_NAMES), 3)), scale=scale)
        cam = standard_camera(skel, 512, 768)
        box = head_box(skel, cam)
        assert box["center"] == pytest.approx([STANDARD_HEAD_CENTER[0] * 512, STANDARD_HEAD_CENTER[1] * 768], abs=0.01)
        assert box["height"] == pytest.approx(STANDARD_HEAD_HEIGHT * 768, abs=0.01)


def test_render_settings_reject_bad_input():
    from serialgen.errors import UserInputError
    from serialgen.render.scene import RenderSettings

    for bad in ({"width": 0}, {"height": 99999}, {"width": "512"}):
        with pytest.raises(UserInputError, match="--resolution"):
            RenderSettings(**bad)
    with pytest.raises(UserInputError, match="--engine"):
        RenderSettings(engine="povray")

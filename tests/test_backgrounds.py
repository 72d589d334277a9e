"""Backgrounds: user folders (recursive), bad/tiny/duplicate images rejected with reasons, procedural
determinism, HDRI projection, the default set and load_backgrounds."""

import shutil

import numpy as np
import pytest
from PIL import Image

from serialgen.assets_manifest import backgrounds as bg
from serialgen.assets_manifest import manifest as mf
from serialgen.errors import UserInputError


def _img(path, size=(320, 300), colour=(200, 30, 30), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)
    return path


@pytest.fixture()
def user_dir(tmp_path):
    d = tmp_path / "photos"
    _img(d / "ok.jpg")
    _img(d / "nested" / "deeper" / "ok2.webp", colour=(10, 200, 10))
    _img(d / "nested" / "copy.png", colour=(200, 30, 30))  # not a byte copy of ok.jpg (other format)
    shutil.copyfile(d / "ok.jpg", d / "nested" / "same.JPG")  # byte-identical duplicate
    _img(d / "tiny.png", size=(300, 255))  # short side one pixel under the limit
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    full = d / "ok.jpg"
    (d / "truncated.png").write_bytes(_img(d / "t.png", colour=(1, 2, 3)).read_bytes()[:200])
    (d / "t.png").unlink()
    Image.new("RGB", (400, 400)).save(d / "gif_named.png", format="GIF")
    (d / "notes.txt").write_text("ignored")
    return d


def test_user_folder_scan_and_reasons(user_dir):
    recs, counts = bg.scan_user_backgrounds([user_dir])
    by_name = {r["path"].split("/")[-1]: r for r in recs}
    assert counts["ignored_non_images"] == 1 and len(recs) == 9  # every file gets a record
    assert by_name["notes.txt"]["reason"] == "unsupported_format" and by_name["notes.txt"]["sha256"] is None
    for name in ("ok2.webp", "copy.png", "same.JPG"):
        assert by_name[name]["status"] == "accepted" and by_name[name]["reason"] is None
    # Byte-identical files: the first in sorted path order (nested/same.JPG) is kept.
    assert by_name["ok.jpg"]["reason"] == "duplicate" and by_name["ok.jpg"]["id"].endswith("-dup1")
    assert by_name["same.JPG"]["width"] == 320 and by_name["same.JPG"]["height"] == 300
    assert by_name["same.JPG"]["id"] == "user-" + mf.sha256_file(user_dir / "ok.jpg")[:12]
    assert by_name["ok2.webp"]["path"] == str((user_dir / "nested" / "deeper" / "ok2.webp").resolve())
    assert by_name["tiny.png"]["reason"] == "image_too_small" and "255" in by_name["tiny.png"]["detail"]
    assert by_name["broken.jpg"]["reason"] == "unreadable_image"
    assert by_name["truncated.png"]["reason"] == "unreadable_image"
    assert by_name["gif_named.png"]["reason"] == "unsupported_format"
    assert sum(r["reason"] == "duplicate" for r in recs) == 1
    assert len({r["id"] for r in recs}) == len(recs)


def test_missing_folder_is_one_line_error(tmp_path):
    with pytest.raises(UserInputError, match="nope: no such file or folder"):
        bg.scan_user_backgrounds([tmp_path / "nope"])


def test_incremental_rescan_and_load(tmp_path, user_dir):
    out = tmp_path / "assets"
    recs, _ = bg.build_backgrounds(out, [user_dir], n_procedural=3)
    stamp = {r["id"]: r["stats"]["mtime_ns"] for r in recs}
    # Second build: nothing new is written (same mtimes), one changed user file is re-judged.
    _img(user_dir / "tiny.png", size=(600, 400), colour=(5, 5, 250))
    recs2, counts = bg.build_backgrounds(out, [user_dir], n_procedural=3)
    assert counts["reused"] == 7 and counts["processed"] == 1
    assert all(stamp[r["id"]] == r["stats"]["mtime_ns"] for r in recs2 if r["kind"] != "user")
    loaded = bg.load_backgrounds(out)
    assert {r["kind"] for r in loaded} == {"photo", "texture", "procedural", "user"}
    assert all(r["status"] == "accepted" for r in loaded)
    for r in loaded:
        with Image.open(r["path"]) as im:  # absolute paths the loader can open
            assert min(im.size) >= bg.MIN_SHORT_SIDE
    assert sum(r["kind"] == "user" for r in loaded) == 4  # the enlarged image is accepted now


def test_procedural_backgrounds_are_deterministic_and_varied():
    params = [bg.procedural_params(0, i) for i in range(8)]
    assert {p["type"] for p in params} == {"gradient", "noise", "shapes", "stripes"}
    assert params == [bg.procedural_params(0, i) for i in range(8)]
    assert bg.procedural_params(1, 0) != params[0]
    imgs = [np.asarray(bg.render_procedural(p, (128, 192))) for p in params]
    again = np.asarray(bg.render_procedural(params[5], (128, 192)))
    assert np.array_equal(imgs[5], again)
    assert imgs[0].shape == (192, 128, 3)
    means = np.array([im.reshape(-1, 3).mean(axis=0) for im in imgs])
    assert np.ptp(means, axis=0).max() > 30  # different colours, not one image eight times
    assert all(im.std() > 3 for im in imgs)


def test_equirect_view_and_tonemap():
    # A panorama whose colour encodes the longitude: yaw 180 must look at the opposite side.
    hs, ws = 64, 128
    u = (np.arange(ws, dtype=np.float32) + 0.5) / ws
    lon = np.tile(0.5 + 0.5 * np.cos(2 * np.pi * (u - 0.5)), (hs, 1))  # 1 straight ahead, 0 behind
    pano = np.stack([lon, 1 - lon, np.full_like(lon, 0.5)], axis=-1)
    v0 = bg.equirect_view(pano, 0, 0, 60, (32, 48))
    v1 = bg.equirect_view(pano, 180, 0, 60, (32, 48))
    assert v0.shape == (48, 32, 3)
    assert v0[24, 16, 0] > 0.97 and v1[24, 16, 0] < 0.03
    ldr = bg.tonemap(np.random.default_rng(0).gamma(1.0, 5.0, (8, 8, 3)))
    assert ldr.dtype == np.uint8 and 40 < ldr.mean() < 220  # auto exposure lands mid-grey-ish


def test_default_set_lists_only_licensed_bundled_images(tmp_path):
    recs = bg.build_default_backgrounds(tmp_path, n_procedural=2)  # no probe: no HDRI views
    sk_recs = [r for r in recs if r["kind"] in ("photo", "texture")]
    assert len(sk_recs) == len(bg.SKIMAGE_IMAGES) and all(r["status"] == "accepted" for r in sk_recs)
    assert all(r["licence"] and r["path"].startswith("backgrounds/skimage/") for r in sk_recs)
    assert all(mf.sha256_file(tmp_path / r["path"]) == r["sha256"] for r in recs)
    assert not any(r["kind"] == "hdri" for r in recs)
    assert len(list(bg.bpy_hdri_dir().glob("*.exr"))) == 8  # the bpy wheel's HDRIs (docs/assets.md)

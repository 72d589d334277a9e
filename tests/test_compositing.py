"""Compositing: the mask and keypoints follow the image exactly under every transform."""

import random

import numpy as np
import pytest
from PIL import Image

from serialgen.dataset import compositing as C
from serialgen.dataset import fused
from serialgen.dataset.shards import decode_png
from serialgen.dataset.posemap import parse_pose
from serialgen.errors import UserInputError
from test_loader_synth import synth_background, synth_pair

SIZE = (256, 384)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One intra-op thread, as torch sets it in a DataLoader worker: with two, the resampling kernel's
    threads spin against other jobs on a busy 2-core machine and a 0.2 s test takes 2 s."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _sample(character, pose, size=(256, 384)):
    m = synth_pair(character, pose, size=size)
    return decode_png(m["ref.png"], "RGBA"), parse_pose(m["ref_pose.json"])


def _dilate(m, r):
    """Binary dilation by a (2r+1)^2 square, without wrapping around the edges."""
    h, w = m.shape
    p = np.pad(m, r)
    out = np.zeros_like(m)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out |= p[dy:dy + h, dx:dx + w]
    return out


def _transforms():
    """Configs that exercise downscale, upscale, no resize (scale 1), crops at every edge."""
    yield C.CompositeConfig(resolution=SIZE, scale_range=(0.6, 0.8), jitter=0.06)
    yield C.CompositeConfig(resolution=SIZE, scale_range=(1.2, 1.6), max_crop=0.3, jitter=0.0)
    yield C.CompositeConfig(resolution=SIZE, scale_range=(1.0, 1.0), max_crop=0.0, jitter=0.06)
    yield C.CompositeConfig(resolution=(300, 300), scale_range=(0.8, 1.1), max_crop=0.3)  # other aspect


@pytest.mark.parametrize("cfg", list(_transforms()), ids=["down", "up-crop", "scale1", "square"])
def test_mask_equals_where_the_composite_differs_from_the_background(cfg):
    rng = random.Random(5)
    for pose_id in range(6):
        ref, pose = _sample(pose_id % 3, pose_id)
        # A background colour no figure colour reaches (figure channels lie in 40..215, jitter 6 %).
        bg = Image.new("RGB", cfg.resolution, (250, 2, 250))
        comp = C.composite_reference(ref, pose, bg, cfg, rng, keep_background=True)
        diff = (comp.image != np.asarray(comp.background)).any(axis=2)
        fg = comp.mask == 0
        assert comp.mask.shape == (cfg.resolution[1], cfg.resolution[0]) and set(np.unique(comp.mask)) <= {0, 1}
        assert fg.sum() > 100
        assert not (fg & ~diff).any(), "a foreground pixel equals the background"
        # Differences outside the mask are the antialiased rim only (0 < alpha < 128: within 2 px of
        # the mask; thin fingers never reach alpha 128 after downscaling). A shifted mask fails
        # one of the two checks: its leading edge lands on untouched background. (At the canvas
        # border the rim may belong to a character just outside it.)
        rim = diff & ~_dilate(fg, 2)
        assert not rim[2:-2, 2:-2].any()


def test_keypoints_stay_on_the_character_after_crop_and_scale():
    rng = random.Random(11)
    checked = 0
    for cfg in _transforms():
        for pose_id in range(8):
            ref, pose = _sample(pose_id % 4, 100 + pose_id)
            comp = C.composite_reference(ref, pose, Image.new("RGB", cfg.resolution), cfg, rng)
            fg = _dilate(comp.mask == 0, 1)
            sx, sy, tx, ty = comp.transform
            for i in np.flatnonzero(comp.pose.visible):
                x, y = comp.pose.xy[i]
                assert fg[int(y), int(x)], (i, x, y)
                np.testing.assert_allclose(comp.pose.xy[i], pose.xy[i] * [sx, sy] + [tx, ty], atol=1e-3)
                checked += 1
            # Points that left the canvas became invisible; nothing visible lies outside it.
            gone = pose.visible & ~comp.pose.visible
            if gone.any():
                xy = pose.xy[gone] * [sx, sy] + [tx, ty]
                w, h = cfg.resolution
                assert ((xy[:, 0] < 0) | (xy[:, 0] >= w) | (xy[:, 1] < 0) | (xy[:, 1] >= h)).all()
    assert checked > 500


def test_uint8_composite_matches_float_alpha_blend():
    ref, pose = _sample(2, 7)
    bg_arr = np.random.default_rng(0).integers(0, 256, (SIZE[1], SIZE[0], 3), dtype=np.uint8)
    cfg = C.CompositeConfig(resolution=SIZE, scale_range=(1.0, 1.0), max_crop=0.0, jitter=0.0)
    comp = C.composite_reference(ref, pose, Image.fromarray(bg_arr), cfg, random.Random(0), keep_background=True)
    # scale 1: the render is pasted unscaled, so the float blend can be computed from it directly.
    sx, sy, tx, ty = comp.transform
    assert (sx, sy) == (1.0, 1.0)
    canvas = np.zeros((SIZE[1], SIZE[0], 4), np.float64)
    h, w = ref.shape[:2]
    ox, oy = int(tx), int(ty)
    ys, xs = slice(max(oy, 0), min(oy + h, SIZE[1])), slice(max(ox, 0), min(ox + w, SIZE[0]))
    canvas[ys, xs] = ref[ys.start - oy:ys.stop - oy, xs.start - ox:xs.stop - ox]
    a = canvas[..., 3:] / 255
    expected = canvas[..., :3] * a + bg_arr * (1 - a)
    assert np.abs(comp.image - expected).max() <= 1.0


def test_a_side_cut_by_the_render_frame_stays_at_the_canvas_edge():
    ref = np.zeros((384, 256, 4), np.uint8)
    ref[200:, 60:190] = (200, 100, 50, 255)  # a body cut by the bottom of the frame
    pose = parse_pose({"width": 256, "height": 384, "names": [], "keypoints": []})
    cfg = C.CompositeConfig(resolution=SIZE, scale_range=(0.6, 1.0), max_crop=0.2)
    rng = random.Random(3)
    for _ in range(30):
        comp = C.composite_reference(ref, pose, Image.new("RGB", SIZE), cfg, rng)
        assert (comp.mask[-1] == 0).any(), "the cut bottom edge moved up into the canvas"


def test_empty_reference_is_an_error_the_loader_can_count():
    ref = np.zeros((64, 32, 4), np.uint8)
    pose = parse_pose({"width": 32, "height": 64, "names": [], "keypoints": []})
    with pytest.raises(C.EmptyReferenceError):
        C.composite_reference(ref, pose, Image.new("RGB", SIZE), C.CompositeConfig(resolution=SIZE), random.Random(0))


def test_standard_images_are_letterboxed_bilinear_onto_white():
    """The loader fits standards with serialgen.imaging.letterbox, bilinear as it always has: the
    image part equals PIL's bilinear resize, the padding is white, the transform maps its pixels."""
    from serialgen.imaging import letterbox

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 40, 3), dtype=np.uint8))
    canvas, (sx, sy, tx, ty) = letterbox(img, (200, 300), resample="bilinear")
    arr = np.asarray(canvas)
    assert canvas.size == (200, 300) and sx == sy == 5.0 and (tx, ty) == (0.0, 25.0)
    assert (arr[:25] == 255).all() and (arr[275:] == 255).all()
    np.testing.assert_array_equal(arr[25:275], np.asarray(img.resize((200, 250), Image.BILINEAR)))


def test_background_pool_crops_skips_bad_files_and_fails_clearly(tmp_path):
    good = [synth_background(tmp_path / f"bg{i}.jpg", i, size=(300, 200)) for i in range(2)]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    pool = C.BackgroundPool([str(p) for p in good] + [str(bad)], SIZE, random.Random(0), pool_size=8, refresh=0.5)
    for _ in range(40):
        crop = pool.sample()
        assert crop.size == SIZE and crop.mode == "RGB"
    assert list(pool.bad) == [str(bad)]
    only_bad = C.BackgroundPool([str(bad)], SIZE, random.Random(0))
    with pytest.raises(UserInputError, match="none of the 1 background"):
        only_bad.sample()
    procedural = C.BackgroundPool([], SIZE, random.Random(0), pool_size=2)
    assert np.asarray(procedural.sample()).std() > 5
    with pytest.raises(UserInputError, match="does not exist"):
        C.list_background_images(tmp_path / "nope")
    assert C.list_background_images(tmp_path) == sorted(str(p) for p in [bad, *good])


def test_real_backgrounds_load(shared_assets):
    folder = shared_assets / "backgrounds"
    paths = C.list_background_images(folder)
    assert any(p.endswith(".jpg") for p in paths) and any(p.endswith(".png") for p in paths)
    pool = C.BackgroundPool(paths, (512, 768), random.Random(0), pool_size=len(paths), refresh=0.0)
    for _ in range(len(paths) + 2):
        assert pool.sample().size == (512, 768)
    assert not pool.bad


# ---------------------------------------------------------------------------------------------
# The fast paths (docs/loader.md, "Throughput"): each equals the plain computation it replaces.
# ---------------------------------------------------------------------------------------------

def _random_rgba(shape, seed, coloured_empty):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, shape + (4,), dtype=np.uint8)
    a[..., 3][rng.random(shape) < 0.4] = 0
    a[..., 3][rng.random(shape) < 0.4] = 255
    if not coloured_empty:
        a[a[..., 3] == 0] = 0
    return a


@pytest.mark.parametrize("coloured_empty", [False, True])
def test_fused_jitter_premultiply_equals_pil_point_then_convert(coloured_empty):
    """The compiled pass (dataset/fused.py) gives PIL's bytes: ``point`` through the table, then
    ``convert("RGBa")``, on a box of a bigger image (rows not contiguous) and on the whole image."""
    a = _random_rgba((60, 90), 3, coloured_empty)
    for table in (C.jitter_table(random.Random(1), 0.0), C.jitter_table(random.Random(2), 0.3)):
        lut = table.ravel().tolist() + list(range(256))
        for y0, y1, x0, x1 in ((0, 60, 0, 90), (5, 50, 7, 80)):
            box = np.ascontiguousarray(a[y0:y1, x0:x1])
            expected = np.asarray(Image.fromarray(box, "RGBA").point(lut).convert("RGBa"))
            out = np.empty_like(box)
            fused.jitter_premultiply(a, y0, y1, x0, x1, table, out)
            np.testing.assert_array_equal(out, expected)


def test_fused_over_and_mask_equals_pil_paste_and_the_alpha_threshold():
    """Premultiplied "over" as PIL's ``paste`` with an ``RGBa`` mask, and the mask alpha < 128, onto
    a strided background window; only the box is touched."""
    prem = np.asarray(Image.fromarray(_random_rgba((30, 20), 7, False), "RGBA").convert("RGBa"))
    big = np.random.default_rng(8).integers(0, 256, (90, 70, 3), dtype=np.uint8)
    background = big[10:70, 5:45]  # a window: rows not contiguous
    out = np.full((60, 40, 3), 7, np.uint8)
    mask = np.full((60, 40), 7, np.uint8)
    fused.over_and_mask(prem[4:26, 3:18], 11, 9, background, out, mask)
    region = Image.fromarray(np.ascontiguousarray(background[11:33, 9:24]))
    patch = Image.frombuffer("RGBa", (15, 22), np.ascontiguousarray(prem[4:26, 3:18]), "raw", "RGBa", 0, 1)
    region.paste(patch, (0, 0), patch)
    np.testing.assert_array_equal(out[11:33, 9:24], np.asarray(region))
    np.testing.assert_array_equal(mask[11:33, 9:24], (prem[4:26, 3:18, 3] < 128).astype(np.uint8))
    assert (out[:11] == 7).all() and (mask[33:] == 7).all()  # outside the box: untouched


def test_resize_channels_last_equals_torch_planar_result():
    import torch
    import torch.nn.functional as F

    box = np.asarray(Image.fromarray(_random_rgba((70, 50), 4, False), "RGBA").convert("RGBa"))
    for size in ((41, 57), (64, 90)):
        out = C._resize_premultiplied(box, size)
        planar = F.interpolate(torch.from_numpy(box).permute(2, 0, 1)[None].contiguous(), size=size[::-1],
                               mode="bilinear", antialias=True, align_corners=False)[0].permute(1, 2, 0).numpy()
        assert out.shape == (size[1], size[0], 4) and out.flags.c_contiguous
        np.testing.assert_array_equal(out, planar)


@pytest.mark.parametrize("width", [240, 120], ids=["wide-box", "narrow-box"])
def test_jittered_composite_matches_float_blend_of_the_jittered_render(width):
    """Jitter on straight colours, then premultiplied resampling and blending: at scale 1 the
    result is the float blend of the jittered render."""
    ref = np.zeros((384, 256, 4), np.uint8)
    rng_np = np.random.default_rng(6)
    ref[40:340, 8:8 + width, :3] = rng_np.integers(0, 256, (300, width, 3))
    alpha = np.full((300, width), 255, np.uint8)
    alpha[:, :3] = [40, 128, 200]  # an antialiased rim on the left
    alpha[:, -2:] = [150, 60]
    alpha[rng_np.random((300, width)) < 0.05] = 0  # holes
    ref[40:340, 8:8 + width, 3] = alpha
    ref[ref[..., 3] == 0, :3] = 0
    pose = parse_pose({"width": 256, "height": 384, "names": [], "keypoints": []})
    bg_arr = np.random.default_rng(1).integers(0, 256, (SIZE[1], SIZE[0], 3), dtype=np.uint8)
    cfg = C.CompositeConfig(resolution=SIZE, scale_range=(1.0, 1.0), max_crop=0.0, jitter=0.08)
    for seed in range(4):  # contrast up and down: black kept or lifted
        comp = C.composite_reference(ref, pose, Image.fromarray(bg_arr), cfg, random.Random(seed))
        r = random.Random(seed)
        C.place_reference((8, 40, 8 + width, 340), (256, 384), cfg, r)  # the same draws, in order
        lut = np.array(C.jitter_lut(r, cfg.jitter, alpha=True), np.uint8).reshape(4, 256)
        jittered = np.stack([lut[c][ref[..., c]] for c in range(4)], axis=2)
        sx, sy, tx, ty = comp.transform
        assert (sx, sy) == (1.0, 1.0)
        ox, oy = int(tx), int(ty)
        canvas = np.zeros((SIZE[1], SIZE[0], 4), np.float64)
        ys = slice(max(oy, 0), min(oy + 384, SIZE[1]))
        xs = slice(max(ox, 0), min(ox + 256, SIZE[0]))
        canvas[ys, xs] = jittered[ys.start - oy:ys.stop - oy, xs.start - ox:xs.stop - ox]
        a = canvas[..., 3:] / 255
        expected = canvas[..., :3] * a + bg_arr * (1 - a)
        assert np.abs(comp.image - expected).max() <= 1.0
        np.testing.assert_array_equal(comp.mask, (canvas[..., 3] < 128).astype(np.uint8))


def test_composite_into_a_batch_slot_equals_a_fresh_composite():
    ref, pose = _sample(1, 3)
    cfg = C.CompositeConfig(resolution=SIZE)
    bg = np.random.default_rng(2).integers(0, 256, (SIZE[1] + 50, SIZE[0] + 30, 3), dtype=np.uint8)
    window = bg[20:20 + SIZE[1], 10:10 + SIZE[0]]  # a window of a pool entry: strided rows
    placed = C.prepare_reference(ref, pose, cfg, random.Random(9))
    batch = np.zeros((2, SIZE[1], SIZE[0], 3), np.uint8)
    placed.composite_into(batch[1], window)
    comp = C.composite_reference(ref, pose, np.ascontiguousarray(window), cfg, random.Random(9))
    np.testing.assert_array_equal(batch[1], comp.image)
    assert not batch[0].any()
    masks = np.full((2, SIZE[1], SIZE[0]), 7, np.uint8)
    placed.mask_into(masks[0])
    np.testing.assert_array_equal(masks[0], comp.mask)
    assert (masks[1] == 7).all()


def test_background_pool_prescales_once_keeps_aspect_and_hands_out_windows(tmp_path):
    paths = [synth_background(tmp_path / "wide.jpg", 0, size=(900, 300)),
             synth_background(tmp_path / "tall.png", 1, size=(200, 700))]
    pool = C.BackgroundPool([str(p) for p in paths], SIZE, random.Random(0), pool_size=2, refresh=0.0, zoom=1.4)
    windows = [pool.sample_array() for _ in range(30)]
    assert pool.loads == 2 and len(pool.pool) == 2  # decoded and resized once each, then only windows
    for entry in pool.pool:
        h, w = entry.shape[:2]
        assert w >= SIZE[0] and h >= SIZE[1] and not entry.flags.writeable
        # The pre-scaled entry covers the canvas with zoom <= 1.4 on its tighter axis.
        assert min(w / SIZE[0], h / SIZE[1]) <= 1.4 + 0.02
    sources = {(900, 300): None, (200, 700): None}
    for entry in pool.pool:
        h, w = entry.shape[:2]
        src = min(sources, key=lambda s: abs(s[0] / s[1] - w / h))
        assert abs(src[0] / src[1] - w / h) < 0.01 * (src[0] / src[1])  # aspect kept
    for win in windows:
        assert win.shape == (SIZE[1], SIZE[0], 3)
        assert any(np.shares_memory(win, e) for e in pool.pool)  # a view, not a copy
    # Different windows over the run: random placement inside the entries.
    assert len({win.__array_interface__["data"][0] for win in windows}) > 5

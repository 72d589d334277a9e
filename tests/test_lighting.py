"""Lighting of non-standard images: the exposure floor (issue 13.5). The pure parts (median
foreground luminance, the gain) run in the fast tier; the Blender test renders a procedural
character under the darkest drawn lights and checks the floor holds where the drawn light alone
left it nearly black."""

from __future__ import annotations

import numpy as np
import pytest

from serialgen.render import lighting as lt


def test_fg_luminance_is_the_median_of_the_foreground():
    img = np.zeros((4, 4, 4), np.uint8)
    img[..., 3] = 255
    img[:2, :, :3] = 10  # 8 dark pixels
    img[2:, :, :3] = 200  # 8 light ones
    img[3, 3] = (255, 255, 255, 0)  # background: not counted
    # 15 foreground pixels, 8 of them at 10: the median is 10.
    assert lt.fg_luminance(img) == pytest.approx(10 / 255)
    # Rec. 709 weights on the encoded values: pure green is bright, pure blue dark.
    green = np.zeros((2, 2, 4), np.uint8)
    green[..., 1], green[..., 3] = 200, 255
    assert lt.fg_luminance(green) == pytest.approx(round(200 * 183 / 256) / 255)
    assert lt.fg_luminance(green, gain=(1.0, 0.5, 1.0)) == pytest.approx(round(100 * 183 / 256) / 255)
    assert lt.fg_luminance(np.zeros((3, 3, 4), np.uint8)) is None


def test_exposure_gain_lifts_to_the_floor_within_bounds():
    assert lt.exposure_gain(None) == 1.0
    assert lt.exposure_gain(0.5) == 1.0
    assert lt.exposure_gain(lt.EXPOSURE_FLOOR / 2) == pytest.approx(2.0)
    assert lt.exposure_gain(0.001) == lt.MAX_EXPOSURE_GAIN
    assert lt.REDRAW_BELOW * lt.MAX_EXPOSURE_GAIN == pytest.approx(lt.EXPOSURE_FLOOR)


@pytest.mark.blender
@pytest.mark.slow
def test_dark_lights_are_lifted_above_the_floor(tmp_path):
    """Workbench's ``basic.sl`` from 12 directions at the lowest intensity and the warmest colour:
    rendered as drawn, some frames are nearly black (median foreground < 25/255, what 6.5% of the
    samples of rendering/2 were); through the exposure floor, none is, and only the dark ones
    changed (a light that left the character bright keeps its gain 1 and no redraw)."""
    from serialgen.assets_manifest.geometry import camera as cm
    from serialgen.assets_manifest.procedural import build_mesh_data, describe_character, save_mesh_data
    from serialgen.render.camera import apply_camera
    from serialgen.render.job import BlenderWorker
    from serialgen.render.scene import RenderSettings

    desc = describe_character("proc-000003", 0)  # deep skin tone, dark clothes: the hard case
    save_mesh_data(build_mesh_data(desc), tmp_path / "meshes" / "c.npz")
    record = {"id": desc["id"], "kind": "procedural", "status": "accepted", "mesh_file": "meshes/c.npz"}
    worker = BlenderWorker(RenderSettings(width=64, height=96, threads=2))
    try:
        rig = worker._load_character(record, str(tmp_path)).rig
        rig.apply_pose(np.zeros((len(rig.posed_skeleton().names), 3)))
        view = cm.ViewSample(0.0, 10.0, 50.0, "full_body", 0.85, (0.0, 0.0))
        apply_camera(worker.scene.camera, worker.view_camera(rig, view))
        raw, floored = [], []
        for k in range(12):
            spec = lt.LightingSpec(30.0 * k, 20.0, 0.7, 3500.0, "basic.sl", True)
            lt.apply_lighting(worker.scene, spec, "workbench")
            raw.append(lt.fg_luminance(worker._render(worker.scene), lt.rgb_gain(spec)))
            lt.apply_lighting(worker.scene, spec, "workbench")
            rgba, used, record_ = worker._exposed_render(1000 + k, spec)
            floored.append(record_)
            assert record_["fg_luminance"] == pytest.approx(lt.fg_luminance(rgba), abs=1e-4)
            if raw[-1] >= lt.EXPOSURE_FLOOR:
                assert record_["gain"] == 1.0 and record_["redraws"] == 0 and used == spec
    finally:
        worker.unload()
    assert min(raw) < 25 / 255, raw  # the drawn lights alone do leave it dark
    assert min(r["fg_luminance"] for r in floored) >= 25 / 255, floored

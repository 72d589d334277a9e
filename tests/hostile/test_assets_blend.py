"""A .blend file never runs its scripts: neither a text block registered to run on load nor a
Python driver, when our importer appends its objects (the render worker and the asset probe both
import through ``render/importers.import_objects``)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.blender

MAKE = textwrap.dedent("""
    import sys
    from serialgen.render.bpy_utils import import_bpy, reset_scene
    bpy = import_bpy()
    out, marker = sys.argv[1], sys.argv[2]
    reset_scene()
    bpy.ops.mesh.primitive_cube_add()
    cube = bpy.context.active_object
    text = bpy.data.texts.new("evil.py")
    text.write(f"open({marker!r} + '.text', 'w').write('ran')\\n")
    text.use_module = True  # 'Register': runs when the file is opened with scripts allowed
    fcurve = cube.driver_add("location", 0)
    fcurve.driver.type = "SCRIPTED"
    fcurve.driver.expression = f"(open({marker!r} + '.driver', 'w').write('ran') and 0) or 1.0"
    bpy.ops.wm.save_as_mainfile(filepath=out)
""")

IMPORT = textwrap.dedent("""
    import sys
    from serialgen.render.bpy_utils import import_bpy, reset_scene
    from serialgen.render.importers import import_objects
    bpy = import_bpy()
    reset_scene()
    objects = import_objects(sys.argv[1])
    if len(sys.argv) > 2:  # the control: scripts allowed after the import
        bpy.context.preferences.filepaths.use_scripts_auto_execute = True
        bpy.app.driver_namespace["open"] = open
        objects[0].animation_data.drivers[0].driver.expression += " "  # re-registers the driver
    bpy.context.view_layer.update()  # evaluates drivers, if any were allowed to run
    print("objects", len(objects), "location", objects[0].location.x)
""")


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120)


def test_a_blend_file_never_runs_its_scripts(tmp_path):
    blend, marker = tmp_path / "evil.blend", tmp_path / "marker"
    made = _run(MAKE, str(blend), str(marker))
    assert made.returncode == 0 and blend.is_file(), made.stderr[-2000:]
    for leftover in tmp_path.glob("marker*"):  # the driver may already have run while the file was made
        leftover.unlink()
    out = _run(IMPORT, str(blend))
    assert out.returncode == 0 and "objects 1" in out.stdout, out.stderr[-2000:]
    assert not list(tmp_path.glob("marker*")), "a script inside the .blend ran"


def test_the_control_shows_the_driver_would_run_if_scripts_were_allowed(tmp_path):
    """Without this, the test above could pass because the driver never evaluates at all."""
    blend, marker = tmp_path / "evil.blend", tmp_path / "marker"
    assert _run(MAKE, str(blend), str(marker)).returncode == 0
    for leftover in tmp_path.glob("marker*"):
        leftover.unlink()
    out = _run(IMPORT, str(blend), "allow")
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "marker.driver").is_file()

"""Pure geometry shared by ``render/`` (which renders it) and ``dataset/`` (which draws it): the
pinhole camera model and random views (:mod:`.camera`), the standard-form spec (:mod:`.standard_form`)
and the measured head (:mod:`.head`). numpy only, no bpy: it sits beside the canonical skeleton, on
the floor both parts stand on, and is tested without Blender."""

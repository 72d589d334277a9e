"""Everything that runs inside Blender (``bpy``), and the Ray farm that runs Blender workers.

The modules here translate the pure geometry and assets (``serialgen.assets_manifest``) into a
Blender scene: ``scene`` (settings, engines, the render call), ``camera`` (``apply_camera``),
``lighting``, ``rig`` (the ``Rig`` protocol and ``CharacterRig``), ``characters`` (the loader table),
``procedural_build``, ``importers``/``real_character`` (users' files), ``mannequin`` (the test
character), ``keypoints`` and ``job`` (one render job in a worker). The farm that runs jobs on Ray is
the subpackage ``farm``.

``bpy``, ``mathutils``, ``bmesh`` and ``bpy_extras`` are reached only through ``bpy_utils`` (the one
gate), and never at package import, so the farm driver and the CLI stay light.
"""

"""Everything that runs inside Blender (``bpy``) and the Ray farm that runs Blender workers.

``bpy`` is imported only by modules of this package that need it, never at package import, so the
farm driver and the CLI stay light.
"""

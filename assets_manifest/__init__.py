"""Inputs: the canonical skeleton, characters (procedural and real), motions and poses,
backgrounds, and their JSONL manifests. Blender-free (torch only through ``anny``)."""

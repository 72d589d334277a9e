"""Shard format (writer, reader, index), on-the-fly compositing, pose maps, loaders. No bpy."""

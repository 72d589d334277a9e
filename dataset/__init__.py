"""Datasets: the tar-set format layer (``tarset``) and its two schemas, render pairs (``shards``) and
Stage II pairs (``pairs``); the Stage I loader (``loader``: on-the-fly compositing, pose maps) and
the Stage II dataset (``stage2_loader``). No bpy; imports neither render nor training."""

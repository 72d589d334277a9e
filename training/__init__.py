"""Stage I (ReferenceNet + denoiser, FBDM, RPIM) and Stage II (IP-Adapter on SDXL): models,
training loops, pipelines and metrics. No bpy, no Ray internals."""

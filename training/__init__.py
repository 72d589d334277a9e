"""Training and inference of the two models, built on diffusers + accelerate. No bpy, no Ray internals.

- ``common/``: what both stages use: the config system, checkpoints, resumable data order, run logs,
  image metrics, tiny test models;
- ``stage1/``: standardization (ReferenceNet + denoising UNet, FBDM, RPIM): model, training,
  ``standardize``, ``eval standardization``;
- ``stage2/``: personalization (IP-Adapter on SDXL): pair building, training, ``generate``,
  ``eval personalization``. Stage II runs Stage I (pair building, generation); Stage I never imports
  Stage II, and ``common`` imports neither.

Each stage names its modules the same way: ``config``, ``components``, ``train``, ``evaluate``, ``cli``.
``configs/`` holds the packaged YAML configs (``--config stage1-tiny`` etc.).
"""

"""SerialGen: rigged 3D characters in, (non-standard, standard) training pairs and models out.

The parts live in the product card's folders and import as ``serialgen.<part>``:
``assets_manifest`` (inputs), ``render`` (Blender + Ray farm), ``dataset`` (shards, loader),
``training`` (models, training, inference, metrics). Data flows one way between them.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]

"""Where numba keeps the machine code of serialgen's compiled kernels (``cache=True``).

The loader's compositing (``dataset/fused.py``) and the renderer's frame passes
(``render/frame_kernels.py``) are compiled once per machine and cached. numba puts the cache beside
the source file when that folder is writable, else in the user's cache folder (``~/.cache``), and
**fails at import** ("cannot cache function ...: no locator available") when neither is: a wheel
installed into a read-only image run as a user whose home is read-only too (containers on a
cluster). :func:`ensure_writable_cache` runs before those modules import numba: where neither place
is writable and ``NUMBA_CACHE_DIR`` is not set, it points numba at a folder in the temporary
directory, so the kernels still compile (once per container) instead of the import failing.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

__all__ = ["ensure_writable_cache"]


def _writable(folder: Path) -> bool:
    """True when files can be made in ``folder`` (made if missing)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def ensure_writable_cache(module_file: str) -> str | None:
    """Make sure numba can cache the kernels of ``module_file``; returns the ``NUMBA_CACHE_DIR`` it
    set, or None when numba's own choice works (or the user chose one)."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return None
    beside = Path(module_file).resolve().parent / "__pycache__"
    user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "numba"
    if _writable(beside) or _writable(user):
        return None
    fallback = Path(tempfile.gettempdir()) / f"serialgen-numba-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    os.environ["NUMBA_CACHE_DIR"] = str(fallback)
    if "numba.core.config" in sys.modules:  # numba read its settings already: read them again
        sys.modules["numba.core.config"].reload_config()
    return str(fallback)

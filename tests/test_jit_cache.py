"""serialgen/jit_cache.py: numba's cache falls back to the temporary directory where neither the
source's folder nor the user's cache folder is writable (numba would fail at import there)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from serialgen import jit_cache


def test_numbas_own_places_are_kept_when_writable(tmp_path, monkeypatch):
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert jit_cache.ensure_writable_cache(str(tmp_path / "src" / "kernels.py")) is None
    assert "NUMBA_CACHE_DIR" not in os.environ
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "mine"))  # the user's choice wins
    assert jit_cache.ensure_writable_cache(str(tmp_path / "src" / "kernels.py")) is None


def test_read_only_places_fall_back_to_a_temporary_folder_and_kernels_still_compile(tmp_path):
    """In a fresh interpreter whose source folder and home cache cannot be written (simulated: the
    writability probe says no for both), the kernels of both compiled modules import, compile and
    cache into the fallback folder."""
    code = textwrap.dedent(f"""
        import os, tempfile
        from pathlib import Path
        from serialgen import jit_cache
        real = jit_cache._writable
        jit_cache._writable = lambda folder: False if "__pycache__" in str(folder) or "numba" == folder.name else real(folder)
        os.environ.pop("NUMBA_CACHE_DIR", None)
        tempfile.tempdir = {str(tmp_path)!r}
        import numpy as np
        from serialgen.render import frame_kernels
        from serialgen.dataset import fused
        print(os.environ["NUMBA_CACHE_DIR"])
        frame = np.zeros((6, 6, 4), np.uint8); frame[2:4, 2:4] = 200
        print(frame_kernels.alpha_box(frame))
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    folder, box = run.stdout.split("\n")[:2]
    assert folder.startswith(str(tmp_path)) and box == "(2, 4, 2, 4)"
    assert any(p.suffix in (".nbi", ".nbc") for p in (tmp_path).rglob("*")), "nothing cached in the fallback"

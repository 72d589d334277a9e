"""The distribution carries the whole tree: every package is listed in pyproject, and a wheel built
from the tree installs and runs ``serialgen --help`` (with the packaged configs)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_folder_is_listed():
    tool = _pyproject()["tool"]["setuptools"]
    listed, dirs = set(tool["packages"]), tool["package-dir"]
    found = set()
    for name, folder in dirs.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]))
    assert found - listed == set(), "packages missing from pyproject's [tool.setuptools] packages"
    assert listed - found == set(), "pyproject lists packages that do not exist"


@pytest.mark.slow
def test_a_wheel_built_from_the_tree_runs(tmp_path):
    # Build from a copy of the tracked files: an in-tree build leaves build/ and *.egg-info behind.
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        path = ROOT / rel
        if path.is_file() and not path.is_symlink():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, src / rel)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("serialgen-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "serialgen/training/configs/stage1.yaml" in names
    assert "serialgen/render/farm/driver.py" in names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    # The installed copy, not the checkout: -I ignores PYTHONPATH and the user site; the
    # dependencies come from this environment's site-packages, appended after the wheel's files.
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import serialgen, serialgen.cli;"
            "import serialgen.render.farm.driver as d, serialgen.training.stage2.train as t;"
            "assert all(m.__file__.startswith(sys.argv[1]) for m in (serialgen, d, t)), (d.__file__, t.__file__);"
            "from serialgen.training.common.config import packaged_config; packaged_config('stage1-tiny');"
            "sys.argv = ['serialgen', '--help']; serialgen.cli.main()")
    out = subprocess.run([sys.executable, "-I", "-c", code, str(target)], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": ""}, cwd=tmp_path)
    assert "render" in out.stdout and "train" in out.stdout, out.stderr[-2000:]

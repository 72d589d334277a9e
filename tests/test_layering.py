"""The floors of the house, checked on the source: no import runs up the data flow.

Data flows one way (manifests -> render -> shards -> loader -> training), so a lower floor never
imports a higher one:

    base (serialgen.errors, .imaging, .resolution)  <  assets_manifest (with geometry/)
    <  dataset, render (render may use dataset's shard writer; dataset never imports render)
    <  training  <  serialgen.cli (the top: it wires every part's commands)

Imports are read with ``ast`` (module-level, inside functions, relative ones), and so are strings
that name one of our modules (``python -m serialgen.render.inspect_asset`` started as a subprocess
is an import no import graph sees). Nothing is imported or run.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# import namespace -> folder (pyproject's package-dir)
PARTS = {"assets_manifest": "assets_manifest", "render": "render", "dataset": "dataset", "training": "training"}
BASE = {"serialgen", "serialgen.errors", "serialgen.imaging", "serialgen.resolution"}
TOP = {"serialgen.cli"}
# What each floor may import, besides the base and itself.
ALLOWED = {
    "base": set(),
    "assets_manifest": set(),
    "dataset": {"assets_manifest"},
    "render": {"assets_manifest", "dataset"},
    "training": {"assets_manifest", "dataset"},
    "top": {"assets_manifest", "dataset", "render", "training"},
}
_MODULE_STRING = re.compile(r"serialgen(\.[A-Za-z_][A-Za-z0-9_]*)+")
BPY_MODULES = ("bpy", "mathutils", "bpy_extras")
BPY_GATE = "render/bpy_utils.py"


def floor_of(module: str) -> str | None:
    """The floor of a ``serialgen...`` module name (None: not ours)."""
    if module in TOP:
        return "top"
    parts = module.split(".")
    if parts[0] != "serialgen":
        return None
    if len(parts) > 1 and parts[1] in PARTS:
        return parts[1]
    return "base"


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root)
    if rel.parts[0] in PARTS.values():
        part = {v: k for k, v in PARTS.items()}[rel.parts[0]]
        dotted = ["serialgen", part, *rel.with_suffix("").parts[1:]]
    else:  # serialgen/
        dotted = list(rel.with_suffix("").parts)
    if dotted[-1] == "__init__":
        dotted = dotted[:-1]
    return ".".join(dotted)


def referenced_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str, str]]:
    """(line, referenced module, how) for every import and every string naming a serialgen module."""
    tree = ast.parse(source)
    out = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, "import") for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((node.lineno, name, "import"))
            # `from serialgen import render` imports the part itself
            out += [(node.lineno, f"{name}.{a.name}", "import") for a in node.names
                    if name == "serialgen" and a.name in PARTS]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _MODULE_STRING.fullmatch(node.value):
            out.append((node.lineno, node.value, "module string"))
    return out


def violations(root: Path) -> list[str]:
    """Every import (or module string) from a lower floor to a higher one, as 'file:line: ...'."""
    found = []
    folders = [root / "serialgen", *(root / f for f in PARTS.values())]
    for folder in folders:
        for path in sorted(folder.rglob("*.py")):
            module = _module_name(path, root)
            here = floor_of(module)
            for line, target, how in referenced_modules(path.read_text(), module, path.name == "__init__.py"):
                there = floor_of(target)
                if there is None or there == here or there == "base":
                    continue
                if there not in ALLOWED[here]:
                    found.append(f"{path.relative_to(root)}:{line}: {here} -> {there} ({how} {target})")
    return found


# Inside training/: what both stages share, then Stage I, then Stage II (two-stage generation and
# pair building run Stage I; Stage I never needs Stage II).
TRAINING_ORDER = {"common": 0, "stage1": 1, "stage2": 2}


def training_violations(root: Path) -> list[str]:
    """Imports inside training/ that run from common to a stage, or from Stage I to Stage II."""
    found = []
    for path in sorted((root / PARTS["training"]).rglob("*.py")):
        module = _module_name(path, root)
        here = TRAINING_ORDER.get(module.split(".")[2] if module.count(".") >= 2 else "")
        if here is None:
            continue
        for line, target, how in referenced_modules(path.read_text(), module, path.name == "__init__.py"):
            parts = target.split(".")
            if parts[:2] != ["serialgen", "training"] or len(parts) < 3 or parts[2] not in TRAINING_ORDER:
                continue
            if TRAINING_ORDER[parts[2]] > here:
                found.append(f"{path.relative_to(root)}:{line}: training.{module.split('.')[2]} -> "
                             f"training.{parts[2]} ({how} {target})")
    return found


def bpy_imports(root: Path) -> list[str]:
    """Every import of bpy/mathutils/bpy_extras outside the one gate."""
    found = []
    folders = [root / "serialgen", *(root / f for f in PARTS.values())]
    for folder in folders:
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if rel == BPY_GATE:
                continue
            for line, target, how in referenced_modules(path.read_text(), _module_name(path, root), False):
                if how == "import" and target.split(".")[0] in BPY_MODULES:
                    found.append(f"{rel}:{line}: imports {target} (use {BPY_GATE})")
    return found


def test_no_import_runs_up_the_data_flow():
    assert violations(ROOT) == []


def test_training_common_then_stage1_then_stage2():
    assert training_violations(ROOT) == []


def test_bpy_is_reached_through_one_gate():
    assert bpy_imports(ROOT) == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


@pytest.mark.parametrize("rel, text, expected", [
    ("dataset/loader.py", "from serialgen.render.standard import x\n", "dataset -> render (import"),
    ("dataset/sub/__init__.py", "from ...render import job\n", "dataset -> render (import"),
    ("assets_manifest/scan.py", "import subprocess\ncmd = ['python', '-m', 'serialgen.render.inspect_asset']\n",
     "assets_manifest -> render (module string"),
    ("assets_manifest/scan.py", "def f():\n    from serialgen import dataset\n", "assets_manifest -> dataset"),
    ("render/job.py", "import serialgen.training.stage1.model\n", "render -> training"),
    ("serialgen/errors.py", "from serialgen.dataset import shards\n", "base -> dataset"),
])
def test_the_checker_finds_each_kind_of_violation(tmp_path, rel, text, expected):
    root = _tree(tmp_path, {rel: text})
    for folder in ["serialgen", *PARTS.values()]:
        (root / folder).mkdir(exist_ok=True)
    found = violations(root)
    assert len(found) == 1 and expected in found[0], found


def test_the_checker_allows_the_data_flow_and_prose(tmp_path):
    root = _tree(tmp_path, {
        "render/job.py": "from serialgen.dataset import shards\nfrom serialgen.assets_manifest import skeleton\n",
        "training/train.py": "from serialgen.dataset.loader import x\n'''Reads serialgen.render.job output.'''\n",
        "dataset/loader.py": "from serialgen.errors import UserInputError\nfrom serialgen.imaging import letterbox\n",
        "serialgen/cli.py": "MODS = ['serialgen.render.cli', 'serialgen.training.stage1.cli']\n",
    })
    for folder in ["serialgen", *PARTS.values()]:
        (root / folder).mkdir(exist_ok=True)
    assert violations(root) == []
    assert training_violations(_tree(tmp_path, {"training/stage1/x.py": "from ..stage2 import train\n"})) == [
        "training/stage1/x.py:1: training.stage1 -> training.stage2 (import serialgen.training.stage2)"]
    assert bpy_imports(_tree(tmp_path, {"dataset/x.py": "def f():\n    import bpy\n"})) == [
        "dataset/x.py:2: imports bpy (use render/bpy_utils.py)"]

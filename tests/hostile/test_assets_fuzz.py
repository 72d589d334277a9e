"""Property-based fuzzing (hypothesis) of the two parsers `assets build` runs on strangers' files:
the BVH parser (``bvh.parse_bvh``) and the glTF probe (``gltf_probe.probe_gltf``).

The property, for every generated input: it parses, or it is rejected with a reason (``BvhError``
with a manifest reason; ``{"ok": False, "reason"}`` from the probe, never an exception), within a
time bound (a SIGALRM timer: a parser that loops fails the test instead of hanging it). For the
probe also: a URI that Blender's importer would resolve outside the asset's folder is never
accepted. Examples are derandomised (the same cases on every run) and no example database is
written into the checkout.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from serialgen.assets_manifest.bvh import BvhError, BvhMotion, parse_bvh
from serialgen.assets_manifest.gltf_probe import probe_gltf

from _bounds import within

_COMMON = dict(deadline=None, derandomize=True, database=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
# Each property runs twice: a few examples in the quick tier, many in the slow one.
QUICK = settings(max_examples=40, **_COMMON)
THOROUGH = settings(max_examples=1500, **_COMMON)
BOUND_S = 2.0
REASONS = {"import_failed", "too_large", "resource_outside_asset"}


def _parses_or_rejects(text: str) -> str:
    """"parsed" or "rejected: <reason>"; anything else (another exception, a hang) fails."""
    with within(BOUND_S):
        try:
            m = parse_bvh(text, "fuzz.bvh")
        except BvhError as e:
            assert e.reason in ("import_failed", "too_large") and "fuzz.bvh" in str(e)
            return f"rejected: {e.reason}"
    assert isinstance(m, BvhMotion) and m.n_frames >= 1 and m.rotations.shape[1] == len(m.names)
    return "parsed"


# ---------------------------------------------------------------------------------------------
# BVH
# ---------------------------------------------------------------------------------------------

_VALID = ("HIERARCHY ROOT Hips { OFFSET 0 0 0 CHANNELS 6 Xposition Yposition Zposition Zrotation Xrotation "
          "Yrotation JOINT Spine { OFFSET 0 1 0 CHANNELS 3 Zrotation Xrotation Yrotation End Site { OFFSET 0 1 0 } "
          "} } MOTION Frames: 2 Frame Time: 0.0333 0 0 0 0 0 0 0 0 0 1 2 3 4 5 6 7 8 9").split()
_TOKENS = st.one_of(
    st.sampled_from(["{", "}", "ROOT", "JOINT", "End", "Site", "OFFSET", "CHANNELS", "MOTION", "Frames:", "Frame",
                     "Time:", "HIERARCHY", "Xrotation", "Yposition", "Wrotation", "-2", "-1", "0", "6", "7",
                     "99999999999", "nan", "inf", "-inf", "1e308", "0.0", "x", ""]),
    st.integers(-10, 10).map(str), st.floats(allow_nan=True).map(repr), st.text(max_size=6))


@st.composite
def _mutated_bvh(draw) -> str:
    """A valid BVH with a few tokens replaced, deleted or inserted."""
    toks = list(_VALID)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["replace", "delete", "insert"]))
        k = draw(st.integers(0, len(toks) - 1))
        if op == "replace":
            toks[k] = draw(_TOKENS)
        elif op == "delete" and len(toks) > 1:
            del toks[k]
        else:
            toks.insert(k, draw(_TOKENS))
    return draw(st.sampled_from([" ", "\n", "\t"])).join(toks)


def _bvh_tests(strategy, name):
    """A quick and a thorough (slow tier) test of one BVH strategy."""

    def check(text):
        event(_parses_or_rejects(text))

    quick = QUICK(given(strategy)(check))
    thorough = pytest.mark.slow(THOROUGH(given(strategy)(check)))
    quick.__name__, thorough.__name__ = f"test_bvh_parser_on_{name}", f"test_bvh_parser_on_{name}_thorough"
    return quick, thorough


test_bvh_parser_on_any_text, test_bvh_parser_on_any_text_thorough = _bvh_tests(st.text(max_size=400), "any_text")
test_bvh_parser_on_mutated_files, test_bvh_parser_on_mutated_files_thorough = _bvh_tests(_mutated_bvh(),
                                                                                         "mutated_files")


def test_bvh_fuzz_reaches_both_outcomes():
    """The mutation strategy is not vacuous: the valid file parses and a mutation is rejected."""
    assert _parses_or_rejects(" ".join(_VALID)) == "parsed"
    with pytest.raises(BvhError):
        parse_bvh(" ".join(_VALID).replace("CHANNELS 3", "CHANNELS -2"), "x.bvh")


# ---------------------------------------------------------------------------------------------
# glTF probe
# ---------------------------------------------------------------------------------------------

_JSON = st.recursive(st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False) | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                 max_size=4),
                     max_leaves=12)
_URI = st.lists(st.sampled_from(["..", ".", "a", "sub", "x.png", "%2e%2e", "%2F", "\\", "/", "link", "data:", "file:",
                                 "C:", "%00", "~"]), min_size=1, max_size=6).map(lambda parts: "/".join(parts))


@st.composite
def _gltf_doc(draw) -> dict:
    """glTF-shaped documents: the keys the probe reads, with values of any JSON type and URIs built
    from path pieces that climb, escape, encode and link."""
    doc = {"asset": draw(st.one_of(st.just({"version": "2.0"}), _JSON))}
    for key in ("images", "buffers", "materials", "textures", "meshes", "animations", "extensions",
                "extensionsUsed", "nodes"):
        if draw(st.booleans()):
            doc[key] = draw(st.one_of(_JSON, st.lists(st.fixed_dictionaries({"uri": _URI}), max_size=3)))
    return doc


def _blender_reads_outside(folder: Path, uri) -> bool:
    """Where Blender's glTF importer would read a URI (io_scene_gltf2 ``uri_to_path``): outside?"""
    if not isinstance(uri, str) or uri.startswith("data:"):
        return False
    rel = unquote(uri.replace("\\", "/"))
    if "\x00" in rel:
        return False  # no file can be opened by that name
    path = os.path.realpath(os.path.join(folder, os.path.normpath(rel)))
    root = os.path.realpath(folder)
    return os.path.commonpath([path, root]) != root


def _probe_answers(path: Path) -> dict:
    with within(BOUND_S):
        res = probe_gltf(path, max_bytes=1 << 20)
    assert isinstance(res, dict) and isinstance(res["ok"], bool)
    if not res["ok"]:
        assert res["reason"] in REASONS and res["detail"].startswith(path.name)
    event("accepted" if res["ok"] else f"rejected: {res['reason']}")
    return res


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("gltf")
    (root / "asset" / "sub").mkdir(parents=True)
    (root / "asset" / "x.png").write_bytes(b"png")
    (root / "x.png").write_bytes(b"outside")
    (root / "asset" / "link").symlink_to(root)  # a folder link leading out
    return root / "asset"


def _check_gltf_doc(fuzz_dir, doc):
    path = fuzz_dir / "f.gltf"
    path.write_text(json.dumps(doc))
    res = _probe_answers(path)
    uris = [i.get("uri") for key in ("images", "buffers") if isinstance(doc.get(key), list)
            for i in doc[key] if isinstance(i, dict)]
    if any(_blender_reads_outside(fuzz_dir, u) for u in uris):
        assert not res["ok"], (uris, res)


def _check_bytes(fuzz_dir, data):
    path = fuzz_dir / "f.glb"
    path.write_bytes(data)
    _probe_answers(path)


def _check_glb_header(fuzz_dir, version, length, chunks):
    """GLB containers whose header and chunk lengths lie."""
    body = b"".join(struct.pack("<II", clen, ctype) + payload for clen, ctype, payload in chunks)
    path = fuzz_dir / "h.glb"
    path.write_bytes(struct.pack("<4sII", b"glTF", version, length) + body)
    _probe_answers(path)


_GLB_HEADER = dict(version=st.integers(0, 3), length=st.integers(0, (1 << 32) - 1), chunks=st.lists(
    st.tuples(st.integers(0, (1 << 32) - 1), st.sampled_from([0x4E4F534A, 0x004E4942, 0]), st.binary(max_size=40)),
    max_size=3))


@QUICK
@given(doc=_gltf_doc())
def test_gltf_probe_on_gltf_shaped_json(fuzz_dir, doc):
    _check_gltf_doc(fuzz_dir, doc)


@pytest.mark.slow
@THOROUGH
@given(doc=_gltf_doc())
def test_gltf_probe_on_gltf_shaped_json_thorough(fuzz_dir, doc):
    _check_gltf_doc(fuzz_dir, doc)


@QUICK
@given(data=st.binary(max_size=300))
def test_gltf_probe_on_any_bytes(fuzz_dir, data):
    _check_bytes(fuzz_dir, data)


@pytest.mark.slow
@THOROUGH
@given(data=st.binary(max_size=300))
def test_gltf_probe_on_any_bytes_thorough(fuzz_dir, data):
    _check_bytes(fuzz_dir, data)


@QUICK
@given(**_GLB_HEADER)
def test_gltf_probe_on_glb_headers(fuzz_dir, version, length, chunks):
    _check_glb_header(fuzz_dir, version, length, chunks)


@pytest.mark.slow
@THOROUGH
@given(**_GLB_HEADER)
def test_gltf_probe_on_glb_headers_thorough(fuzz_dir, version, length, chunks):
    _check_glb_header(fuzz_dir, version, length, chunks)

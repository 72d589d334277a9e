"""Property-based fuzzing (hypothesis) of the two parsers of render-pair shard sets that read what
strangers may hand us: the index reader (``shards.read_index`` on the format layer) and the shard
reader (``tarset.read_samples``, under the loader and the previews, and the loader's whole sample
path). Any input either parses or is rejected with a reason (``TarSetError``, a ``Rejected``
item, or a counted skip), never another exception, and within a time bound.

The runs are derandomized (the same examples every run, no example database written), so CI sees
the same cases each time; ``HYPOTHESIS_PROFILE=fuzz`` runs many more, random ones.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serialgen.dataset import shards as S
from serialgen.dataset import tarset as T
from serialgen.dataset.loader import LoaderConfig, RenderPairDataset
from test_loader_synth import synth_pair

settings.register_profile("ci", max_examples=150, deadline=1000, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", max_examples=5000, deadline=1000, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SIZE = (32, 48)
TIME_BOUND_S = 1.0  # per input: a parser that loops or reads a huge claimed size fails this


def _valid_shard() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(2):
            key = f"k{i}"
            for name, data in synth_pair(1, i, size=SIZE, key=key).items():
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


VALID_SHARD = _valid_shard()


def _valid_index() -> dict:
    return {"format": S.SHARD_FORMAT, "format_version": 2, "versions": {}, "sample_schema": S.SAMPLE_SCHEMA,
            "members": list(S.MEMBERS), "config": {}, "splits": {}, "samples": 2, "failures": [],
            "shards": [{"path": "train/a.tar", "split": "train", "samples": 2, "bytes": 10, "sha256": "0" * 64}],
            "standard_pose": {"width": 6, "height": 8, "names": ["a"], "keypoints": [[1, 2, 1]]},
            "characters": {"c": {"split": "train", "standard_pose": {"width": 6, "height": 8, "names": ["a"],
                                                                    "keypoints": [[1, 2, 1]]}}}}


def _mutations(data: bytes):
    """Strategies of damage to ``data``: flipped bytes, cuts, inserted or overwritten runs."""
    n = len(data)
    flips = st.lists(st.tuples(st.integers(0, n - 1), st.integers(1, 255)), min_size=1, max_size=8).map(
        lambda fl: bytes(_flip(data, fl)))
    cuts = st.integers(0, n).map(lambda at: data[:at])
    inserts = st.tuples(st.integers(0, n), st.binary(min_size=1, max_size=600)).map(
        lambda t: data[:t[0]] + t[1] + data[t[0]:])
    overwrites = st.tuples(st.integers(0, n - 1), st.binary(min_size=1, max_size=600)).map(
        lambda t: data[:t[0]] + t[1] + data[t[0] + len(t[1]):])
    return st.one_of(flips, cuts, inserts, overwrites)


def _flip(data: bytes, flips) -> bytearray:
    out = bytearray(data)
    for i, mask in flips:
        out[i] ^= mask
    return out


def _headers_only(data: bytes):
    """Damage aimed at the tar headers: fields rewritten with digits, spaces, NULs and signs, so
    the checksum can still match and the parser sees odd sizes, types and names."""
    offsets = [0, 512 * ((len(data) // 512) // 3)]

    def rewrite(t):
        block, field, text = t
        out = bytearray(data)
        start = offsets[block] + field
        out[start:start + len(text)] = text
        header = out[offsets[block]:offsets[block] + 512]
        header[148:156] = b" " * 8
        out[offsets[block] + 148:offsets[block] + 156] = b"%06o\0 " % sum(header)  # re-sign the header
        return bytes(out)

    fields = st.sampled_from([0, 100, 124, 136, 148, 156, 157, 257, 345])
    text = st.binary(min_size=1, max_size=12).map(lambda b: bytes(c % 128 for c in b)) | st.sampled_from(
        [b"77777777777", b"-1", b"\x80\xff\xff\xff\xff\xff\xff\xff", b"x", b"2", b"5", b"L", b"g", b"K", b"../../a",
         b"/etc/x.ref.png"])
    return st.tuples(st.sampled_from([0, 1]), fields, text).map(rewrite)


def _read_all(data: bytes) -> list:
    t0 = time.perf_counter()
    out = list(T.read_samples(io.BytesIO(data)))
    assert time.perf_counter() - t0 < TIME_BOUND_S
    for item in out:
        if isinstance(item, T.Rejected):
            assert item.reason in T.REJECT_REASONS and isinstance(item.detail, str)
        else:
            key, members = item
            assert T._KEY_RE.fullmatch(key) and all(isinstance(v, bytes) for v in members.values())
    return out


@given(st.binary(max_size=3000))
def test_shard_reader_on_arbitrary_bytes(data):
    _read_all(data)


@given(_mutations(VALID_SHARD))
def test_shard_reader_on_damaged_shards(data):
    out = _read_all(data)
    good = [i for i in out if not isinstance(i, T.Rejected)]
    assert len(good) <= 2


@given(_headers_only(VALID_SHARD))
def test_shard_reader_on_forged_headers(data):
    _read_all(data)


@settings(max_examples=40)
@given(_mutations(VALID_SHARD) | _headers_only(VALID_SHARD))
def test_the_loader_counts_whatever_it_cannot_use(data):
    """The loader's whole sample path (tar reader, CRC check, decode, compositing) on damaged shards:
    samples come out whole or are counted, nothing raises."""
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / "a.tar"
        path.write_bytes(data)
        ds = RenderPairDataset([str(path)], None, LoaderConfig(resolution=SIZE, shuffle_buffer=0, dtype="uint8",
                                                               std_pose="per_character"))
        t0 = time.perf_counter()
        got = [s["__key__"] for s in ds]
        assert time.perf_counter() - t0 < 2 * TIME_BOUND_S
    assert set(got) <= {"k0", "k1"}
    assert got or ds.stats.total_skipped >= 1  # a tar with no usable sample says why


def _read_index(content: bytes):
    """read_index on an index.json holding ``content``: the index, or None when it was refused
    with a one-line TarSetError naming the file."""
    with tempfile.TemporaryDirectory() as root:
        (Path(root) / "index.json").write_bytes(content)
        t0 = time.perf_counter()
        try:
            index = S.read_index(root)
        except T.TarSetError as exc:
            assert "\n" not in str(exc) and "index.json" in str(exc)
            index = None
        assert time.perf_counter() - t0 < TIME_BOUND_S
    return index


@given(st.binary(max_size=2000))
def test_index_reader_on_arbitrary_bytes(data):
    _read_index(data)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                    max_leaves=20)
FIELDS = list(_valid_index())


@settings(max_examples=60)  # generating nested JSON is the slow part, not the reader
@given(st.dictionaries(st.sampled_from(FIELDS), JSON, min_size=1, max_size=4))
def test_index_reader_on_indexes_with_wrong_fields(changes):
    got = _read_index(json.dumps({**_valid_index(), **changes}).encode())
    if got is not None:  # what it accepts, the rest of the code can use
        assert isinstance(got["shards"], list) and all(isinstance(e["samples"], int) for e in got["shards"])
        assert all(e["split"] in S.SPLITS for e in got["shards"])
        assert not any(e["path"].startswith("/") or ".." in e["path"].split("/") for e in got["shards"])


@settings(max_examples=60)
@given(st.lists(st.fixed_dictionaries({"path": st.text(max_size=30), "split": st.sampled_from(["train", "test", "x"]),
                                       "samples": st.integers(-2, 5), "bytes": st.integers(-2, 5),
                                       "sha256": st.text(max_size=4)}), max_size=3))
def test_index_reader_on_shard_lists(entries):
    got = _read_index(json.dumps({**_valid_index(), "shards": entries}).encode())
    if got is not None:
        for e in got["shards"]:
            assert not e["path"].startswith("/") and ".." not in e["path"].split("/") and "\\" not in e["path"]


@pytest.mark.parametrize("content", [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000])
def test_index_reader_on_deeply_nested_json(content):
    """Deep nesting makes Python's JSON parser raise RecursionError: a TarSetError here."""
    assert _read_index(content) is None

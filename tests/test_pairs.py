"""Stage II pair shards (the ``serialgen.pairs`` schema of the tar-set layer): format round trip and
verification. Pair building is tested in tests/test_build_pairs.py."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import webdataset as wds
from PIL import Image

from serialgen.dataset.pairs import (
    PairShardWriter,
    completed_shards,
    iter_pairs,
    iter_shard,
    read_index,
    verify_pairs,
    write_index,
)
from serialgen.dataset.tarset import TarSetError, read_member, scan_shard


def _img(w: int, h: int, colour: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (w, h), colour)


def test_pair_shard_round_trip_and_verify(tmp_path):
    out = tmp_path / "pairs"
    with PairShardWriter(out, 0) as w:
        w.add("00000000_a", _img(32, 48, (255, 255, 255)), _img(40, 40, (200, 0, 0)), "a red square", {"source": "a.jpg"})
        w.add("00000001_b", _img(32, 48, (250, 250, 250)), _img(30, 60, (0, 0, 200)), "", {"source": "b.jpg"},
              alt_ref=_img(20, 20, (0, 200, 0)))
        w.skip("c.jpg", "unreadable image")
    index = write_index(out, {"built_by": "test"})
    assert index["samples"] == 2 and index["skipped"] == 1 and read_index(out)["format_version"] == 1
    assert read_index(out)["format"] == "serialgen.pairs"

    samples = list(iter_pairs(out))
    assert [s.key for s in samples] == ["00000000_a", "00000001_b"]
    assert samples[0].caption == "a red square" and samples[1].caption == ""
    assert samples[0].meta == {"source": "a.jpg"} and samples[0].alt_ref is None
    assert samples[1].image("target").size == (30, 60) and samples[1].image("alt_ref").getpixel((5, 5))[1] > 150
    assert samples[0].image("std_ref").getpixel((0, 0)) == (255, 255, 255)  # PNG: lossless

    # random access table agrees with the sequential reader
    table = scan_shard(out / "pairs-000000.tar")
    assert [k for k, _ in table] == ["00000000_a", "00000001_b"] and "alt_ref.jpg" in table[1][1]
    assert read_member(out / "pairs-000000.tar", *table[0][1]["caption.txt"]) == b"a red square"

    # stock webdataset reads it (keys without dots, members by extension)
    ds = list(wds.WebDataset(str(out / "pairs-000000.tar"), shardshuffle=False))
    assert [d["__key__"] for d in ds] == ["00000000_a", "00000001_b"]
    assert json.loads(ds[0]["meta.json"]) == {"source": "a.jpg"} and "std_ref.png" in ds[0]

    assert verify_pairs(out)["ok"]
    # corrupt one byte of image data: verify names the shard and the problem
    data = bytearray((out / "pairs-000000.tar").read_bytes())
    off = table[0][1]["target.jpg"][0] + 10
    data[off] ^= 0xFF
    (out / "pairs-000000.tar").write_bytes(bytes(data))
    report = verify_pairs(out)
    assert not report["ok"] and len(report["problems"]) == 1
    assert report["problems"][0].startswith("pairs-000000.tar: sha256 ") and "differs from the index" in report["problems"][0]


def test_verify_checks_pair_members_and_unlisted_shards(tmp_path):
    out = tmp_path / "pairs"
    with PairShardWriter(out, 0) as w:
        w.add("00000000_a", _img(8, 12, (255, 255, 255)), _png(), "caption", {"source": "a.png"})
    write_index(out)
    assert json.loads((out / "pairs-000000.json").read_text())["samples"] == 1  # the resumable build's sidecar
    with PairShardWriter(out, 1) as w:  # finished after the index was written: not part of the set
        w.add("00000001_b", _img(8, 12, (255, 255, 255)), _img(8, 8, (1, 2, 3)), "", {})
    report = verify_pairs(out)
    assert report["shards"] == 1 and report["samples"] == 1
    assert report["problems"] == ["pairs-000000.tar: 00000000_a.target.jpg is not a JPEG",
                                  "pairs-000001.tar: shard not in the index (left from another run?)"]
    assert write_index(out)["samples"] == 2 and len(verify_pairs(out)["problems"]) == 1
    (out / "index.json").write_text(json.dumps({"format": "serialgen.pairs", "format_version": 2, "shards": []}))
    with pytest.raises(TarSetError, match="index.json: serialgen.pairs format_version 2; this serialgen reads "
                                          "version 1; written by a newer serialgen"):
        verify_pairs(out)


def test_interrupted_shard_leaves_nothing_final(tmp_path):
    with pytest.raises(RuntimeError):
        with PairShardWriter(tmp_path, 3) as w:
            w.add("k", _img(8, 8, (1, 2, 3)), _img(8, 8, (1, 2, 3)), "", {})
            raise RuntimeError("crash mid-shard")
    assert list(tmp_path.iterdir()) == [] and completed_shards(tmp_path) == {}
    with pytest.raises(ValueError, match="is invalid"):
        with PairShardWriter(tmp_path, 4) as w:
            w.add("a.b", _img(8, 8, (1, 2, 3)), _img(8, 8, (1, 2, 3)), "", {})


def test_incomplete_samples_are_skipped_and_counted(tmp_path):
    tar_path = tmp_path / "pairs-000000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for name, data in [("x.caption.txt", b"only a caption"), ("y.caption.txt", b"c"), ("y.meta.json", b"{}"),
                           ("y.std_ref.png", _png()), ("y.target.jpg", _png())]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    stats: dict[str, int] = {}
    assert [s.key for s in iter_shard(tar_path, stats)] == ["y"] and stats == {"incomplete": 1}


def _png() -> bytes:
    buf = io.BytesIO()
    _img(4, 4, (9, 9, 9)).save(buf, format="PNG")
    return buf.getvalue()

"""Damaged members that still decode, and the guarantees around the index and ``shards verify``.

* A byte flipped inside the IDAT chunk of ``ref.png`` such that the PNG decoder still returns an
  image (searched for here: most flips fail to decode, some do not): the training loader skips the
  sample and counts it under ``checksum mismatch in ref.png`` with its shard and key; without the
  check it would have yielded it (shown by turning the check off). Also for ``std.png``.
* The loader's counts reach ONE summary in the main process, whatever the number of DataLoader
  workers.
* ``shards verify``: exit 0 / 1 (damaged data, naming the shard) / 2 (not a shard set: one line);
  ``--decode`` decodes every image.
* ``write_index`` never leaves a folder without an index: the old one stays until the new one is
  whole (an error while writing, or a crash before the rename, leaves the old bytes).
"""

from __future__ import annotations

import json
import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from serialgen.cli import main as cli_main
from serialgen.dataset import shards as S
from serialgen.dataset import tarset as T
from serialgen.dataset.loader import LoaderConfig, RenderPairDataset, make_loader
from test_loader_synth import synth_pair

SIZE = (64, 96)


def idat_span(png: bytes) -> tuple[int, int]:
    """(start, end) of the first IDAT chunk's data."""
    pos = 8
    while True:
        length = struct.unpack(">I", png[pos:pos + 4])[0]
        if png[pos + 4:pos + 8] == b"IDAT":
            return pos + 8, pos + 8 + length
        pos += 12 + length


def flip_that_still_decodes(png: bytes, mode: str) -> bytes:
    """``png`` with one byte inside IDAT changed such that the decoder the loader uses still returns
    an image of the right size with different pixels (the corruption the decoder cannot see)."""
    good = S.decode_png(png, mode)
    start, end = idat_span(png)
    for offset in range(start + 2, end - 4):  # past the zlib header, before the adler32
        for mask in (0x01, 0x10, 0x80):
            bad = bytearray(png)
            bad[offset] ^= mask
            bad = bytes(bad)
            try:
                arr = S.decode_png(bad, mode)
            except (ValueError, OSError):
                continue
            if arr.shape == good.shape and not np.array_equal(arr, good):
                return bad
    raise AssertionError("no single-byte IDAT flip that still decodes was found")


def write_shard(root: Path, name: str, samples: list[tuple[str, dict]]) -> S.ShardSummary:
    with S.ShardWriter(root, f"train/{name}", "train") as w:
        for key, members in samples:
            w.write(key, members)
        return w.close()


def pairs(character: int, n: int, prefix: str) -> list[tuple[str, dict]]:
    return [(f"{prefix}{i}", synth_pair(character, i, size=SIZE, texture=8.0, key=f"{prefix}{i}")) for i in range(n)]


@pytest.mark.parametrize("member, mode", [("ref.png", "RGBA"), ("std.png", "RGB")])
def test_a_corruption_the_decoder_cannot_see_is_skipped_and_counted(tmp_path, member, mode, caplog):
    samples = pairs(3, 4, "k")
    samples[1][1][member] = flip_that_still_decodes(samples[1][1][member], mode)
    if member == "std.png":  # the standard is decoded once per character: make k1 the first sample
        samples = [samples[1], samples[0]] + samples[2:]
    summary = write_shard(tmp_path, "a.tar", samples)
    S.write_index(tmp_path, [summary], {"synthetic": True}, [])
    cfg = dict(resolution=SIZE, shuffle_buffer=0, std_pose="per_character")
    ds = RenderPairDataset(str(tmp_path), None, LoaderConfig(**cfg))
    with caplog.at_level(logging.WARNING, logger="serialgen.dataset.loader"):
        keys = [s["__key__"] for s in ds]
    assert "k1" not in keys and len(keys) == 3
    reason = f"checksum mismatch in {'ref.png' if member == 'ref.png' else 'std.png/std_pose.json'}"
    assert dict(ds.stats.skipped) == {reason: 1}
    assert ds.stats.keys[reason] == {"train/a.tar": ["k1"]}
    assert f"1 x {reason} (train/a.tar: k1)" in caplog.text
    # the check is what catches it: without it the damaged sample reaches training
    unchecked = RenderPairDataset(str(tmp_path), None, LoaderConfig(**cfg, integrity_check=False))
    assert "k1" in [s["__key__"] for s in unchecked] and unchecked.stats.total_skipped == 0
    # verify finds it too (the shard's sha256 in the index matches: the CRC check is what fails)
    problems = S.verify(tmp_path)
    assert problems and all("CRC mismatch in chunk b'IDAT'" in p for p in problems), problems


def test_a_damaged_format_3_standard_refuses_its_characters_pairs_once(tmp_path, caplog):
    """Format 3 stores the standard once: a flip inside its std.png that still decodes would reach
    every pair of the character. Each is skipped and counted; the standard tar is read once."""
    samples = pairs(3, 4, "k")
    m = samples[0][1]
    std = S.write_standard(tmp_path, "train", "synth0003", m["std.png"], json.loads(m["std_pose.json"]), {})
    summary = write_shard(tmp_path, "a.tar", [(k, {n: v for n, v in x.items() if n != "std.png"}) for k, x in samples])
    S.write_index(tmp_path, [summary], {"synthetic": True}, [], standards=[std],
                  characters={"synth0003": {"split": "train", "standard_pose": json.loads(m["std_pose.json"])}})
    assert S.verify(tmp_path) == []
    path = tmp_path / std.path
    [(key, offsets)] = T.scan_shard(path)
    start, size = offsets["std.png"]
    data = path.read_bytes()
    bad = flip_that_still_decodes(data[start:start + size], "RGB")
    path.write_bytes(data[:start] + bad + data[start + size:])
    ds = RenderPairDataset(str(tmp_path), None, LoaderConfig(resolution=SIZE, shuffle_buffer=0))
    assert list(ds) == []
    assert dict(ds.stats.skipped) == {"checksum mismatch in the standard": 4}
    assert ds.stats.keys["checksum mismatch in the standard"] == {"train/a.tar": ["k0", "k1", "k2", "k3"]}
    assert any("standard/synth0003.tar" in e for e in ds.stats.examples["checksum mismatch in the standard"])
    problems = S.verify(tmp_path)
    assert len(problems) == 1 and std.path in problems[0] and "sha256" in problems[0]


def test_png_problem_walks_every_chunk():
    png = S.encode_png(np.full((4, 3, 4), 200, np.uint8))
    assert S.png_problem(png) is None
    assert "signature" in S.png_problem(b"GIF89a" + png[6:])
    assert "after IEND" in S.png_problem(png + b"junk")
    assert "runs past the end" in S.png_problem(png[:-13])  # IEND gone, IDAT cut by one byte
    assert "ends inside a chunk header" in S.png_problem(png[:-6])
    body = png[8:]  # a PNG whose first chunk is not IHDR
    idat_only = S.PNG_MAGIC + body[25:]
    assert "not IHDR" in S.png_problem(idat_only)
    no_idat = S.PNG_MAGIC + body[:25] + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    assert S.png_problem(no_idat) == "no IDAT chunk"
    for i in range(8, len(png)):  # any single flipped bit after the signature is caught
        bad = bytearray(png)
        bad[i] ^= 0x04
        assert S.png_problem(bytes(bad)) is not None, i


def test_worker_skips_reach_one_summary_in_the_main_process(tmp_path, caplog):
    a = pairs(3, 3, "a")
    b = pairs(4, 3, "b")
    a[0][1]["ref.png"] = flip_that_still_decodes(a[0][1]["ref.png"], "RGBA")
    b[2][1]["ref.png"] = flip_that_still_decodes(b[2][1]["ref.png"], "RGBA")
    summaries = [write_shard(tmp_path, "a.tar", a), write_shard(tmp_path, "b.tar", b)]
    S.write_index(tmp_path, summaries, {"synthetic": True}, [])
    loader = make_loader(str(tmp_path), None, LoaderConfig(resolution=SIZE, shuffle_buffer=0, batch_size=2,
                                                           dtype="uint8", std_pose="per_character"), num_workers=2)
    with caplog.at_level(logging.WARNING, logger="serialgen.dataset.loader"):
        keys = [k for batch in loader for k in batch["__key__"]]
    assert sorted(keys) == ["a1", "a2", "b0", "b1"]
    lines = [r.getMessage() for r in caplog.records if r.name == "serialgen.dataset.loader"]
    assert len(lines) == 1, lines  # one summary, in this (the main) process, for both workers
    assert "read 4 samples, skipped 2: 2 x checksum mismatch in ref.png" in lines[0]
    assert "train/a.tar: a0" in lines[0] and "train/b.tar: b2" in lines[0]
    total = loader.dataset.loader_stats()
    assert total.keys["checksum mismatch in ref.png"] == {"train/a.tar": ["a0"], "train/b.tar": ["b2"]}


def test_verify_exit_codes_and_decode(tmp_path, capsys):
    samples = pairs(3, 2, "k")
    summary = write_shard(tmp_path / "set", "a.tar", samples)
    S.write_index(tmp_path / "set", [summary], {"synthetic": True}, [])
    root = str(tmp_path / "set")
    assert cli_main(["shards", "verify", root]) == 0
    assert "every sample checked" in capsys.readouterr().out
    assert cli_main(["shards", "verify", root, "--decode"]) == 0
    assert "every image decoded" in capsys.readouterr().out
    # not a shard set: exit 2, one line
    for path, words in ((tmp_path / "nope", "no such file or folder"), (tmp_path, "not a shard set")):
        assert cli_main(["shards", "verify", str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "index.json").write_text(json.dumps({"format": "serialgen.pairs", "format_version": 1}))
    assert cli_main(["shards", "verify", str(tmp_path / "other")]) == 2
    assert "format 'serialgen.pairs'" in capsys.readouterr().err
    # an unfinished render: shards, no index
    (tmp_path / "half" / "train").mkdir(parents=True)
    (tmp_path / "half" / "train" / "a.tar").write_bytes(b"")
    assert cli_main(["shards", "verify", str(tmp_path / "half")]) == 2
    assert "unfinished render" in capsys.readouterr().err
    # a damaged index: exit 1
    index = tmp_path / "set" / "index.json"
    good_index = index.read_bytes()
    index.write_bytes(good_index[:40])
    assert cli_main(["shards", "verify", root]) == 1
    assert "index is damaged" in capsys.readouterr().err
    index.write_bytes(good_index)
    # a pose file whose size does not match its image: only --decode sees it (headers agree otherwise)
    bad = dict(samples[0][1])
    pose = json.loads(bad["ref_pose.json"])
    pose["width"] += 1
    bad["ref_pose.json"] = json.dumps(pose).encode()
    summary = write_shard(tmp_path / "set", "a.tar", [("k0", bad), samples[1]])
    S.write_index(tmp_path / "set", [summary], {"synthetic": True}, [])
    assert cli_main(["shards", "verify", root]) == 0
    capsys.readouterr()
    assert cli_main(["shards", "verify", root, "--decode"]) == 1
    assert f"k0.ref_pose.json is for {SIZE[0] + 1}x{SIZE[1]}" in capsys.readouterr().err


def test_shards_preview_rejects_a_negative_count_in_one_line(tmp_path, capsys):
    assert cli_main(["shards", "preview", str(tmp_path), "--out", str(tmp_path / "x.png"), "--count", "-2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--count -2" in err[0]
    assert not (tmp_path / "x.png").exists()


def test_write_index_keeps_the_old_index_until_the_new_one_is_whole(tmp_path, monkeypatch):
    summary = write_shard(tmp_path, "a.tar", pairs(3, 1, "k"))
    S.write_index(tmp_path, [summary], {"run": 1}, [])
    old = (tmp_path / "index.json").read_bytes()
    # an error while making the new index (a NaN in the config): the old one is untouched
    with pytest.raises(ValueError):
        S.write_index(tmp_path, [summary], {"run": float("nan")}, [])
    assert (tmp_path / "index.json").read_bytes() == old
    # a crash after the new bytes are written but before the rename: still the old index, no temp left
    real_replace = os.replace

    def crash(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        S.write_index(tmp_path, [summary], {"run": 2}, [])
    monkeypatch.setattr(os, "replace", real_replace)
    assert (tmp_path / "index.json").read_bytes() == old
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    # and a successful re-write replaces it whole
    S.write_index(tmp_path, [summary], {"run": 3}, [])
    assert json.loads((tmp_path / "index.json").read_text())["config"] == {"run": 3}
    assert S.read_index(tmp_path)["config"] == {"run": 3}
    assert S.verify(tmp_path) == []

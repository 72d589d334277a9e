"""The shard format without Blender: the tar-set layer (deterministic tars, index read/write and its
version check, verify, iteration, random access), keys, splits (assign_splits), format 3 (each
character's standard stored once) and version 1 and 2 sets, the previews, and reading the shards
back with stock webdataset (the documented join), Hugging Face datasets and Ray Data. Also the
camera framing the renderer relies on (the standard camera's face box: tests/test_standard_form.py)."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from serialgen.dataset import shards as S
from serialgen.dataset import tarset as T
from serialgen.errors import UserInputError


def _pose(w=6, h=8):
    return {"width": w, "height": h, "names": ["nose", "neck"], "keypoints": [[1.0, 2.0, 1], [3.0, 4.0, 0]]}


def _std_pose(character):
    """A character's own standard pose (what its samples' std_pose.json holds)."""
    x = float(sum(map(ord, character)) % 6)
    return {"width": 6, "height": 8, "names": ["nose", "neck"], "keypoints": [[x, 2.0, 1], [3.0, 4.0, 1]]}


def _standard(character):
    """A character's standard (format 3: stored once): RGB image, its pose, its meta."""
    rng = np.random.default_rng(sum(map(ord, character)))
    return S.encode_png(rng.integers(0, 255, (8, 6, 3), dtype=np.uint8)), _std_pose(character), {"camera": {"f": 1}}


def _members(key, seed=0, version=3):
    """A pair's members: format 3 (no std.png) or, for versions 1 and 2, with the standard image."""
    rng = np.random.default_rng(seed)
    character = key.split("_p")[0]
    members = {
        "ref.png": S.encode_png(rng.integers(0, 255, (8, 6, 4), dtype=np.uint8)),
        "ref_pose.json": S.json_bytes(_pose()),
        "std_pose.json": S.json_bytes(_std_pose(character)),
        "meta.json": S.json_bytes({"schema": S.SAMPLE_SCHEMA, "key": key, "character": character}),
    }
    if version < 3:
        members["std.png"] = _standard(character)[0]
    return members


CHARACTERS = ("proc-000001", "proc-000002", "proc-000003")
STANDARD_POSE = {"width": 6, "height": 8, "names": ["nose", "neck"], "keypoints": [[3.0, 1.0, 1], [3.0, 2.5, 1]],
                 "defined": [1, 1]}


def _write_set(root, characters=CHARACTERS, per=3, version=3):
    """A set of ``version``: 3 (standards stored once), 2 (pairs with std.png, characters in the
    index) or 1 (as 2, then the index made what a version 1 writer wrote)."""
    summaries, standards = [], []
    for c in characters:
        split = S.split_of(c)
        if version == 3:
            standards.append(S.write_standard(root, split, c, *_standard(c)))
        with S.ShardWriter(root, f"{split}/{c}-p000000-{per:06d}.tar", split) as w:
            for p in range(per):
                key = S.sample_key(c, p, 0)
                w.write(key, _members(key, p, version))
            summaries.append(w.close())
    extra = {"standard_pose": STANDARD_POSE,
             "characters": {c: {"split": S.split_of(c), "standard_pose": _std_pose(c)} for c in characters}}
    S.write_index(root, summaries, {"seed": 0}, [], **extra, **({"standards": standards} if version == 3 else {}))
    if version == 1:
        _edit_index(root, _as_v1)
    return summaries


def _edit_index(root, edit):
    path = root / S.INDEX_NAME
    index = json.loads(path.read_text())
    edit(index)
    path.write_text(json.dumps(index))


def _as_v1(index):
    """What a version 1 writer wrote: no standard_pose, no characters."""
    index["format_version"] = 1
    del index["standard_pose"], index["characters"]


def test_keys_have_no_dots_and_bad_keys_say_why():
    assert S.sample_key("proc-000123", 7, 1) == "proc-000123_p00007_v1"
    assert "." not in S.sample_key("char.v1.glb", 1, 0)
    with pytest.raises(ValueError, match="first dot"):
        S.validate_key("a.b")


def test_split_is_deterministic_and_near_80_20():
    ids = [f"proc-{i:06d}" for i in range(2000)]
    splits = [S.split_of(i) for i in ids]
    assert splits == [S.split_of(i) for i in ids]
    share = splits.count("test") / len(ids)
    assert 0.17 < share < 0.23
    assert all(S.split_of(i, 0.0) == "train" for i in ids[:50])


def test_png_encoding_is_pinned_byte_for_byte():
    """The same pixels give the same PNG bytes on every machine (the farm's determinism): the zlib
    stream comes from the pinned libdeflate, not the system's zlib. A new compressor or version
    changes these bytes: then say so in docs/shard_format.md and update the digest."""
    import hashlib

    import pyspng

    y, x = np.mgrid[0:48, 0:64]
    rgba = np.stack([x * 4, y * 5, (x * y) % 256, np.where((x - 32) ** 2 + (y - 24) ** 2 < 300, 255, 0)],
                    -1).astype(np.uint8)
    png = S.encode_png(rgba)
    assert (pyspng.load(png) == rgba).all()
    assert hashlib.sha256(png).hexdigest() == "fc032ef87d0c6941e616c5522069c5c99425d421d6caa8610aaf07c020d0c904"
    with pytest.raises(ValueError, match="compress_level 10"):
        S.encode_png(rgba, 10)


def test_writer_is_byte_deterministic_and_atomic(tmp_path):
    a = _write_set(tmp_path / "a")
    b = _write_set(tmp_path / "b")
    assert [s.sha256 for s in a] == [s.sha256 for s in b]
    assert (tmp_path / "a" / S.INDEX_NAME).read_bytes() == (tmp_path / "b" / S.INDEX_NAME).read_bytes()
    assert not list((tmp_path / "a").rglob("*.tmp"))
    import tarfile

    with tarfile.open(tmp_path / "a" / a[0].path) as tar:
        infos = tar.getmembers()
    assert all(i.mtime == 0 and i.uid == 0 and i.uname == "" for i in infos)
    assert [i.name.split(".", 1)[1] for i in infos[:4]] == list(S.MEMBERS)
    # the standards too: one tar per character, the same bytes from the same inputs
    index_a, index_b = S.read_index(tmp_path / "a"), S.read_index(tmp_path / "b")
    assert index_a["standard_shards"] == index_b["standard_shards"] and len(index_a["standard_shards"]) == 3
    for e in index_a["standard_shards"]:
        assert (tmp_path / "a" / e["path"]).read_bytes() == (tmp_path / "b" / e["path"]).read_bytes()
        assert e["path"] == f"{e['split']}/standard/{e['character']}.tar"


def test_aborted_writer_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with S.ShardWriter(tmp_path, "train/x-p000000-000001.tar", "train") as w:
            w.write("x_p00000_v0", _members("x_p00000_v0"))
            raise RuntimeError("render crashed")
    assert not list(tmp_path.rglob("*.tar")) and not list(tmp_path.rglob("*.tmp"))


def test_verify_passes_then_catches_a_flipped_byte(tmp_path):
    summaries = _write_set(tmp_path)
    assert S.verify(tmp_path) == []
    path = tmp_path / summaries[1].path
    data = bytearray(path.read_bytes())
    data[700] ^= 0x01
    path.write_bytes(bytes(data))
    problems = S.verify(tmp_path)
    assert len(problems) == 1 and summaries[1].path in problems[0] and "sha256" in problems[0]


def test_verify_catches_missing_extra_and_incomplete(tmp_path):
    summaries = _write_set(tmp_path)
    (tmp_path / summaries[0].path).unlink()
    with S.ShardWriter(tmp_path, "train/stray-p000000-000001.tar", "train") as w:
        w.write("stray_p00000_v0", _members("stray_p00000_v0"))
        w.close()
    problems = S.verify(tmp_path)
    assert any("missing" in p for p in problems)
    assert any("stray" in p and "not in the index" in p for p in problems)
    # A sample without its ref_pose.json: the index matches the bytes, the sample check does not.
    import tarfile

    bad = tmp_path / "train" / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        for name, data in _members("bad_p00000_v0").items():
            if name == "ref_pose.json":
                continue
            info = tarfile.TarInfo(f"bad_p00000_v0.{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    entry = S.summarize_shard(tmp_path, "train/bad.tar", "train")
    index = S.read_index(tmp_path)
    standards = [S.StandardSummary.from_json(e) for e in index["standard_shards"]]
    S.write_index(tmp_path, summaries[1:] + [entry], {}, [], characters=index["characters"], standards=standards[1:])
    problems = S.verify(tmp_path)
    assert any("bad_p00000_v0 has members" in p for p in problems)
    assert any(f"{standards[0].path}: standard not in the index" in p for p in problems)
    assert not (tmp_path / "nothing").exists() and "index.json: not found; expected a shard set written by " \
        "`serialgen render`" in S.verify(tmp_path / "nothing")[0]


def test_stock_webdataset_reads_every_member(tmp_path):
    summaries = _write_set(tmp_path)
    urls = [str(tmp_path / s.path) for s in summaries]
    ds = wds.WebDataset(urls, shardshuffle=False).decode("rgb8")
    samples = list(ds)
    assert len(samples) == 9
    s = samples[0]
    assert set(S.MEMBERS) == {k for k in s if not k.startswith("__")}  # every sample the same members
    assert s["ref.png"].shape == (8, 6, 3)  # decoded (rgb8 drops alpha)
    raw = next(iter(wds.WebDataset(urls[:1], shardshuffle=False)))
    from PIL import Image

    assert Image.open(io.BytesIO(raw["ref.png"])).mode == "RGBA"
    assert json.loads(raw["ref_pose.json"])["keypoints"][0] == [1.0, 2.0, 1]
    standards = {s["__key__"]: s for s in wds.WebDataset(sorted(str(p) for p in tmp_path.glob("*/standard/*.tar")),
                                                          shardshuffle=False)}
    assert Image.open(io.BytesIO(standards[raw["__key__"].split("_p")[0]]["std.png"])).mode == "RGB"


def _docs_reading_example() -> str:
    """The stock-webdataset example of docs/shard_format.md ("Reading"), as written there."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "shard_format.md").read_text()
    block = text.split("## Reading", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert "wds.WebDataset" in block and 'decode("pilrgba")' in block
    return block


def test_the_documented_webdataset_join_reads_rgba_references_and_their_standards(tmp_path):
    """Issue 16.5: stock webdataset's ``.decode("pil")`` drops ref.png's alpha (the mask); the
    documented reading (``"pilrgba"`` for the pairs, the standards joined by character) keeps it."""
    _write_set(tmp_path)
    train = [c for c in CHARACTERS if S.split_of(c) == "train"]
    scope = {}
    exec(_docs_reading_example().replace('SHARDS = "data/shards"', f"SHARDS = {str(tmp_path)!r}"), scope)
    ref, mask, standard, pose = scope["reference"], scope["mask"], scope["standard"], scope["standard_pose"]
    assert ref.mode == "RGBA" and mask.mode == "L" and standard.mode == "RGB"
    character = scope["s"]["meta.json"]["character"]
    assert character in train and pose == _std_pose(character)
    key = scope["s"]["__key__"]
    assert np.array_equal(np.asarray(ref), S.decode_png(_members(key, int(key.split("_p")[1][:5]))["ref.png"], "RGBA"))
    assert np.array_equal(np.asarray(standard), S.decode_png(_standard(character)[0], "RGB"))
    # the trap the docs warn about: "pil" converts to RGB, the mask is gone
    urls = sorted(str(p) for p in tmp_path.glob("train/*.tar"))
    assert next(iter(wds.WebDataset(urls, shardshuffle=False).decode("pil")))["ref.png"].mode == "RGB"


@pytest.mark.slow  # importing datasets and building its cache: ~3.5 s
def test_hugging_face_datasets_reads_the_pair_shards_with_rgba_references(tmp_path):
    """Issue 16.5: ``datasets.load_dataset("webdataset", data_files=...)`` reads a format 3 set (its
    builder needs every sample to have the same members: the pairs do, the standards are apart)."""
    datasets = pytest.importorskip("datasets", reason="Hugging Face datasets (test extra) is not installed")
    _write_set(tmp_path, characters=("proc-000001", "proc-000002", "proc-000005", "proc-000006"))
    kw = dict(split="train", cache_dir=str(tmp_path / "hf-cache"))
    files = sorted(str(p) for p in tmp_path.glob("*/*.tar"))
    pairs = datasets.load_dataset("webdataset", data_files={"train": files}, **kw)
    assert pairs.num_rows == 12 and set(S.MEMBERS) <= set(pairs.column_names)
    row = pairs[0]
    assert row["ref.png"].mode == "RGBA" and row["meta.json"]["key"] == row["__key__"]
    standards = datasets.load_dataset("webdataset", data_files={"train": sorted(str(p) for p in
                                                                                tmp_path.glob("*/standard/*.tar"))}, **kw)
    by_character = {r["meta.json"]["character"]: r for r in standards}
    std = by_character[row["meta.json"]["character"]]
    assert std["std.png"].mode == "RGB" and std["std_pose.json"]["keypoints"] == row["std_pose.json"]["keypoints"]


@pytest.mark.ray
def test_ray_data_reads_the_shards(tmp_path):
    import ray

    summaries = _write_set(tmp_path)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        rows = ray.data.read_webdataset([str(tmp_path / s.path) for s in summaries], decoder=False).take_all()
        decoded = ray.data.read_webdataset([str(tmp_path / summaries[0].path)]).take(1)[0]
    finally:
        ray.shutdown()
    assert len(rows) == 9
    row = rows[0]
    assert set(S.MEMBERS) <= set(row) and "std.png" not in row
    meta = row["meta.json"]  # Ray decodes .json members itself
    meta = json.loads(meta) if isinstance(meta, (bytes, str)) else meta
    assert meta["key"] == row["__key__"]
    assert sorted(r["__key__"] for r in rows) == sorted(k for s in summaries for k in s.keys)
    assert decoded["ref.png"].shape == (8, 6, 4)  # Ray's own decode keeps the alpha


# -- the tar-set layer and index versions -----------------------------------------------------------


def test_round_trip_members_random_access_and_index_v3(tmp_path):
    summaries = _write_set(tmp_path)
    index = S.read_index(tmp_path)
    assert index["format"] == "serialgen.shards" and index["format_version"] == S.SHARD_FORMAT_VERSION == 3
    assert index["standard_pose"] == STANDARD_POSE and index["members"] == list(S.MEMBERS)
    assert index["characters"] == {c: {"split": S.split_of(c), "standard_pose": _std_pose(c),
                                       "standard": S.standard_relpath(S.split_of(c), c)} for c in CHARACTERS}
    # each character's standard, stored once, read back as written
    paths = S.standard_paths(tmp_path, index)
    for c in CHARACTERS:
        std = S.read_standard(paths[c], c)
        png, pose, meta = _standard(c)
        assert std["std.png"] == png and json.loads(std["std_pose.json"]) == pose
        assert json.loads(std["meta.json"]) == {**meta, "schema": S.STANDARD_SCHEMA, "key": c, "character": c,
                                                "split": S.split_of(c)}
    assert index["samples"] == 9 and [e["path"] for e in index["shards"]] == sorted(s.path for s in summaries)
    assert S.verify(tmp_path) == []
    # What was written is what is read, by the sequential reader and by random access.
    path = tmp_path / summaries[0].path
    samples = list(S.iter_shard(path))
    assert [k for k, _ in samples] == summaries[0].keys
    assert samples[1][1] == _members(summaries[0].keys[1], 1)
    table = T.scan_shard(path)
    assert [k for k, _ in table] == summaries[0].keys and list(table[0][1]) == list(S.MEMBERS)
    for (key, members), (_, offsets) in zip(samples, table):
        assert {m: T.read_member(path, *offsets[m]) for m in S.MEMBERS} == members
    assert T.sha256_file(path) == (summaries[0].sha256, summaries[0].bytes)


def test_version_1_and_2_sets_still_load_and_verify(tmp_path):
    _write_set(tmp_path / "v1", version=1)
    index = S.read_index(tmp_path / "v1")
    assert index["format_version"] == 1 and index["standard_pose"] is None and index["characters"] is None
    assert index["standard_shards"] is None and S.standard_paths(tmp_path / "v1", index) == {}
    assert S.verify(tmp_path / "v1") == [] and S.verify(tmp_path / "v1", decode=True) == []
    _write_set(tmp_path / "v2", version=2)
    index = S.read_index(tmp_path / "v2")
    assert index["format_version"] == 2 and index["members"] == list(S.MEMBERS_V2)
    assert index["standard_shards"] is None and index["characters"]["proc-000001"]["standard_pose"]
    assert S.verify(tmp_path / "v2") == [] and S.verify(tmp_path / "v2", decode=True) == []
    # a version 2 set is read as one: its pairs must carry std.png
    split = S.split_of("proc-000001")
    with S.ShardWriter(tmp_path / "v2", f"{split}/proc-000001-p000000-000003.tar", split) as w:
        for p in range(3):
            key = S.sample_key("proc-000001", p, 0)
            w.write(key, _members(key, p, version=3))
        summary = w.close()
    index = S.read_index(tmp_path / "v2")
    entry = next(e for e in index["shards"] if e["path"] == summary.path)
    entry.update(bytes=summary.bytes, sha256=summary.sha256)
    (tmp_path / "v2" / S.INDEX_NAME).write_text(json.dumps(index))
    assert any("has members" in p and "std.png" in p for p in S.verify(tmp_path / "v2"))


@pytest.mark.parametrize("edit, expected", [
    (lambda ix: ix.update(format="serialgen.pairs"), "format 'serialgen.pairs', expected 'serialgen.shards' versions 1, 2, 3"),
    (lambda ix: ix.update(format_version=4), "format_version 4; this serialgen reads versions 1, 2, 3; written by a newer"),
    (lambda ix: ix.update(format_version="2"), "format_version '2'; this serialgen reads versions 1, 2, 3"),
    (lambda ix: ix.update(format_version=0), "format_version 0; this serialgen reads versions 1, 2, 3"),
    (lambda ix: ix["shards"][0].pop("sha256"), "shards[0] is not {path, samples, bytes, sha256}"),
    (lambda ix: ix["shards"][0].update(path="../elsewhere.tar"), "is not a relative path inside the set"),
    (lambda ix: ix["shards"][0].update(split="val"), "has split 'val'"),
    (lambda ix: ix.update(standard_pose={"width": 6}), "standard_pose has no positive integer width and height"),
    (lambda ix: ix["characters"]["proc-000001"].update(split="dev"), "characters 'proc-000001' has no split"),
    (lambda ix: ix.pop("standard_shards"), "format_version 3 without a 'standard_shards' list"),
    (lambda ix: ix["standard_shards"][0].update(path="train/standard/../../x.tar"), "is not a relative path"),
    (lambda ix: ix["standard_shards"][0].update(path=ix["standard_shards"][0]["split"] + "/standard/other.tar"),
     "standard/other.tar' is not '"),
    (lambda ix: ix["characters"]["proc-000001"].update(standard="test/standard/proc-000009.tar"),
     "is not the standard of a listed character"),
    (lambda ix: ix["characters"]["proc-000001"].update(name=7), "'proc-000001': name is int, not a string"),
], ids=["foreign", "newer", "string", "older", "entry", "escape", "split", "pose", "characters", "no-standards",
        "standard-escape", "standard-path", "standard-join", "name"])
def test_a_foreign_newer_or_malformed_index_is_one_line_naming_the_file(tmp_path, edit, expected):
    _write_set(tmp_path)
    _edit_index(tmp_path, edit)
    with pytest.raises(T.TarSetError) as exc:
        S.read_index(tmp_path)
    msg = str(exc.value)
    assert isinstance(exc.value, UserInputError) and "\n" not in msg
    assert msg.startswith(f"{tmp_path / S.INDEX_NAME}: ") and expected in msg, msg
    assert S.verify(tmp_path) == [msg]


def test_unreadable_indexes_are_tarset_errors(tmp_path):
    (tmp_path / S.INDEX_NAME).write_text("{not json")
    with pytest.raises(T.TarSetError, match=r"index.json: not valid JSON \(.* at line 1\); expected a shard set"):
        S.read_index(tmp_path)
    (tmp_path / S.INDEX_NAME).write_text("[1, 2]")
    with pytest.raises(T.TarSetError, match="index.json: not a JSON object"):
        S.read_index(tmp_path)
    # The pair schema reads through the same layer: the same error type, its own expectation.
    from serialgen.dataset import pairs

    (tmp_path / S.INDEX_NAME).write_text("{}")
    with pytest.raises(T.TarSetError, match="index.json: format None, expected 'serialgen.pairs' version 1"):
        pairs.read_index(tmp_path)


def test_verify_checks_characters_against_the_samples(tmp_path):
    _write_set(tmp_path, version=2)
    moved = CHARACTERS[0]
    other = "test" if S.split_of(moved) == "train" else "train"

    def wrong(index):
        index["characters"][moved]["split"] = other
        index["characters"][CHARACTERS[1]]["standard_pose"]["keypoints"][0][0] = 5.0
        del index["characters"][CHARACTERS[2]]
        index["characters"]["proc-000009"] = {"split": "train", "standard_pose": _std_pose("proc-000009")}

    _edit_index(tmp_path, wrong)
    problems = S.verify(tmp_path)
    assert any(f"character {moved} is {other!r} in the index's characters" in p for p in problems)
    assert any(f"std_pose.json differs from the index's standard_pose of {CHARACTERS[1]}" in p for p in problems)
    assert any(f"character '{CHARACTERS[2]}' is not in the index's characters" in p for p in problems)
    assert S.verify(tmp_path, deep=False) == []  # sizes and checksums only

    _write_set(tmp_path / "b", version=2)
    _edit_index(tmp_path / "b", lambda ix: ix["characters"].update(
        {"proc-000009": {"split": "train", "standard_pose": _std_pose("proc-000009")}}))
    assert S.verify(tmp_path / "b") == [
        "index.json: character proc-000009 is listed in characters but has no sample and no failure"]
    _edit_index(tmp_path / "b", lambda ix: ix.update(failures=[{"character": "proc-000009", "key": None, "error": "x"}]))
    assert S.verify(tmp_path / "b") == []


def test_writer_refuses_bad_samples(tmp_path):
    with S.ShardWriter(tmp_path, "train/x-p000000-000002.tar", "train") as w:
        w.write("x_p00000_v0", _members("x_p00000_v0"))
        with pytest.raises(ValueError, match="duplicate sample key 'x_p00000_v0'"):
            w.write("x_p00000_v0", _members("x_p00000_v0"))
        partial = _members("x_p00001_v0")
        del partial["ref_pose.json"]
        with pytest.raises(ValueError, match=r"sample x_p00001_v0 has members .*, expected \['ref.png'"):
            w.write("x_p00001_v0", partial)
        with pytest.raises(ValueError, match=r"has members .*std.png.*, expected \['ref.png', 'ref_pose.json'"):
            w.write("x_p00001_v0", _members("x_p00001_v0", version=2))  # one member set per tar
        assert w.close().samples == 1
    png, pose, meta = _standard("x")
    with pytest.raises(ValueError, match="not an intact RGB PNG"):
        S.write_standard(tmp_path, "train", "x", _members("x_p00000_v0")["ref.png"], pose, meta)
    with pytest.raises(ValueError, match="disagrees"):
        S.write_standard(tmp_path, "train", "x", png, pose, {**meta, "character": "y"})
    with pytest.raises(ValueError, match="standards need characters"):
        S.write_index(tmp_path, [], {}, [], standards=[S.write_standard(tmp_path, "train", "x", png, pose, meta)])
    with pytest.raises(ValueError, match="characters 'a' has no split"):
        S.write_index(tmp_path, [], {}, [], characters={"a": {"split": "dev", "standard_pose": _pose()}})


def test_verify_cli_and_preview_read_through_the_format(tmp_path, capsys):
    from serialgen.cli import main as cli_main

    _write_set(tmp_path)
    assert cli_main(["shards", "verify", str(tmp_path)]) == 0
    assert "verify: OK, 3 shards, 9 pairs" in capsys.readouterr().out
    assert cli_main(["shards", "preview", str(tmp_path), "--out", str(tmp_path / "sheet.png"), "--count", "2"]) == 0
    _edit_index(tmp_path, lambda ix: ix.update(format_version=7))
    assert cli_main(["shards", "preview", str(tmp_path), "--out", str(tmp_path / "sheet.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "format_version 7" in err[0]
    # a set of a newer serialgen is not damaged: a usage error (update serialgen), one line, exit 2
    assert cli_main(["shards", "verify", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "newer serialgen" in err[0]


def test_assign_splits_follows_the_fraction_and_keeps_recorded_splits():
    ids = [f"char-{i:02d}" for i in range(14)]
    splits = S.assign_splits(ids, 0.2, {})
    assert sorted(splits) == ids and list(splits.values()).count("test") == 3  # round(0.2 * 14)
    assert S.assign_splits(list(reversed(ids)), 0.2, {}) == splits  # the order of ids does not matter
    # the new ones by hash rank: the lowest hashes are test
    rank = sorted(ids, key=lambda i: hashlib.sha256(f"serialgen-split/{i}".encode()).digest())
    assert {i for i, v in splits.items() if v == "test"} == set(rank[:3])
    # tiny sets: at least one test and one train character from two on; one character is train
    assert list(S.assign_splits(ids[:2], 0.2, {}).values()).count("test") == 1
    assert list(S.assign_splits(ids[:2], 0.9, {}).values()).count("train") == 1
    assert S.assign_splits(ids[:1], 0.2, {}) == {ids[0]: "train"}
    assert set(S.assign_splits(ids, 0.0, {}).values()) == {"train"}
    assert S.assign_splits([], 0.2, {}) == {}
    # recorded splits always win; new characters fill the rest of the test count
    recorded = {i: "train" for i in rank[:3]}  # e.g. a folder rendered with another fraction
    again = S.assign_splits(ids, 0.2, recorded)
    assert all(again[i] == "train" for i in rank[:3]) and list(again.values()).count("test") == 3
    grown = S.assign_splits(ids + ["char-new-1", "char-new-2"], 0.2, splits)
    assert all(grown[i] == splits[i] for i in ids)  # a re-run with more characters moves no one
    too_many = S.assign_splits(ids, 0.1, {i: "test" for i in ids[:5]})
    assert list(too_many.values()).count("test") == 5  # recorded test characters are never moved
    with pytest.raises(ValueError, match="not train or test"):
        S.assign_splits(ids, 0.2, {ids[0]: "val"})
    with pytest.raises(ValueError, match="outside"):
        S.assign_splits(ids, 1.5, {})


def test_preview_marks_each_pair_split_and_shows_the_display_name(tmp_path):
    from PIL import Image

    from serialgen.dataset.cli_shards import SPLIT_COLOURS, contact_sheet, display_name

    _write_set(tmp_path)
    _edit_index(tmp_path, lambda ix: ix["characters"]["proc-000001"].update(name="Knight-e48437"))
    index = S.read_index(tmp_path)
    assert display_name("proc-000001", index["characters"]) == "Knight-e48437"
    assert display_name("proc-000002", index["characters"]) == "proc-000002"  # no name: the id
    assert display_name("proc-000002", {}) == "proc-000002"
    for split in S.SPLITS:
        if not any(e["split"] == split for e in index["shards"]):
            continue
        path, drawn, refused = contact_sheet(tmp_path, tmp_path / f"{split}.png", count=1, thumb_height=32, split=split)
        assert drawn == 1 and not refused
        assert Image.open(path).convert("RGB").getpixel((2, 2)) == SPLIT_COLOURS[split]


# -- camera maths (no Blender) -------------------------------------------------------------------


def test_fit_camera_frames_the_points():
    from serialgen.assets_manifest.geometry import camera as cm

    rng = np.random.default_rng(0)
    pts = rng.normal(0.0, [0.3, 0.2, 0.5], (200, 3)) + [0.0, 0.0, 1.0]
    for i in range(20):
        view = cm.sample_view(rng)
        cam = cm.fit_camera(view, pts, 512, 768)
        uv, z = cam.project(pts)
        assert (z > 0).all()
        assert uv.min() >= -1 and (uv[:, 0] <= 513).all() and (uv[:, 1] <= 769).all()
        span = max(np.ptp(uv[:, 0]) / 512, np.ptp(uv[:, 1]) / 768)
        assert abs(span - view.fill) < 0.03, (view, span)


def test_render_settings_reject_bad_input():
    from serialgen.errors import UserInputError
    from serialgen.render.scene import RenderSettings

    for bad in ({"width": 0}, {"height": 99999}, {"width": "512"}):
        with pytest.raises(UserInputError, match="--resolution"):
            RenderSettings(**bad)
    with pytest.raises(UserInputError, match="--engine"):
        RenderSettings(engine="povray")

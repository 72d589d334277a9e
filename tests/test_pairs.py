"""Stage II pair shards (the ``serialgen.pairs`` schema of the tar-set layer): format round trip,
verification, and pair building on (real, local) Ray Data (``ray`` tier)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
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
from serialgen.errors import UserInputError


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


@pytest.fixture(scope="module")
def local_ray():  # only the ray-tier tests below use it
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture()
def corpus(tmp_path) -> Path:
    root = tmp_path / "corpus"
    for who, colour in [("alice", (200, 30, 30)), ("bob", (30, 30, 200))]:
        (root / who).mkdir(parents=True)
        for i in range(3):
            _img(60 + 10 * i, 90, colour).save(root / who / f"{i}.jpg", quality=90)
            (root / who / f"{i}.txt").write_text(f"{who} photo {i}\n")
    rgba = Image.new("RGBA", (40, 60), (0, 0, 0, 0))
    rgba.paste((0, 200, 0, 255), (10, 10, 30, 50))
    rgba.save(root / "solo.png")
    (root / "solo.json").write_text(json.dumps({"caption": "a solo shot", "identity": "carol"}))
    (root / "broken.jpg").write_bytes(b"not an image")
    return root


@pytest.mark.ray
def test_build_pairs_on_ray_and_resume(local_ray, corpus, tmp_path):
    from serialgen.training.stage2.build_pairs import build_pairs

    out = tmp_path / "pairs"
    report = build_pairs(corpus, out, standardizer="identity", samples_per_shard=3, batch_size=2, progress=False)
    assert report["inputs"] == 8 and report["shards"] == 3 and report["shards_built"] == 3
    assert report["pairs"] == 7 and report["skipped"] == 1 and report["skip_reasons"] == {"unreadable image": 1}
    assert verify_pairs(out)["ok"]

    pairs = {s.meta["source"]: s for s in iter_pairs(out)}
    assert sorted(pairs) == ["alice/0.jpg", "alice/1.jpg", "alice/2.jpg", "bob/0.jpg", "bob/1.jpg", "bob/2.jpg", "solo.png"]
    a0 = pairs["alice/0.jpg"]
    assert a0.caption == "alice photo 0" and a0.meta["identity"] == "alice"
    assert a0.target == (corpus / "alice" / "0.jpg").read_bytes()  # JPEG targets are stored byte for byte
    assert a0.image("std_ref").size == (512, 768) and "identity" in a0.meta["standardizer"]
    # alt_ref: the next image of the same identity (cyclic), absent for a single-image identity
    assert a0.meta["alt_source"] == "alice/1.jpg" and a0.alt_ref == (corpus / "alice" / "1.jpg").read_bytes()
    assert pairs["bob/2.jpg"].meta["alt_source"] == "bob/0.jpg"
    solo = pairs["solo.png"]
    assert solo.caption == "a solo shot" and solo.meta["identity"] == "carol" and solo.alt_ref is None
    assert solo.image("target").getpixel((0, 0))[0] > 240  # transparent background composited on white

    # resume: a lost shard is rebuilt identically, complete shards are kept untouched
    before = {p.name: p.read_bytes() for p in out.glob("pairs-*.tar")}
    kept_mtime = (out / "pairs-000000.tar").stat().st_mtime_ns
    (out / "pairs-000001.tar").unlink()
    (out / "pairs-000002.json").unlink()  # a shard without its sidecar is not complete either
    again = build_pairs(corpus, out, standardizer="identity", samples_per_shard=3, batch_size=2, progress=False)
    assert again["shards_built"] == 2 and again["shards_kept"] == 1 and again["pairs"] == 7
    assert {p.name: p.read_bytes() for p in out.glob("pairs-*.tar")} == before
    assert (out / "pairs-000000.tar").stat().st_mtime_ns == kept_mtime
    nothing = build_pairs(corpus, out, standardizer="identity", samples_per_shard=3, batch_size=2, progress=False)
    assert nothing["shards_built"] == 0 and nothing["pairs"] == 7

    # a different corpus into the same folder is refused, not mixed
    _img(10, 10, (1, 1, 1)).save(corpus / "zed.jpg")
    with pytest.raises(UserInputError, match="different input list"):
        build_pairs(corpus, out, standardizer="identity", samples_per_shard=3, progress=False)


@pytest.mark.ray
def test_build_pairs_from_webdataset_shards(local_ray, tmp_path):
    from serialgen.training.stage2.build_pairs import build_pairs, discover_inputs

    tar_path = tmp_path / "laion-000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i in range(3):
            buf = io.BytesIO()
            _img(30, 45, (10 * i, 100, 100)).save(buf, format="JPEG")
            for ext, data in [("jpg", buf.getvalue()), ("txt", f"caption {i}".encode()),
                              ("json", json.dumps({"identity": "same"}).encode())]:
                info = tarfile.TarInfo(f"s{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    items = discover_inputs(tmp_path)
    assert [it.source for it in items] == ["laion-000.tar#s0", "laion-000.tar#s1", "laion-000.tar#s2"]
    assert [it.alt for it in items] == [1, 2, 0]
    report = build_pairs(tar_path, tmp_path / "pairs", standardizer="identity", samples_per_shard=10, progress=False)
    assert report["pairs"] == 3
    caps = [s.caption for s in iter_pairs(tmp_path / "pairs")]
    assert caps == ["caption 0", "caption 1", "caption 2"]


def test_bad_inputs_are_one_line_errors(tmp_path):
    from serialgen.training.stage2.build_pairs import build_pairs, load_standardizer

    with pytest.raises(UserInputError, match="--input: .*nowhere not found"):
        build_pairs(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="holds no images"):
        build_pairs(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(UserInputError, match="--checkpoint: .*Stage I checkpoint folder"):
        load_standardizer(str(tmp_path / "no-ckpt"))
    with pytest.raises(TarSetError, match="index.json: not found; expected a pair set written by `serialgen standardize`"):
        read_index(tmp_path)
    np.testing.assert_array_equal(np.asarray(load_standardizer("identity")([_img(20, 20, (5, 5, 5))])[0])[0, 0], [255, 255, 255])

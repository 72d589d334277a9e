"""Stage II pair building (`serialgen pairs build`, training/stage2/build_pairs.py): the skip policy, the
mask/pose sources recorded per pair, the refusal to fall back silently, and whole builds on real, local
Ray Data (``ray`` tier). The real estimator's builds are in tests/test_estimator_real.py."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serialgen.cli import main
from serialgen.dataset.pairs import iter_pairs, read_index, verify_pairs
from serialgen.dataset.person_estimate import EstimatorUnavailable, PersonEstimate
from serialgen.dataset.posemap import Pose
from serialgen.dataset.tarset import TarSetError
from serialgen.errors import UserInputError
from serialgen.training.stage2.build_pairs import SkipPolicy, build_pairs, load_standardizer

NO_ESTIMATOR = {"mask": "threshold", "pose": "blank"}


def _img(w: int, h: int, colour: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (w, h), colour)


def _estimate(person=True, people=1, box=(0, 10, 50, 90), confidence=0.9, size=(64, 100)) -> PersonEstimate:
    pose = Pose(np.zeros((66, 2), np.float32), np.zeros(66, bool), size, np.zeros((0, 2), np.float32))
    return PersonEstimate(size, person, None, pose, np.zeros(66, np.float32), confidence, people,
                          box if person else None)


def test_skip_policy_names_each_reason():
    policy = SkipPolicy(min_height=0.5, min_confidence=0.6)
    assert policy.reason(None) is None  # the estimator did not run: nothing to judge
    assert policy.reason(_estimate(person=False)) == "no person found"
    assert policy.reason(_estimate(people=3)) == "several people: 3 faces"
    assert policy.reason(_estimate(box=(0, 10, 50, 40))) == "person too small: 0.30 of the height < 0.5"
    assert policy.reason(_estimate(confidence=0.4)) == "low pose confidence: 0.40 < 0.6"
    assert policy.reason(_estimate()) is None
    keep = SkipPolicy(no_person="keep", several_people="keep", min_height=0.0)
    assert keep.reason(_estimate(person=False)) is None and keep.reason(_estimate(people=2)) is None
    with pytest.raises(UserInputError, match="--no-person maybe: expected skip or keep"):
        SkipPolicy(no_person="maybe")
    with pytest.raises(UserInputError, match=r"--min-person-height 2: expected a fraction in \[0, 1\]"):
        SkipPolicy(min_height=2)


def test_without_the_estimator_a_build_needs_explicit_flags(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SERIALGEN_ESTIMATOR_PYTHON", raising=False)
    monkeypatch.setenv("SERIALGEN_ESTIMATOR_VENV", str(tmp_path / "no-venv"))
    (tmp_path / "in").mkdir()
    _img(20, 30, (9, 9, 9)).save(tmp_path / "in" / "a.png")
    with pytest.raises(EstimatorUnavailable, match="not set up: run `serialgen estimator setup` once.*--mask threshold --pose blank"):
        build_pairs(tmp_path / "in", tmp_path / "out", progress=False)
    assert main(["pairs", "build", "--checkpoint", "identity", "--input", str(tmp_path / "in"), "--out",
                 str(tmp_path / "out")]) == 2
    assert "serialgen estimator setup" in capsys.readouterr().err
    assert not (tmp_path / "out" / "plan.json").exists()  # refused before anything is written


def test_standardize_pairs_was_renamed(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["standardize", "--pairs", "--checkpoint", "x", "--input", "y", "--out", "z"])
    assert stop.value.code == 2
    assert "--pairs was renamed: use serialgen pairs build" in capsys.readouterr().err


def test_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(UserInputError, match="--input: .*nowhere not found"):
        build_pairs(tmp_path / "nowhere", tmp_path / "out", reference_options=NO_ESTIMATOR)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="holds no images"):
        build_pairs(tmp_path / "empty", tmp_path / "out", reference_options=NO_ESTIMATOR)
    with pytest.raises(UserInputError, match="--checkpoint: .*Stage I checkpoint folder"):
        load_standardizer(str(tmp_path / "no-ckpt"))
    with pytest.raises(TarSetError, match="index.json: not found; expected a pair set"):
        read_index(tmp_path)
    _img(20, 30, (9, 9, 9)).save(tmp_path / "empty" / "a.png")
    with pytest.raises(UserInputError, match="--dwpose-det and --dwpose-pose go together"):
        build_pairs(tmp_path / "empty", tmp_path / "out", reference_options={**NO_ESTIMATOR, "dwpose_det": "x.onnx"})
    assert not (tmp_path / "out" / "plan.json").exists()  # options are checked before anything is written
    np.testing.assert_array_equal(np.asarray(load_standardizer("identity")([_img(20, 20, (5, 5, 5))])[0])[0, 0], [255, 255, 255])


@pytest.fixture(scope="module")
def local_ray():  # only the ray-tier tests below use it
    from serialgen.ray_local import init_ray

    import ray

    init_ray(num_cpus=2, log_to_driver=False)
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
    out = tmp_path / "pairs"
    report = build_pairs(corpus, out, standardizer="identity", samples_per_shard=3, batch_size=2, progress=False,
                         reference_options=NO_ESTIMATOR)
    assert report["inputs"] == 8 and report["shards"] == 3 and report["shards_built"] == 3
    assert report["pairs"] == 7 and report["skipped"] == 1 and report["skip_reasons"] == {"unreadable image": 1}
    assert report["skip_rate"] == 0.125
    # where every reference's mask and pose came from: said per pair and counted in the report
    assert report["sources_built_now"] == {"mask alpha, pose blank": 1, "mask threshold, pose blank": 6}
    assert verify_pairs(out)["ok"]

    pairs = {s.meta["source"]: s for s in iter_pairs(out)}
    assert sorted(pairs) == ["alice/0.jpg", "alice/1.jpg", "alice/2.jpg", "bob/0.jpg", "bob/1.jpg", "bob/2.jpg", "solo.png"]
    a0 = pairs["alice/0.jpg"]
    assert a0.caption == "alice photo 0" and a0.meta["identity"] == "alice"
    assert (a0.meta["mask_source"], a0.meta["pose_source"], a0.meta["estimate"]) == ("threshold", "blank", None)
    assert a0.target == (corpus / "alice" / "0.jpg").read_bytes()  # JPEG targets are stored byte for byte
    assert a0.image("std_ref").size == (512, 768) and "identity" in a0.meta["standardizer"]
    # alt_ref: the next image of the same identity (cyclic), absent for a single-image identity
    assert a0.meta["alt_source"] == "alice/1.jpg" and a0.alt_ref == (corpus / "alice" / "1.jpg").read_bytes()
    assert pairs["bob/2.jpg"].meta["alt_source"] == "bob/0.jpg"
    solo = pairs["solo.png"]
    assert solo.caption == "a solo shot" and solo.meta["identity"] == "carol" and solo.alt_ref is None
    assert solo.meta["mask_source"] == "alpha"  # a transparent picture's own alpha is its mask
    assert solo.image("target").getpixel((0, 0))[0] > 240  # transparent background composited on white
    assert read_index(out)["policy"] == {"no_person": "skip", "several_people": "skip", "min_height": 0.2,
                                         "min_confidence": 0.6}

    # resume: a lost shard is rebuilt identically, complete shards are kept untouched
    before = {p.name: p.read_bytes() for p in out.glob("pairs-*.tar")}
    kept_mtime = (out / "pairs-000000.tar").stat().st_mtime_ns
    (out / "pairs-000001.tar").unlink()
    (out / "pairs-000002.json").unlink()  # a shard without its sidecar is not complete either
    again = build_pairs(corpus, out, standardizer="identity", samples_per_shard=3, batch_size=2, progress=False,
                        reference_options=NO_ESTIMATOR)
    assert again["shards_built"] == 2 and again["shards_kept"] == 1 and again["pairs"] == 7
    assert {p.name: p.read_bytes() for p in out.glob("pairs-*.tar")} == before
    assert (out / "pairs-000000.tar").stat().st_mtime_ns == kept_mtime
    # another skip policy (or mask/pose source) into the same folder is refused, not mixed
    with pytest.raises(UserInputError, match="different input list, shard size, mask/pose source or skip policy"):
        build_pairs(corpus, out, standardizer="identity", samples_per_shard=3, progress=False,
                    reference_options=NO_ESTIMATOR, policy=SkipPolicy(min_height=0.5))
    # a different corpus into the same folder is refused, not mixed
    _img(10, 10, (1, 1, 1)).save(corpus / "zed.jpg")
    with pytest.raises(UserInputError, match="different input list"):
        build_pairs(corpus, out, standardizer="identity", samples_per_shard=3, progress=False,
                    reference_options=NO_ESTIMATOR)


@pytest.mark.ray
def test_pairs_build_command_from_webdataset_shards(local_ray, tmp_path, capsys):
    from serialgen.training.stage2.build_pairs import discover_inputs

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
    assert main(["pairs", "build", "--checkpoint", "identity", "--input", str(tar_path), "--out", str(tmp_path / "pairs"),
                 "--mask", "threshold", "--pose", "blank", "--samples-per-shard", "10", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pairs"] == 3 and report["skip_rate"] == 0.0
    caps = [s.caption for s in iter_pairs(tmp_path / "pairs")]
    assert caps == ["caption 0", "caption 1", "caption 2"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A one-step Stage I run of the tiny config at 32x48: a real checkpoint folder."""
    from serialgen.training.common.config import override
    from serialgen.training.stage1.config import load_stage1_config
    from serialgen.training.stage1.train import train_stage1

    config = override(load_stage1_config("stage1-tiny"), {
        "data.train_shards": "synthetic:2", "data.resolution": "32x48", "train.max_steps": 1,
        "train.checkpoint_every": 0, "validation.every": 0, "inference.num_inference_steps": 2})
    result = train_stage1(config, output_dir=tmp_path_factory.mktemp("stage1"), resume="never")
    return result.last_checkpoint


@pytest.mark.slow
def test_checkpoint_standardizer_takes_the_prepared_references_in_the_dtype_asked(tiny_checkpoint, tmp_path):
    import torch

    from serialgen.training.stage1.reference_inputs import ReferencePreparer
    from serialgen.training.stage2.build_pairs import CheckpointStandardizer

    prepare = ReferencePreparer(mask="threshold", pose="blank")
    refs = [prepare(_img(40, 50, (200, 40, 40)), (32, 48)), prepare(_img(30, 60, (40, 200, 40)), (32, 48))]
    outs = {}
    for dtype in ("fp32", "bf16"):
        std = CheckpointStandardizer(tiny_checkpoint, resolution=(32, 48), steps=2, dtype=dtype)
        assert next(std.pipeline.model.parameters()).dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        outs[dtype] = std(refs, seed=3)
        assert [im.size for im in outs[dtype]] == [(32, 48), (32, 48)]
        assert [np.asarray(im).tolist() for im in std(refs, seed=3)] == [np.asarray(im).tolist() for im in outs[dtype]]


@pytest.mark.slow
@pytest.mark.ray
def test_pairs_build_with_a_stage1_checkpoint_and_dtype(local_ray, tiny_checkpoint, corpus, tmp_path, capsys):
    assert main(["pairs", "build", "--checkpoint", str(tiny_checkpoint), "--input", str(corpus), "--out",
                 str(tmp_path / "pairs"), "--mask", "threshold", "--pose", "blank", "--dtype", "bf16", "--steps", "2",
                 "--limit", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pairs"] == 3 and report["standardizer"] == str(tiny_checkpoint)
    pair = next(iter(iter_pairs(tmp_path / "pairs")))
    assert pair.image("std_ref").size == (32, 48) and pair.meta["standardizer"].startswith("stage1:")

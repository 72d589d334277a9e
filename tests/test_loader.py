"""The training loader on real tar shards: outputs, splits, determinism, skips and errors."""

import io
import json
import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from serialgen.assets_manifest.geometry.standard_form import reference_standard_keypoints
from serialgen.cli import main as cli_main
from serialgen.dataset.loader import (LoaderConfig, RenderPairDataset, make_loader, open_dataset, resolve_shards,
                                      to_model_range)
from serialgen.dataset.posemap import Pose, draw_pose_map, parse_pose
from serialgen.dataset.shards import iter_shard, verify
from serialgen.dataset.tarset import TarSetError
from serialgen.errors import UserInputError
from serialgen.imaging import fit_transform
from test_loader_synth import synth_background, write_synthetic_shards

SIZE = (128, 192)
PER_SHARD = 5


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One intra-op thread, as torch sets it in a DataLoader worker: with two, the resampling kernel's
    threads spin against other jobs on a busy 2-core machine and a 0.2 s test takes 2 s."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_synthetic_shards(root, n_shards=4, per_shard=PER_SHARD, size=SIZE)
    write_synthetic_shards(root, n_shards=1, per_shard=3, split="test", size=SIZE, first_character=90)
    bgs = [str(synth_background(root / f"bg{i}.jpg", i, size=(200, 150))) for i in range(3)]
    return root, bgs


def _cfg(**kw):
    base = dict(resolution=SIZE, shuffle_buffer=8, shuffle_initial=2)
    base.update(kw)
    return LoaderConfig(**base)


def _keys(iterable):
    return [s["__key__"] for s in iterable]


def test_sample_layout_ranges_and_shapes(shard_set):
    root, bgs = shard_set
    ds = RenderPairDataset(root, bgs, _cfg(std_pose="canonical", dtype="float32"))
    samples = list(ds)
    assert len(samples) == 4 * PER_SHARD and ds.stats.total_skipped == 0
    s = samples[0]
    w, h = SIZE
    for k in ("ref", "ref_pose", "std", "std_pose"):
        assert s[k].shape == (3, h, w) and s[k].dtype == torch.float32 and s[k].is_contiguous(), k
    assert s["ref"].min() >= -1 and s["ref"].max() <= 1 and s["std"].max() == 1.0  # white standard
    assert s["ref_pose"].min() == 0 and s["ref_pose"].max() <= 1
    assert s["ref_mask"].shape == (1, h, w) and set(s["ref_mask"].unique().tolist()) == {0.0, 1.0}
    assert s["ref_keypoints"].shape == (66, 3) and s["meta"]["character"].startswith("synth")
    # With std_pose="canonical" every sample shares one standard pose map; the mask marks the background as 1.
    assert all(torch.equal(x["std_pose"], s["std_pose"]) for x in samples)
    assert s["ref_mask"].mean() > 0.3
    # The default is the fast path training uses: uint8, converted on the device
    u8 = next(iter(RenderPairDataset(root, bgs, _cfg(std_pose="canonical"))))
    assert LoaderConfig().dtype == "uint8" and u8["ref"].dtype == torch.uint8 and u8["ref_mask"].dtype == torch.uint8
    assert u8["__key__"] == s["__key__"] and torch.equal(to_model_range(u8)["ref"], s["ref"])


def test_batches_are_channels_last_and_uint8_converts_to_the_same_floats(shard_set):
    root, bgs = shard_set
    b32 = next(iter(RenderPairDataset(root, bgs, _cfg(batch_size=3, dtype="float32"))))
    b8 = next(iter(RenderPairDataset(root, bgs, _cfg(batch_size=3, dtype="uint8"))))
    assert b32["ref"].shape == (3, 3, SIZE[1], SIZE[0]) and b32["ref"].is_contiguous(memory_format=torch.channels_last)
    assert b8["ref"].dtype == torch.uint8 and b32["__key__"] == b8["__key__"]
    conv = to_model_range(b8)
    for k in ("ref", "ref_pose", "std", "std_pose", "ref_mask"):
        torch.testing.assert_close(conv[k], b32[k], atol=1e-6, rtol=0)
    # Batches are composited straight into the batch tensor; single samples through a temporary
    # canvas: the same pixels, sample for sample.
    singles = iter(RenderPairDataset(root, bgs, _cfg(dtype="uint8")))
    for i in range(3):
        s = next(singles)
        assert s["__key__"] == b8["__key__"][i]
        for k in ("ref", "ref_mask", "ref_pose", "std", "std_pose"):
            assert torch.equal(s[k], b8[k][i]), k


def test_deterministic_given_a_seed_and_reshuffled_by_epoch(shard_set):
    root, bgs = shard_set
    a, b = list(RenderPairDataset(root, bgs, _cfg(seed=3))), list(RenderPairDataset(root, bgs, _cfg(seed=3)))
    assert _keys(a) == _keys(b)
    for x, y in zip(a, b):
        assert torch.equal(x["ref"], y["ref"]) and torch.equal(x["ref_mask"], y["ref_mask"])
    other = RenderPairDataset(root, bgs, _cfg(seed=3))
    other.set_epoch(1)
    assert _keys(other) != _keys(a) and sorted(_keys(other)) == sorted(_keys(a))


def test_two_ranks_two_workers_see_disjoint_samples_covering_the_epoch(shard_set):
    root, bgs = shard_set
    seen = []
    for rank in range(2):
        loader = make_loader(root, bgs, _cfg(rank=rank, world_size=2), num_workers=2)
        seen.append(_keys(loader))
    everything = {k for k, in [(k,) for k in _keys(RenderPairDataset(root, bgs, _cfg()))]}
    assert len(everything) == 4 * PER_SHARD
    assert set(seen[0]).isdisjoint(seen[1])
    assert len(seen[0]) + len(seen[1]) == len(everything) and set(seen[0]) | set(seen[1]) == everything


def test_fewer_shards_than_readers_is_a_clear_error_not_a_hang(shard_set, monkeypatch):
    root, bgs = shard_set
    three = resolve_shards(root)[:3]
    with pytest.raises(UserInputError, match="3 shards for 2 rank"):
        make_loader(three, bgs, _cfg(rank=0, world_size=2), num_workers=2)
    # The same check inside the workers (a DataLoader built by hand): an error, not a wait. Run as
    # worker 1 of 2 in this process: a real DataLoader re-raises it, but its errored workers then
    # take torch's 5 s shutdown timeout each when the iterator is collected.
    ds = RenderPairDataset(three, bgs, _cfg(rank=1, world_size=2))
    monkeypatch.setattr(RenderPairDataset, "_worker", staticmethod(lambda: (1, 2)))
    with pytest.raises(UserInputError, match="each reader needs at least one shard"):
        list(ds)
    monkeypatch.undo()
    # Resampled mode draws with replacement per reader: no such limit.
    ds = RenderPairDataset(three, bgs, _cfg(rank=1, world_size=2, resampled=True, epoch_length=4))
    assert len(list(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2))) == 8


def test_resampled_mode_is_infinite_and_deterministic(shard_set):
    root, bgs = shard_set
    ds = RenderPairDataset(root, bgs, _cfg(resampled=True, seed=1))
    it = iter(ds)
    keys = [next(it)["__key__"] for _ in range(3 * 4 * PER_SHARD)]  # three epochs' worth, no end
    assert len(set(keys)) > PER_SHARD
    again = RenderPairDataset(root, bgs, _cfg(resampled=True, seed=1, epoch_length=10))
    assert _keys(again) == keys[:10]


def _rewrite(src: Path, dst: Path, edit) -> None:
    """Copy a shard member by member, letting ``edit(name, data)`` change or drop (None) members."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w", format=tarfile.USTAR_FORMAT) as tout:
        for info in tin:
            data = edit(info.name, tin.extractfile(info).read())
            if data is None:
                continue
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))


def test_corrupt_members_are_skipped_counted_and_summarised(shard_set, tmp_path, caplog):
    root, bgs = shard_set
    src = resolve_shards(root)[0]
    names = sorted({m.split(".")[0] for m in tarfile.open(src).getnames()})

    def edit(name, data):
        key, member = name.split(".", 1)
        if key == names[0] and member == "ref.png":
            return data[: len(data) // 2]  # truncated PNG
        if key == names[1] and member == "std_pose.json":
            return b"{not json"
        if key == names[2] and member == "meta.json":
            return None  # a missing member
        if key == names[3] and member == "ref.png":
            return b"\x89PNG\r\n\x1a\n" + b"\0" * 40  # garbage after the signature
        return data

    bad = tmp_path / "train" / "bad.tar"  # beside a copy of the set's standards (format 3: joined)
    shutil.copytree(root / "train" / "standard", tmp_path / "train" / "standard")
    _rewrite(Path(src), bad, edit)
    ds = RenderPairDataset([str(bad)], bgs, _cfg(std_pose="per_character"))
    with caplog.at_level(logging.WARNING, logger="serialgen.dataset.loader"):
        out = list(ds)
    assert _keys(out) == [names[4]]
    st = ds.stats
    assert st.skipped["corrupt ref.png"] == 2 and st.skipped["corrupt std.png/std_pose.json"] == 1
    assert st.skipped["incomplete sample"] == 1 and st.total_skipped == 4
    assert "skipped 4" in caplog.text and "corrupt ref.png" in caplog.text


def test_truncated_shard_is_skipped_and_counted(shard_set, tmp_path):
    root, bgs = shard_set
    shards = resolve_shards(root)
    cut = tmp_path / "train" / "cut.tar"  # beside a copy of the set's standards (format 3: joined)
    shutil.copytree(root / "train" / "standard", tmp_path / "train" / "standard")
    data = Path(shards[1]).read_bytes()
    cut.write_bytes(data[: int(len(data) * 0.6)])
    ds = RenderPairDataset([shards[0], str(cut), shards[2]], bgs, _cfg())
    keys = _keys(ds)
    assert 2 * PER_SHARD < len(keys) < 3 * PER_SHARD  # the whole samples before the cut survive
    assert dict(ds.stats.skipped) == {"truncated shard": 1}  # one sample lost, where and why
    [(shard, lost)] = ds.stats.keys["truncated shard"].items()
    assert shard == "train/cut.tar" and len(lost) == 1 and lost[0] not in keys
    assert lost[0] in [k for k, _ in iter_shard(shards[1])]  # a sample of the shard that was cut
    assert len(keys) == len(set(keys))


def test_a_loader_left_mid_pass_exits_quietly(shard_set):
    """A script that stops reading mid-pass and exits prints nothing: the shard reader's generator
    is closed at interpreter exit, when its module's names may already be gone (it printed an
    "Exception ignored ... TypeError" traceback)."""
    import subprocess
    import sys

    root, _bgs = shard_set
    code = ("import sys\nfrom serialgen.dataset.loader import LoaderConfig, RenderPairDataset\n"
            "it = iter(RenderPairDataset(sys.argv[1], config=LoaderConfig(resampled=True, batch_size=2)))\n"
            "next(it)\nprint('read')\n")
    run = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "read", run.stderr
    assert "Exception ignored" not in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_missing_shards_are_one_line_errors(shard_set, tmp_path, capsys):
    root, bgs = shard_set
    with pytest.raises(UserInputError, match="shard not found: .*nope.tar"):
        RenderPairDataset(str(tmp_path / "nope.tar"))
    with pytest.raises(UserInputError, match="shard not found: .*shard-000004.tar"):
        RenderPairDataset(str(root / "train" / "shard-{000000..000007}.tar"))
    with pytest.raises(UserInputError, match="no shards of split 'val'"):
        RenderPairDataset(root, split="val")
    assert cli_main(["data", "bench", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0]


@pytest.mark.parametrize("argv, words", [
    (["data", "preview", "{root}", "--out", "{tmp}/g.png", "--count", "-2"], "--count -2: must be at least 1"),
    (["data", "preview", "{root}", "--out", "{tmp}/g.png", "--thumb-height", "0"], "--thumb-height 0"),
    (["data", "bench", "{root}", "--canonical-share", "2"], "--canonical-share 2.0"),
    (["data", "bench", "{root}", "--split", "val"], "invalid choice: 'val'"),
    (["data", "bench", "{root}", "--seconds", "0"], "--seconds must be > 0"),
])
def test_data_usage_errors_are_one_line_exit_2(shard_set, tmp_path, capsys, argv, words):
    root, _ = shard_set
    try:
        code = cli_main([a.format(root=root, tmp=tmp_path) for a in argv])
    except SystemExit as exc:  # argparse's own errors (choices) exit from the parser
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "g.png").exists()


def test_test_split_and_training_entry_point(shard_set):
    root, bgs = shard_set
    ds = open_dataset(str(root), resolution=SIZE, seed=0, split="test", backgrounds=bgs)
    keys = _keys(ds)
    assert len(keys) == 3 and all(k.startswith("c0090") for k in keys)


def test_cli_preview_and_bench(shard_set, tmp_path, capsys):
    root, bgs = shard_set
    out = tmp_path / "grid.png"
    assert cli_main(["data", "preview", str(root), "--out", str(out), "--count", "3", "--resolution", "128x192",
                     "--backgrounds", str(Path(bgs[0]).parent), "--thumb-height", "96"]) == 0
    from PIL import Image

    grid = Image.open(out)
    assert grid.height > 3 * 96 and grid.width > 5 * 64
    capsys.readouterr()
    assert cli_main(["data", "bench", str(root), "--json", "--seconds", "0.6", "--warmup", "0.2",
                     "--resolution", "128x192", "--batch-size", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["pairs_per_s"] > 0 and result["raw_decode_pairs_per_s"] > 0
    assert result["ratio"] == pytest.approx(result["pairs_per_s"] / result["raw_decode_pairs_per_s"], rel=0.01, abs=1e-3)  # ratios are rounded to 3 decimals
    # Both definitions of raw decode (ref + std, ref only) are reported, with their ratios. (Which is
    # faster is not asserted: 0.1 s slices of 128x192 decodes on a shared machine are noise.)
    ref_only = result["raw_decode_ref_only_pairs_per_s"]
    assert ref_only > 0 and "ref.png only" in result["raw_decode_ref_only_definition"]
    assert result["ratio_ref_only"] == pytest.approx(result["pairs_per_s"] / ref_only, rel=0.01, abs=1e-3)
    assert result["pairs_per_cpu_s"] > 0 and "std.png" in result["raw_decode_definition"]
    assert result["warmup_samples"] >= 32 + 16  # the background pool filled before measuring


def _pose_map(pose: dict | Pose, resolution) -> np.ndarray:
    """The (3, H, W) uint8 map the loader should draw for ``pose`` fitted into ``resolution``."""
    pose = parse_pose(pose) if isinstance(pose, dict) else pose
    t = fit_transform(pose.size, resolution)
    return draw_pose_map(pose.transformed(*t, resolution), resolution).transpose(2, 0, 1)


def test_the_canonical_pose_map_is_the_index_standard_pose(tmp_path):
    """``std_pose="canonical"``: the loader draws the index's standard_pose (what render used, at the
    render resolution), fitted to the output; a version 1 index falls back to the geometry; a foreign
    or newer index is a one-line error naming it."""
    known = {"width": 64, "height": 96, "names": ["nose", "neck", "r_shoulder", "l_shoulder", "r_hip", "l_hip"],
             "keypoints": [[32, 12, 1], [32, 22, 1], [22, 24, 1], [42, 24, 1], [26, 50, 1], [38, 50, 1]],
             "defined": [1] * 6}
    write_synthetic_shards(tmp_path, n_shards=1, per_shard=2, size=SIZE, standard_pose=known, with_characters=True,
                           version=2)
    s = next(iter(RenderPairDataset(tmp_path, None, _cfg(dtype="uint8", std_pose="canonical"))))
    expected = _pose_map(known, SIZE)
    assert expected.any() and np.array_equal(s["std_pose"].numpy(), expected)
    assert verify(tmp_path) == []

    # Version 1: no standard_pose; the reference figure at the standard camera, at the samples' size.
    index = json.loads((tmp_path / "index.json").read_text())
    index["format_version"] = 1
    del index["standard_pose"], index["characters"]
    (tmp_path / "index.json").write_text(json.dumps(index))
    s = next(iter(RenderPairDataset(tmp_path, None, _cfg(dtype="uint8", std_pose="canonical"))))
    uv, vis = reference_standard_keypoints(*SIZE)
    geometry = _pose_map(Pose(uv, vis, SIZE, np.zeros((0, 2), np.float32)), SIZE)
    assert np.array_equal(s["std_pose"].numpy(), geometry) and not np.array_equal(geometry, expected)

    # canonical_pose=PATH (e.g. saved with a checkpoint) wins over both.
    (tmp_path / "pose.json").write_text(json.dumps(known))
    s = next(iter(RenderPairDataset(tmp_path, None, _cfg(dtype="uint8", std_pose="canonical",
                                                         canonical_pose=str(tmp_path / "pose.json")))))
    assert np.array_equal(s["std_pose"].numpy(), expected)

    index["format_version"] = 4
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(TarSetError, match=r"index.json: serialgen.shards format_version 4; this serialgen reads "
                                          r"versions 1, 2, 3; written by a newer serialgen"):
        RenderPairDataset(tmp_path, None, _cfg())


def test_the_default_standard_pose_map_is_the_characters_own(tmp_path):
    """Issue 13.3: by default each sample's standard pose map is its character's own standard
    keypoints (the index's ``characters[id].standard_pose``, else the sample's std_pose.json): the map
    that agrees with its standard image; ``canonical_share`` gives that share of samples the
    canonical map instead."""
    known = {"width": 64, "height": 96, "names": ["nose", "neck"], "keypoints": [[32, 12, 1], [32, 22, 1]]}
    write_synthetic_shards(tmp_path, n_shards=2, per_shard=5, size=SIZE, standard_pose=known)
    index = json.loads((tmp_path / "index.json").read_text())
    own = {c: _pose_map(r["standard_pose"], SIZE) for c, r in index["characters"].items()}
    canonical = _pose_map(known, SIZE)
    samples = list(RenderPairDataset(tmp_path, None, _cfg(dtype="uint8")))
    assert len(samples) == 10 and LoaderConfig().std_pose == "per_character"
    for s in samples:
        assert np.array_equal(s["std_pose"].numpy(), own[s["meta"]["character"]])
        assert not np.array_equal(s["std_pose"].numpy(), canonical)
    # the index's pose wins over the pair's own std_pose.json (they agree in a verified set)
    first = next(iter(index["characters"]))
    index["characters"][first]["standard_pose"]["keypoints"][0][0] += 8
    (tmp_path / "index.json").write_text(json.dumps(index))
    moved = _pose_map(index["characters"][first]["standard_pose"], SIZE)
    s = [s for s in RenderPairDataset(tmp_path, None, _cfg(dtype="uint8")) if s["meta"]["character"] == first][0]
    assert np.array_equal(s["std_pose"].numpy(), moved)
    # canonical_share: about that share of samples get the canonical map, the rest their own
    ds = RenderPairDataset(tmp_path, None, _cfg(dtype="uint8", resampled=True, canonical_share=0.3, seed=3))
    it = iter(ds)
    hits = sum(np.array_equal(next(it)["std_pose"].numpy(), canonical) for _ in range(200))
    assert 35 <= hits <= 85, hits
    with pytest.raises(UserInputError, match="canonical_share=1.5"):
        LoaderConfig(canonical_share=1.5)


def test_format_3_pairs_join_their_characters_standard(tmp_path):
    """A format 3 pair carries no std.png: the loader reads its character's standard tar once (the
    index's standard_shards, or standard/<character>.tar beside a shard given alone) and yields
    exactly what a format 2 set of the same renders yields; a missing or damaged standard is
    counted, not a crash."""
    v3, v2 = tmp_path / "v3", tmp_path / "v2"
    write_synthetic_shards(v3, n_shards=2, per_shard=4, size=SIZE)
    write_synthetic_shards(v2, n_shards=2, per_shard=4, size=SIZE, version=2, with_characters=True)
    a = list(RenderPairDataset(v3, None, _cfg(dtype="uint8")))
    b = list(RenderPairDataset(v2, None, _cfg(dtype="uint8")))
    assert [s["__key__"] for s in a] == [s["__key__"] for s in b] and len(a) == 8
    for x, y in zip(a, b):
        for k in ("ref", "ref_mask", "ref_pose", "std", "std_pose"):
            assert torch.equal(x[k], y[k]), k
    ds = RenderPairDataset(str(v3 / "train" / "shard-000001.tar"), None, _cfg(dtype="uint8"))  # no index
    assert len(list(ds)) == 4 and ds.stats.std_cache_misses == 1
    # the standard of character 0 gone, that of character 1 damaged
    index = json.loads((v3 / "index.json").read_text())
    paths = {e["character"]: v3 / e["path"] for e in index["standard_shards"]}
    paths["synth0000"].unlink()
    paths["synth0001"].write_bytes(paths["synth0001"].read_bytes()[:700])
    ds = RenderPairDataset(v3, None, _cfg(dtype="uint8"))
    assert list(ds) == []
    assert dict(ds.stats.skipped) == {"missing standard": 4, "corrupt standard": 4}
    assert ds.stats.std_cache_misses == 8  # each failed read once, then remembered (the misses count lookups)


@pytest.mark.blender
def test_reads_shards_rendered_by_blender(tmp_path):
    """The loader on real renders (the mannequin, through the render worker and the shard writer) at
    the default output size, as training reads them."""
    from serialgen.assets_manifest.poses import build_pose_library, save_pose_library
    from serialgen.dataset.shards import ShardSummary, StandardSummary, split_of, write_index
    from serialgen.render.job import BlenderWorker, RenderJob
    from serialgen.render.scene import RenderSettings

    poses = tmp_path / "poses.npz"
    save_pose_library(build_pose_library(8, seed=0), poses)
    record = {"id": "mannequin-adult", "kind": "mannequin", "variant": "adult", "status": "accepted"}
    split = split_of(record["id"])
    out = tmp_path / "shards"
    worker = BlenderWorker(RenderSettings(width=128, height=192, threads=1))
    try:
        result = worker.run(RenderJob(record, "", str(out), f"{split}/{record['id']}-p000000-000003.tar", split,
                                      0, 3, 3, 0, str(poses)))
    finally:
        worker.unload()
    assert result["status"] == "ok", result.get("traceback")
    write_index(out, [ShardSummary(**result["shard"])], {}, result["failures"],
                characters={record["id"]: {"split": split, "standard_pose": result["standard_pose"]}},
                standards=[StandardSummary.from_json(result["standard"])])
    assert verify(out) == []
    ds = RenderPairDataset(out, None, LoaderConfig(split=split, shuffle_buffer=0))
    samples = list(ds)
    assert len(samples) == 3 and ds.stats.total_skipped == 0
    for s in samples:
        assert s["ref"].shape == (3, 768, 512) and (s["ref_mask"] == 0).any()


def test_output_size_other_than_the_render_size(shard_set):
    """`make shards` renders 256x384 while the loader defaults to 512x768: the canonical standard
    pose map must be fitted to the output canvas like the standard image (a regression: building it
    once crashed with a PIL fill error)."""
    root, bgs = shard_set
    out = (SIZE[0] * 2, SIZE[1] * 2)
    s = next(iter(RenderPairDataset(root, bgs, _cfg(resolution=out))))
    w, h = out
    assert s["std"].shape == (3, h, w) and s["std_pose"].shape == (3, h, w)
    drawn = s["std_pose"].amax(0) > 0
    ys, xs = np.nonzero(drawn.numpy())
    assert drawn.any() and xs.max() - xs.min() > w / 4 and ys.max() - ys.min() > h / 3

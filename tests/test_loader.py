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

from serialgen.cli import main as cli_main
from serialgen.dataset.loader import LoaderConfig, RenderPairDataset, make_loader, open_dataset, resolve_shards
from serialgen.errors import UserInputError
from test_loader_synth import synth_background, write_synthetic_shards

SIZE = (128, 192)
PER_SHARD = 5


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
    ds = RenderPairDataset(root, bgs, _cfg())
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
    # Every sample shares the canonical standard pose map; the mask marks the background as 1.
    assert all(torch.equal(x["std_pose"], s["std_pose"]) for x in samples)
    assert s["ref_mask"].mean() > 0.3


def test_batches_are_channels_last_and_uint8_converts_to_the_same_floats(shard_set):
    root, bgs = shard_set
    b32 = next(iter(RenderPairDataset(root, bgs, _cfg(batch_size=3))))
    b8 = next(iter(RenderPairDataset(root, bgs, _cfg(batch_size=3, dtype="uint8"))))
    assert b32["ref"].shape == (3, 3, SIZE[1], SIZE[0]) and b32["ref"].is_contiguous(memory_format=torch.channels_last)
    assert b8["ref"].dtype == torch.uint8 and b32["__key__"] == b8["__key__"]
    from serialgen.dataset.loader import to_model_range

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


def test_fewer_shards_than_readers_is_a_clear_error_not_a_hang(shard_set):
    root, bgs = shard_set
    three = resolve_shards(root)[:3]
    with pytest.raises(UserInputError, match="3 shards for 2 rank"):
        make_loader(three, bgs, _cfg(rank=0, world_size=2), num_workers=2)
    # The same check inside the workers (a DataLoader built by hand): an error, not a wait.
    ds = RenderPairDataset(three, bgs, _cfg(rank=1, world_size=2))
    with pytest.raises(Exception, match="each reader needs at least one shard"):
        list(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2))
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

    bad = tmp_path / "bad.tar"
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
    cut = tmp_path / "cut.tar"
    data = Path(shards[1]).read_bytes()
    cut.write_bytes(data[: int(len(data) * 0.6)])
    ds = RenderPairDataset([shards[0], str(cut), shards[2]], bgs, _cfg())
    keys = _keys(ds)
    assert 2 * PER_SHARD < len(keys) < 3 * PER_SHARD  # the whole samples before the cut survive
    assert ds.stats.skipped["truncated or unreadable shard"] == 1
    assert len(keys) == len(set(keys))


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
    # Both definitions of raw decode: decoding one PNG per pair is faster than decoding two.
    ref_only = result["raw_decode_ref_only_pairs_per_s"]
    assert ref_only > result["raw_decode_pairs_per_s"]
    assert result["ratio_ref_only"] == pytest.approx(result["pairs_per_s"] / ref_only, rel=0.01, abs=1e-3)
    assert result["pairs_per_cpu_s"] > 0 and "std.png" in result["raw_decode_definition"]
    assert result["warmup_samples"] >= 32 + 16  # the background pool filled before measuring


def test_reads_the_render_farms_shards_when_present():
    root = Path(__file__).resolve().parents[1] / "data" / "shards"
    if not (root / "index.json").is_file():
        pytest.skip(f"no rendered shard set at {root} (make shards)")
    ds = RenderPairDataset(root, None, LoaderConfig(shuffle_buffer=0))
    n = 0
    for s in ds:
        assert s["ref"].shape == (3, 768, 512) and (s["ref_mask"] == 0).any()
        n += 1
        if n >= 8:
            break
    assert n > 0 and ds.stats.total_skipped == 0


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

"""`serialgen render` end to end on a local Ray cluster (real Blender workers), then `shards verify`
and `shards preview`; bad input fails in one line before any work."""

from __future__ import annotations

import json

import pytest

from serialgen.cli import main


def _assets(root, variants=("adult", "child"), extra=()):
    from serialgen.assets_manifest.poses import build_pose_library, save_pose_library

    root.mkdir(parents=True, exist_ok=True)
    save_pose_library(build_pose_library(30, seed=0), root / "poses.npz")
    records = [{"schema": "serialgen.character/1", "id": f"mannequin-{v}", "kind": "mannequin", "variant": v,
                "status": "accepted"} for v in variants]
    records += list(extra)
    (root / "characters.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


@pytest.mark.blender
@pytest.mark.ray
@pytest.mark.slow
def test_render_end_to_end_with_ray(tmp_path, capsys):
    import webdataset as wds

    bad = {"id": "mannequin-broken", "kind": "mannequin", "variant": "missing", "status": "accepted"}
    rejected = {"id": "char-000000000000", "kind": "gltf", "status": "rejected", "reason": "not_humanoid"}
    assets = _assets(tmp_path / "assets", extra=[bad, rejected])
    out = tmp_path / "shards"
    args = ["render", "--assets", str(assets), "--out", str(out), "--poses-per-character", "3",
            "--resolution", "128x192", "--workers", "1", "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "6 pairs" in printed and "failures: 1 characters" in printed

    index = json.loads((out / "index.json").read_text())
    assert index["samples"] == 6 and len(index["shards"]) == 2
    assert [f["character"] for f in index["failures"]] == ["mannequin-broken"]
    _check_index_v2(out, index, {"mannequin-adult", "mannequin-child"}, 128, 192)
    assert index["config"]["rejected_characters"] == 1
    assert main(["shards", "verify", str(out)]) == 0

    urls = [str(out / s["path"]) for s in index["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == 6
    assert all({"ref.png", "std.png", "ref_pose.json", "std_pose.json", "meta.json"} <= set(s) for s in samples)
    meta = json.loads(samples[0]["meta.json"])
    assert meta["engine"] == "workbench" and meta["resolution"] == [128, 192]
    assert meta["framing"] in ("full_body", "upper_body", "head") and meta["key"] == samples[0]["__key__"]

    sheet = tmp_path / "sheet.png"
    assert main(["shards", "preview", str(out), "--out", str(sheet)]) == 0
    from PIL import Image

    assert Image.open(sheet).size[0] > 200

    # Same command again: a finished run renders nothing, says so, and writes nothing.
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(args) == 0
    assert "nothing to render" in capsys.readouterr().out
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    # A flipped byte in one shard makes verify fail, naming the shard.
    path = out / index["shards"][0]["path"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert main(["shards", "verify", str(out)]) == 1
    assert index["shards"][0]["path"] in capsys.readouterr().err


def _check_index_v2(out, index: dict, characters: set, width: int, height: int) -> None:
    """Index format 2: the canonical standard pose at the render size, and every character of the
    set with its split and the standard pose its samples carry."""
    from serialgen.dataset.shards import iter_shard
    from serialgen.render.farm.driver import canonical_standard_pose

    assert index["format_version"] == 2
    assert index["standard_pose"] == canonical_standard_pose(width, height)
    assert (index["standard_pose"]["width"], index["standard_pose"]["height"]) == (width, height)
    assert set(index["characters"]) == characters
    seen = set()
    for entry in index["shards"]:
        for key, sample in iter_shard(out / entry["path"]):
            meta = json.loads(sample["meta.json"])
            listed = index["characters"][meta["character"]]
            assert listed["split"] == meta["split"] == entry["split"]
            assert listed["standard_pose"] == json.loads(sample["std_pose.json"]), key
            seen.add(meta["character"])
    assert seen == characters


@pytest.mark.blender
def test_index_characters_and_standard_pose_survive_a_resume(tmp_path):
    """Without Ray (--workers 0): the index's characters come from the jobs, from the journal when
    a run resumes, and from the shards themselves when the journal does not know them."""
    from serialgen.dataset import shards
    from serialgen.render.farm.driver import FarmConfig, run_farm
    from serialgen.render.scene import RenderSettings

    assets = _assets(tmp_path / "assets")
    out = tmp_path / "shards"
    config = FarmConfig(assets=str(assets), out=str(out), settings=RenderSettings(width=64, height=96, threads=1),
                        per_character=2, poses_per_shard=1, workers=0, progress=False)
    assert run_farm(config)["status"] == "complete"
    index = shards.read_index(out)
    _check_index_v2(out, index, {"mannequin-adult", "mannequin-child"}, 64, 96)
    # A run that lost one shard and its index resumes from the journal: one pair rendered again.
    (out / index["shards"][0]["path"]).unlink()
    (out / shards.INDEX_NAME).unlink()
    assert run_farm(config)["pairs_rendered"] == 1
    assert shards.read_index(out)["characters"] == index["characters"]
    # Without the journal every shard is summarised from disk, its standard pose read from it.
    (out / "journal.jsonl").unlink()
    (out / shards.INDEX_NAME).unlink()
    summary = run_farm(config)
    assert summary["pairs_rendered"] == 0 and summary["shards_read_from_disk"] == 4
    assert shards.read_index(out) == index


def test_bad_input_is_one_line_before_any_work(tmp_path, capsys):
    assets = tmp_path / "assets"
    assets.mkdir()
    out = tmp_path / "shards"
    base = ["render", "--assets", str(assets), "--out", str(out), "--no-progress"]
    assert main(base) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "characters.jsonl not found" in err[0]
    (assets / "characters.jsonl").write_text(json.dumps({"id": "x", "status": "rejected"}) + "\n")
    assert main(base) == 2
    assert "no accepted characters" in capsys.readouterr().err
    for bad in (["--resolution", "12x34x5"], ["--resolution", "8x8"], ["--engine", "povray"], ["--width", "64"]):
        with pytest.raises(SystemExit) as exit_:
            main(base + bad)
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert bad[0] in err[-1], err
    # A cluster address nobody answers at: one line at once (Ray itself would retry for minutes).
    import socket

    with socket.socket() as s:  # a free port, closed again: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (assets / "characters.jsonl").write_text(json.dumps({"id": "x", "kind": "mannequin"}) + "\n")
    import numpy as np

    np.savez(assets / "poses.npz", angles=np.zeros((5, 3, 3)))  # the driver checks only the pose count here
    assert main(base + ["--address", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--address 127.0.0.1:{port}: no Ray cluster answers there" in err[0]
    for bad in (["--max-attempts", "0"], ["--job-timeout", "-1"], ["--workers", "0", "--gpus-per-worker", "1"]):
        assert main(base + bad) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not out.exists()  # nothing was started or written


# -- the farm's pure parts (no Ray, no bpy) ---------------------------------------------------------

def _jobs(spec):
    """RenderJobs from {character: number of jobs}."""
    from serialgen.render.job import RenderJob

    return [RenderJob({"id": c}, "", "/out", f"train/{c}-p{i}.tar", "train", 2 * i, 2 * i + 2, 2 * n, 0, "")
            for c, n in spec.items() for i in range(n)]


def test_job_book_affinity_retry_and_quarantine():
    from serialgen.render.farm.schedule import JobBook

    book = JobBook(_jobs({"a": 2, "b": 1, "c": 1}), max_attempts=2)
    first = book.next(None)
    assert first.character["id"] == "a"
    other = book.next(None)  # another worker: a's second job (a is first in order), no affinity needed
    assert other.name == "train/a-p1.tar"
    # a's first job crashes: retried after the fresh work, and a moves behind b and c.
    assert book.failed(first, "died", "SIGKILL", "w0", 1.0) == "retry"
    assert [book.next("b").character["id"], book.next(None).character["id"]] == ["b", "c"]
    assert book.next(None).name == first.name and book.attempt_of(first) == 2
    # Second failure of character a (another of its jobs): quarantined, its queue emptied.
    assert book.failed(other, "timeout", "killed after 9 s", "w1", 9.0) == "quarantined"
    assert "failed 2 times (died x1, timeout x1)" in book.quarantined["a"]["reason"]
    assert book.failed(first, "died", "again", "w0", 1.0) == "dropped"
    assert not book.has_queued() and book.next(None) is None


def test_job_book_bad_input_not_retried_and_lost_not_counted():
    from serialgen.render.farm.schedule import JobBook

    book = JobBook(_jobs({"a": 1, "b": 1}), max_attempts=2)
    a, b = book.next(None), book.next(None)
    assert book.failed(a, "bad_input", "UserInputError: mesh missing") == "quarantined"
    assert book.quarantined["a"]["reason"].startswith("bad input (not retried)")
    for _ in range(5):  # node losses do not count against the asset
        assert book.failed(b, "lost", "node died") == "retry"
        b = book.next(None)
    assert "b" not in book.quarantined
    book.succeeded(b, seconds=4.0, pairs=2)
    assert book.finished() and book.seconds_per_pair() == 2.0


def test_job_timeouts_fixed_and_automatic():
    from serialgen.render.farm.schedule import JobBook

    jobs = _jobs({"a": 2})
    book = JobBook(jobs)
    assert book.timeout_for(jobs[0], fixed=30) == 30
    assert book.timeout_for(jobs[0]) == 600 + 20 * 2  # nothing measured yet: generous
    book.succeeded(book.next(None), seconds=100.0, pairs=2)  # 50 s a pair
    assert book.timeout_for(jobs[1]) == 120 + 10 * 50 * 2


def test_cycles_device_selection_from_device_lists():
    from serialgen.render.farm.gpu import CyclesDevice, parse_pci, select_cycles_devices

    assert parse_pci("CUDA_NVIDIA H100 80GB HBM3_0000:41:00_OptiX") == (0, 0x41, 0)
    assert parse_pci("00000000:C1:00.0") == (0, 0xC1, 0)
    # Blender lists the 4 GPUs of the node (it ignored CUDA_VISIBLE_DEVICES), not in PCI order.
    buses = ["c1", "41", "81", "01"]
    devices = [CyclesDevice("CPU", "CPU", "AMD EPYC")]
    devices += [CyclesDevice("CUDA", f"CUDA_NVIDIA H100_0000:{b}:00", "H100") for b in buses]
    devices += [CyclesDevice("OPTIX", f"CUDA_NVIDIA H100_0000:{b}:00_OptiX", "H100") for b in buses]
    pci = {0: (0, 0x01, 0), 1: (0, 0x41, 0), 2: (0, 0x81, 0), 3: (0, 0xC1, 0)}  # nvidia-smi order
    assert select_cycles_devices(devices, ["2"], pci) == ("OPTIX", ["CUDA_NVIDIA H100_0000:81:00_OptiX"])
    assert select_cycles_devices(devices, [3], pci, backends=("CUDA",)) == ("CUDA", ["CUDA_NVIDIA H100_0000:c1:00"])
    # No nvidia-smi: the PCI order stands in for NVML's.
    assert select_cycles_devices(devices, ["1"], {}) == ("OPTIX", ["CUDA_NVIDIA H100_0000:41:00_OptiX"])
    # CUDA_VISIBLE_DEVICES honoured: only the assigned GPU is listed, whatever its index.
    only = [devices[0], CyclesDevice("CUDA", "CUDA_NVIDIA H100_0000:81:00", "H100")]
    assert select_cycles_devices(only, ["2"], {}) == ("CUDA", ["CUDA_NVIDIA H100_0000:81:00"])
    with pytest.raises(RuntimeError, match="no GPU device"):
        select_cycles_devices(devices[:1], ["0"], {})
    with pytest.raises(RuntimeError, match="no GPU assigned"):
        select_cycles_devices(devices, [], pci)


def test_journal_resume_trusts_sizes_and_skips_torn_lines(tmp_path):
    from serialgen.dataset import shards
    from serialgen.render.farm import journal as farm_journal

    out = tmp_path / "out"
    cfg = {"seed": 0}
    planned = {"train/a.tar": "train", "train/b.tar": "train", "train/c.tar": "train"}
    farm_journal.prepare_out(out, cfg, planned, overwrite=False, retry_quarantined=False)
    journal = farm_journal.Journal(out)
    summaries = {}
    poses = {name: {"width": 8, "height": 8, "names": ["nose"], "keypoints": [[i, 1.5, 1]], "defined": [1]}
             for i, name in enumerate("ab")}
    for name in ("a", "b"):
        with shards.ShardWriter(out, f"train/{name}.tar", "train") as w:
            w.write(f"k{name}", {**{m: b"x" for m in shards.MEMBERS},
                                 "std_pose.json": shards.json_bytes(poses[name])})
            summaries[name] = w.close()
    lost = {"character": "a", "key": "a_p00001_v0", "error": "RuntimeError: boom"}
    journal.shard(summaries["a"], [lost], "a", poses["a"])  # b finished on disk but the driver died before journalling it
    journal.quarantine("c", "failed 3 times")
    journal.close()
    with open(out / farm_journal.JOURNAL_NAME, "a") as f:
        f.write('{"kind": "shard", "path": "train/z.t')  # torn line
    (out / "train" / ".c.tar.tmp").write_bytes(b"half")
    resume = farm_journal.prepare_out(out, cfg, planned, overwrite=False, retry_quarantined=False)
    assert set(resume.keep) == {"train/a.tar", "train/b.tar"} and resume.read_from_disk == 1
    assert resume.keep["train/b.tar"].sha256 == summaries["b"].sha256
    assert resume.sample_failures == [lost]  # a kept shard's failed samples still reach the index
    assert resume.standard_poses == {f"train/{n}.tar": p for n, p in poses.items()}  # a: journal, b: its shard
    assert resume.quarantined == {"c": "failed 3 times"}
    assert not (out / "train" / ".c.tar.tmp").exists()
    assert farm_journal.prepare_out(out, cfg, planned, False, retry_quarantined=True).quarantined == {}
    # Another configuration into the same folder is refused, in one line.
    from serialgen.errors import UserInputError

    with pytest.raises(UserInputError, match="shards of another run"):
        farm_journal.prepare_out(out, {"seed": 1}, planned, overwrite=False, retry_quarantined=False)


def test_code_fingerprint_follows_every_file_that_decides_the_bytes(tmp_path):
    """The fingerprint covers render/** and assets_manifest/** (subpackages included), flatten on
    white and the shard writer; it changes when any of them changes, and only then (a copy of
    those files is edited, never the tree)."""
    import shutil

    from serialgen.render.farm.pool import CODE_FILES, code_files, code_fingerprint

    labels = [label for label, _ in code_files()]
    for label in ("serialgen.render/farm/driver.py", "serialgen.render/job.py",
                  "serialgen.assets_manifest/geometry/standard_form.py", "serialgen.assets_manifest/skeleton.py",
                  "serialgen/imaging.py", "serialgen.dataset/shards.py", "serialgen.dataset/tarset.py"):
        assert label in labels
    assert not any(label.startswith("serialgen/") and label != "serialgen/imaging.py" for label in labels)
    assert "serialgen.dataset/loader.py" not in labels  # reading shards does not decide their bytes

    roots = {}
    for label, path in code_files():
        package, rel = label.split("/", 1)
        roots[package] = tmp_path / package
        (roots[package] / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, roots[package] / rel)
    (roots["serialgen.dataset"] / "loader.py").write_text("# not part of the fingerprint\n")
    assert {package for package, _ in CODE_FILES} == set(roots)
    base = code_fingerprint(roots)
    assert base == code_fingerprint() and len(base) == 16
    (roots["serialgen.dataset"] / "loader.py").write_text("# edited\n")
    assert code_fingerprint(roots) == base
    seen = {base}
    for package, rel in (("serialgen.render", "farm/schedule.py"), ("serialgen.assets_manifest", "geometry/camera.py"),
                         ("serialgen", "imaging.py"), ("serialgen.dataset", "shards.py")):
        with open(roots[package] / rel, "a") as f:
            f.write("\n# edited\n")
        now = code_fingerprint(roots)
        assert now not in seen, f"editing {package}/{rel} left the fingerprint unchanged"
        seen.add(now)

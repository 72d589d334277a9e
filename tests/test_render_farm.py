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
def test_render_end_to_end_with_ray(tmp_path, capfd):
    import webdataset as wds

    bad = {"id": "mannequin-broken", "kind": "mannequin", "variant": "missing", "status": "accepted"}
    rejected = {"id": "char-000000000000", "kind": "gltf", "status": "rejected", "reason": "not_humanoid"}
    assets = _assets(tmp_path / "assets", extra=[bad, rejected])
    out = tmp_path / "shards"
    args = ["render", "--assets", str(assets), "--out", str(out), "--poses-per-character", "3",
            "--resolution", "128x192", "--workers", "1", "--no-progress"]
    assert main(args) == 0
    printed = capfd.readouterr()
    assert "6 pairs" in printed.out and "failures: 1 characters" in printed.out
    # Ray's token notice and the GL driver's EGL lines go to the logs, not the terminal.
    assert "Token authentication" not in printed.err and "EGL Error" not in printed.err, printed.err
    # Ray prints its token notice only when it makes a token (not when one is already on disk), so
    # the log may be empty; it must exist, as the place such lines go.
    assert (out / "logs" / "ray-driver.log").is_file()
    # run.json: what the report needs and the shard folder lacked (code fingerprint, rejections).
    from serialgen.render.farm.pool import code_fingerprint
    from serialgen.render.job import RENDERING_VERSION

    run = json.loads((out / "run.json").read_text())
    assert run["code_fingerprint"] == code_fingerprint() and run["rendering_version"] == RENDERING_VERSION
    assert run["assets"]["rejected_by_reason"] == {"not_humanoid": 1}
    assert [r["id"] for r in run["assets"]["rejected"]] == ["char-000000000000"]

    index = json.loads((out / "index.json").read_text())
    assert index["samples"] == 6 and len(index["shards"]) == 2
    assert [f["character"] for f in index["failures"]] == ["mannequin-broken"]
    _check_index(out, index, {"mannequin-adult", "mannequin-child"}, 128, 192)
    assert index["config"]["rejected_characters"] == 1
    assert main(["shards", "verify", str(out)]) == 0
    # stats.json: the shards' render-time histograms, merged.
    from serialgen.dataset.render_stats import read_stats

    stats = read_stats(out / "stats.json")
    assert stats.samples == 6 and sum(stats.categorical["framing"]["counts"].values()) == 6

    urls = [str(out / s["path"]) for s in index["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == 6
    members = [{k for k in s if not k.startswith("__")} for s in samples]
    assert all(m == {"ref.png", "ref_pose.json", "std_pose.json", "meta.json"} for m in members), members[0]
    # (format 3: std.png once per character, in its standard tar)
    meta = json.loads(samples[0]["meta.json"])
    assert meta["engine"] == "workbench" and meta["resolution"] == [128, 192]
    assert meta["framing"] in ("full_body", "upper_body", "head") and meta["key"] == samples[0]["__key__"]

    sheet = tmp_path / "sheet.png"
    assert main(["shards", "preview", str(out), "--out", str(sheet)]) == 0
    from PIL import Image

    assert Image.open(sheet).size[0] > 200

    # Same command again: a finished run renders nothing, says so, and writes nothing.
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capfd.readouterr()
    assert main(args) == 0
    assert "nothing to render" in capfd.readouterr().out
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    # A flipped byte in one shard makes verify fail, naming the shard.
    path = out / index["shards"][0]["path"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert main(["shards", "verify", str(out)]) == 1
    assert index["shards"][0]["path"] in capfd.readouterr().err


def _check_index(out, index: dict, characters: set, width: int, height: int) -> None:
    """Index format 3: the canonical standard pose at the render size; every character of the set
    with its split, display name, the standard pose its samples carry and its standard tar (one
    sample: std.png, the same std_pose.json, meta.json), listed in standard_shards."""
    from serialgen.dataset.shards import iter_shard, read_standard
    from serialgen.render.farm.driver import canonical_standard_pose

    assert index["format_version"] == 3
    assert index["standard_pose"] == canonical_standard_pose(width, height)
    assert (index["standard_pose"]["width"], index["standard_pose"]["height"]) == (width, height)
    assert set(index["characters"]) == characters
    assert {e["character"]: e["path"] for e in index["standard_shards"]} == {
        c: rec["standard"] for c, rec in index["characters"].items()}
    for cid, rec in index["characters"].items():
        assert json.loads(read_standard(out / rec["standard"], cid)["std_pose.json"]) == rec["standard_pose"]
    seen = set()
    for entry in index["shards"]:
        for key, sample in iter_shard(out / entry["path"]):
            meta = json.loads(sample["meta.json"])
            listed = index["characters"][meta["character"]]
            assert listed["split"] == meta["split"] == entry["split"]
            assert listed["name"] == meta["character"]  # no display_name in these records: the id
            assert listed["standard_pose"] == json.loads(sample["std_pose.json"]), key
            seen.add(meta["character"])
    assert seen == characters


@pytest.mark.blender
def test_index_characters_and_standard_pose_survive_a_resume(tmp_path, capfd):
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
    assert "EGL Error" not in capfd.readouterr().err  # in-process too, Blender's output goes to the logs
    index = shards.read_index(out)
    _check_index(out, index, {"mannequin-adult", "mannequin-child"}, 64, 96)
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
    for bad in (["--max-attempts", "0"], ["--job-timeout", "-1"], ["--workers", "0", "--gpus-per-worker", "1"],
                ["--limit-characters", "0"], ["--limit-characters", "-3"]):
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
    assert first.name == "train/a-p0.tar"
    # Workers without a character spread over characters nobody is on (each loads its character
    # and renders its standard image once); a's second job waits for a free worker or for a.
    assert [book.next(None).name for _ in range(2)] == ["train/b-p0.tar", "train/c-p0.tar"]
    other = book.next(None)  # every character is taken: a's second job
    assert other.name == "train/a-p1.tar"
    # a's first job crashes: retried (there is no fresh work left to go first).
    assert book.failed(first, "died", "SIGKILL", "w0", 1.0) == "retry"
    assert book.next("b").name == first.name and book.attempt_of(first) == 2
    # Second failure of character a (another of its jobs): quarantined, its queue emptied.
    assert book.failed(other, "timeout", "killed after 9 s", "w1", 9.0) == "quarantined"
    assert "failed 2 times (died x1, timeout x1)" in book.quarantined["a"]["reason"]
    assert book.failed(first, "died", "again", "w0", 1.0) == "dropped"
    assert not book.has_queued() and book.next(None) is None
    # A failed job goes after the fresh work, and its character behind the others.
    book = JobBook(_jobs({"a": 2, "b": 1}), max_attempts=3)
    a0 = book.next(None)
    assert book.failed(a0, "error", "boom") == "retry"
    assert [book.next(None).name for _ in range(3)] == ["train/b-p0.tar", "train/a-p1.tar", "train/a-p0.tar"]
    # Affinity: a worker that has a character loaded gets its next job, even if another worker
    # is on it too.
    book = JobBook(_jobs({"a": 3, "b": 1}))
    assert [book.next(None).name, book.next(None).name] == ["train/a-p0.tar", "train/b-p0.tar"]
    assert book.next("a").name == "train/a-p1.tar" and book.next("a").name == "train/a-p2.tar"


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


def _run_record(**config) -> dict:
    from serialgen.render.farm.journal import RUN_FORMAT

    return {"format": RUN_FORMAT, "config": {"seed": 0, "rendering_version": 1, **config}, "rendering_version": 1}


def _small_shard(out, rel, keys, pose=None):
    from serialgen.dataset import shards

    pose = pose or {"width": 8, "height": 8, "names": ["nose"], "keypoints": [[1, 1.5, 1]], "defined": [1]}
    with shards.ShardWriter(out, rel, rel.split("/")[0]) as w:
        for key in keys:
            w.write(key, {**{m: b"x" for m in shards.MEMBERS}, "std_pose.json": shards.json_bytes(pose)})
        return w.close()


def test_journal_resume_checks_every_kept_shard_and_skips_torn_lines(tmp_path):
    """A re-run keeps a journalled shard whose size and member list match the journal, and one the
    journal does not know when it holds exactly its job's samples; anything else is damaged (to be
    rendered again), never fatal. Quarantines, failed samples and standard poses survive."""
    import numpy as np

    from serialgen.dataset import shards
    from serialgen.render.farm import journal as farm_journal
    from serialgen.render.farm.journal import PlannedShard

    out = tmp_path / "out"
    run = _run_record()
    plan = {f"train/{n}.tar": PlannedShard("train", n, (f"{n}_p00000_v0", f"{n}_p00001_v0"))
            for n in ("a", "b", "c", "d", "e", "f")}
    farm_journal.prepare_out(out, run, plan, overwrite=False, retry_quarantined=False)
    journal = farm_journal.Journal(out)
    poses = {n: {"width": 8, "height": 8, "names": ["nose"], "keypoints": [[i, 1.5, 1]], "defined": [1]}
             for i, n in enumerate("abcdef")}
    summaries, standards = {}, {}
    for n in "abdef":
        keys = plan[f"train/{n}.tar"].keys
        summaries[n] = _small_shard(out, f"train/{n}.tar", keys[:1] if n == "e" else keys, poses[n])
        # format 3: the job whose range starts at 0 also writes the character's standard tar
        standards[n] = shards.write_standard(out, "train", n, shards.encode_png(np.zeros((8, 8, 3), np.uint8)),
                                             poses[n], {})
    members = {n: farm_journal.member_digest(out / f"train/{n}.tar") for n in "abdf"}
    lost = {"character": "a", "key": "a_p00002_v0", "error": "RuntimeError: boom"}
    plan["train/a.tar"] = PlannedShard("train", "a", plan["train/a.tar"].keys + ("a_p00002_v0",))
    journal.shard(summaries["a"], [lost], "a", poses["a"], members["a"], standard=standards["a"],
                  standard_members=farm_journal.member_digest(out / standards["a"].path))
    journal.shard(summaries["d"], [], "d", poses["d"], members["d"])
    journal.shard(summaries["f"], [], "f", poses["f"], members["f"], standard=standards["f"])
    (out / standards["f"].path).unlink()  # f's pairs are whole, its standard is gone: f's job runs again
    # b finished on disk but the driver died before journalling it; e was cut short (1 of 2 samples)
    journal.quarantine("c", "failed 3 times")
    journal.close()
    with open(out / farm_journal.JOURNAL_NAME, "a") as f:
        f.write('{"kind": "shard", "path": "train/z.t')  # torn line
    (out / "train" / ".c.tar.tmp").write_bytes(b"half")
    d = out / "train" / "d.tar"
    d.write_bytes(d.read_bytes()[:-2048])  # cut inside its end-of-archive blocks: same members, other size

    resume = farm_journal.prepare_out(out, run, plan, overwrite=False, retry_quarantined=False)
    assert set(resume.keep) == {"train/a.tar", "train/b.tar"} and resume.read_from_disk == 1
    assert resume.keep["train/b.tar"].sha256 == summaries["b"].sha256
    assert set(resume.damaged) == {"train/d.tar", "train/e.tar", "train/f.tar"}
    assert "the journal says" in resume.damaged["train/d.tar"] and "1 missing" in resume.damaged["train/e.tar"]
    assert "standard tar" in resume.damaged["train/f.tar"]
    assert resume.standards == {"a": standards["a"], "b": standards["b"]}  # a: journal, b: read from disk
    assert not d.exists() and not (out / "train" / "e.tar").exists()  # deleted: rendered again
    assert resume.sample_failures == [lost]  # a kept shard's failed samples still reach the index
    assert resume.standard_poses == {f"train/{n}.tar": poses[n] for n in "ab"}  # a: journal, b: its shard
    assert resume.quarantined == {"c": "failed 3 times"}
    assert not (out / "train" / ".c.tar.tmp").exists()
    # b, adopted from disk, is journalled now: the next re-run checks it from the headers.
    state = farm_journal.Journal(out).read()
    assert state.lines["train/b.tar"]["members_sha256"] == farm_journal.member_digest(out / "train/b.tar")[1]
    again = farm_journal.inspect_out(out, run, plan, overwrite=False, retry_quarantined=True)
    assert again.quarantined == {} and again.read_from_disk == 0 and set(again.keep) == set(resume.keep)


def test_a_rerun_with_other_settings_or_rendering_version_is_refused_naming_the_difference(tmp_path):
    from serialgen.errors import UserInputError
    from serialgen.render.farm import journal as farm_journal
    from serialgen.render.farm.journal import PlannedShard

    out = tmp_path / "out"
    plan = {"train/a.tar": PlannedShard("train", "a", ("a_p00000_v0",))}
    run = _run_record(settings={"width": 128, "engine": "workbench"})
    farm_journal.prepare_out(out, run, plan, overwrite=False, retry_quarantined=False)
    _small_shard(out, "train/a.tar", plan["train/a.tar"].keys)
    other = _run_record(seed=1, settings={"width": 256, "engine": "workbench"})
    with pytest.raises(UserInputError) as err:
        farm_journal.inspect_out(out, other, plan, overwrite=False, retry_quarantined=False)
    assert "seed: 0 -> 1" in str(err.value) and "settings.width: 128 -> 256" in str(err.value)
    assert "\n" not in str(err.value)
    newer = {**run, "config": {**run["config"], "rendering_version": 2}, "rendering_version": 2}
    with pytest.raises(UserInputError, match="rendered with rendering version 1, this code renders version 2"):
        farm_journal.inspect_out(out, newer, plan, overwrite=False, retry_quarantined=False)
    # A run.json of the first format (the bare config, before rendering versions were recorded).
    (out / farm_journal.RUN_NAME).write_text(json.dumps({k: v for k, v in run["config"].items()
                                                        if k != "rendering_version"}))
    assert farm_journal.read_run(out)["rendering_version"] is None
    with pytest.raises(UserInputError, match="rendering version older than run.json records, this code renders version 2"):
        farm_journal.inspect_out(out, newer, plan, overwrite=False, retry_quarantined=False)
    # --overwrite: everything goes, the new record is written.
    resume = farm_journal.prepare_out(out, newer, plan, overwrite=True, retry_quarantined=False)
    assert resume.fresh and not (out / "train" / "a.tar").exists()
    assert farm_journal.read_run(out)["rendering_version"] == 2


def test_recorded_splits_win_over_the_split_rule(tmp_path):
    from serialgen.render.farm import journal as farm_journal
    from serialgen.dataset.shards import assign_splits

    out = tmp_path / "out"
    out.mkdir()
    (out / farm_journal.RUN_NAME).write_text(json.dumps({**_run_record(), "splits": {"a": "test", "b": "train"}}))
    with open(out / farm_journal.JOURNAL_NAME, "w") as f:
        f.write(json.dumps({"kind": "header", "format": farm_journal.JOURNAL_FORMAT}) + "\n")
        f.write(json.dumps({"kind": "shard", "path": "train/c.tar", "split": "train", "samples": 1, "bytes": 1,
                            "sha256": "0", "character": "c"}) + "\n")
    recorded = farm_journal.recorded_splits(out)
    assert recorded == {"a": "test", "b": "train", "c": "train"}
    ids = ["a", "b", "c"] + [f"new{i}" for i in range(20)]
    splits = assign_splits(ids, 0.2, recorded)
    assert {c: splits[c] for c in "abc"} == recorded
    assert set(splits) == set(ids) and set(splits.values()) <= {"train", "test"}


def test_a_job_result_missing_planned_samples_lists_them_as_failures(tmp_path):
    """A job's shard holds exactly its planned samples, or the missing ones are failures."""
    from serialgen.dataset import shards
    from serialgen.render.farm.driver import _Driver
    from serialgen.render.farm.journal import Journal, PlannedShard, Resume
    from serialgen.render.farm.report import Progress
    from serialgen.render.farm.schedule import JobBook
    from serialgen.render.job import RenderJob

    keys = ("a_p00000_v0", "a_p00001_v0", "a_p00002_v0")
    job = RenderJob({"id": "a"}, "", str(tmp_path), "train/a.tar", "train", 0, 3, 3, 0, "")
    book = JobBook([job])
    assert book.next(None) is job
    driver = _Driver(book, Journal(tmp_path), Progress(3, 1, 0, enabled=False),
                     {job.shard: PlannedShard("train", "a", keys)}, Resume(), {"a": "A"})
    summary = shards.ShardSummary(job.shard, "train", 1, 10, "0" * 64, [keys[0]])
    failed = {"character": "a", "key": keys[1], "error": "RuntimeError: x"}
    driver.job_result("w0", job, {"status": "ok", "shard": summary.to_json(with_keys=True), "pairs": 1,
                                  "failures": [failed], "standard_pose": None, "timings_s": {}}, 1.0)
    assert [f["key"] for f in driver.sample_failures] == [keys[1], keys[2]]
    assert "missing from the shard" in driver.sample_failures[1]["error"]
    line = Journal(tmp_path).read().lines[job.shard]
    assert line["samples"] + len(line["failures"]) == len(keys)
    # A shard with a sample its job does not plan fails the job (and is retried).
    job2 = RenderJob({"id": "b"}, "", str(tmp_path), "train/b.tar", "train", 0, 1, 1, 0, "")
    book2 = JobBook([job2], max_attempts=2)
    book2.next(None)
    driver2 = _Driver(book2, Journal(tmp_path), Progress(1, 1, 0, enabled=False),
                      {job2.shard: PlannedShard("train", "b", ("b_p00000_v0",))}, Resume(), {})
    other = shards.ShardSummary(job2.shard, "train", 1, 10, "0" * 64, ["b_p00009_v0"])
    driver2.job_result("w0", job2, {"status": "ok", "shard": other.to_json(with_keys=True), "pairs": 1,
                                    "failures": [], "standard_pose": None, "timings_s": {}}, 1.0)
    assert book2.failures[0].kind == "error" and "does not plan" in book2.failures[0].error
    assert job2.shard not in driver2.summaries


def test_progress_moves_per_pair_and_takes_back_a_failed_attempt(capfd):
    from serialgen.render.farm.report import Progress

    progress = Progress(6, 2, 0, enabled=True)
    progress.job_progress("a", 1)
    progress.job_progress("a", 2)
    assert progress.bar.n == 2 and progress.shards_done == 0  # before any shard finished
    progress.job_progress("a", 1)  # a late, older report changes nothing
    assert progress.bar.n == 2
    progress.job_failed("a")  # the attempt died: its pairs will be rendered again
    assert progress.bar.n == 0
    progress.job_progress("a", 3)
    progress.job_done("a", 3)
    progress.job_done("b", 3)  # a job that never reported moves the bar by its plan
    assert progress.bar.n == 6 and progress.shards_done == 2
    progress.close()
    assert "6/6" in capfd.readouterr().err


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


def test_stats_json_merges_every_shards_histograms_or_is_left_out():
    from serialgen.dataset.render_stats import Histograms
    from serialgen.render.farm.driver import merged_stats

    a, b = Histograms(), Histograms()
    a.add({"framing": "head", "azimuth": 10.0})
    b.add({"framing": "full_body", "azimuth": 200.0})
    b.add({"framing": "head", "azimuth": 30.0})
    stats = {"train/a.tar": a.to_json(), "test/b.tar": b.to_json()}
    merged = Histograms.from_json(merged_stats(["train/a.tar", "test/b.tar"], stats))
    assert merged.samples == 3 and merged.categorical["framing"]["counts"] == {"full_body": 1, "head": 2}
    assert merged_stats(["test/b.tar", "train/a.tar"], stats) == merged.to_json()  # order does not matter
    # A shard rendered without stats (older code): no stats.json; the report samples the shards.
    assert merged_stats(["train/a.tar", "train/old.tar"], stats) is None


def test_render_command_defaults_are_the_renderers_own():
    """`serialgen render` with no rendering flags renders with RenderSettings() (a folder made by
    run_farm with the defaults is the same run as the command's, not "other settings")."""
    from dataclasses import replace

    from serialgen.cli import build_parser
    from serialgen.render.scene import RenderSettings

    args = build_parser().parse_args(["render", "--assets", "a", "--out", "o"])
    ours = RenderSettings(engine=args.engine, width=args.resolution[0], height=args.resolution[1], threads=0,
                          cycles_samples=args.samples, cycles_denoise=args.denoise, cycles_device=args.cycles_device,
                          eevee_samples=args.samples, supersample=args.supersample)
    assert ours == replace(RenderSettings(), threads=0)

"""Damaged shards on disk and what a re-run of `serialgen render` does with them (issue 12, items 1-2).

Every case is generated here: 2 procedural characters x 3 poses at 128x192 rendered once (the
reference, in-process: ``--workers 0``), copied, damaged, and the same command run again. What must
hold after every re-run: exit 0, no traceback, every planned sample exactly once in the index (0 lost,
0 duplicated), the shards byte-identical to the reference, ``shards verify`` OK, and the damaged
shard named in report.json with the reason. Cases:

* a train shard cut exactly at a member boundary (before its 6th tar member) — before: kept with 1
  sample, index rewritten with the smaller count, nothing said;
* cut in the middle of a member — before: a traceback from the shard summary, and index.json deleted;
* the driver killed while the damaged shard is rendered again: the old index.json is still there;
* one byte of a member's data flipped (same size, same member list): the cheap check cannot see it,
  ``--repair`` (sha256 of every kept shard) does;
* one byte of a tar header flipped (same size): the member list from the headers differs;
* the character's standard tar (format 3) cut: its job, the one whose range starts at 0, runs again;
* a damaged shard the journal does not know (journal and index lost): read whole, not kept;
* a damaged index.json: rewritten from the journal;
* a folder rendered with another rendering version: refused in one line (exit 2); ``--overwrite``
  renders it again.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from serialgen.cli import main

from farm_fixtures import SERIALGEN, build_characters, character_record, write_assets

pytestmark = [pytest.mark.blender, pytest.mark.slow]

CHARS = ("proc-000001", "proc-000002")
PER_CHAR = 3


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_characters(tmp_path_factory.mktemp("built"), CHARS)


@pytest.fixture(scope="module")
def assets(built, tmp_path_factory):
    meshes, poses = built
    return write_assets(tmp_path_factory.mktemp("assets"), meshes, poses, [character_record(c) for c in CHARS])


def _args(assets: Path, out: Path, *extra) -> list[str]:
    return ["render", "--assets", str(assets), "--out", str(out), "--poses-per-character", str(PER_CHAR),
            "--resolution", "128x192", "--workers", "0", "--no-progress", *extra]


def _tars(out: Path) -> dict[str, bytes]:
    """{path: bytes} of every pair shard and standard tar (<split>/standard/*.tar)."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for s in ("train", "test") for p in (out / s).rglob("*.tar")}


def _indexed_keys(out: Path) -> list[str]:
    from serialgen.dataset.shards import iter_shard

    index = json.loads((out / "index.json").read_text())
    return [k for s in index["shards"] for k, _ in iter_shard(out / s["path"])]


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """The clean run: (folder, {shard: bytes}, every planned key)."""
    out = tmp_path_factory.mktemp("ref") / "shards"
    assert main(_args(assets, out)) == 0
    keys = _indexed_keys(out)
    assert len(keys) == len(CHARS) * PER_CHAR
    return out, _tars(out), sorted(keys)


@pytest.fixture
def damaged_copy(reference, tmp_path):
    """A copy of the reference folder and its first train shard (path relative to the folder)."""
    ref_out, ref_tars, _ = reference
    out = tmp_path / "shards"
    shutil.copytree(ref_out, out)
    train = sorted(p for p in ref_tars if p.startswith("train/") and "/standard/" not in p)
    assert train, "the reference has no train shard"
    return out, train[0]


def _members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def _assert_repaired(out: Path, reference, rel: str, why: str) -> dict:
    """The re-run's promises; returns report.json."""
    _, ref_tars, ref_keys = reference
    keys = _indexed_keys(out)
    lost, duplicated = len(set(ref_keys) - set(keys)), len(keys) - len(set(keys))
    assert (lost, duplicated) == (0, 0), f"{lost} samples lost, {duplicated} duplicated"
    assert _tars(out) == ref_tars  # rendered again: the same bytes
    index = json.loads((out / "index.json").read_text())
    assert index["samples"] == len(ref_keys) and index["failures"] == []
    assert main(["shards", "verify", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "complete" and report["pairs_rendered"] == PER_CHAR
    assert list(report["damaged"]) == [rel] and why in report["damaged"][rel], report["damaged"]
    return report


def test_a_shard_cut_at_a_member_boundary_is_rendered_again(assets, reference, damaged_copy, capsys):
    out, rel = damaged_copy
    path = out / rel
    path.write_bytes(path.read_bytes()[:_members(path)[5].offset])  # before its 6th member: 1 whole sample
    capsys.readouterr()
    assert main(_args(assets, out)) == 0
    printed = capsys.readouterr().out
    assert "damaged shards rendered again: 1" in printed and rel in printed
    _assert_repaired(out, reference, rel, "the journal says")


def test_a_shard_cut_inside_a_member_is_rendered_again_without_a_traceback(assets, reference, damaged_copy, capfd):
    out, rel = damaged_copy
    path = out / rel
    m = _members(path)[5]
    path.write_bytes(path.read_bytes()[:m.offset_data + m.size // 2])
    assert main(_args(assets, out)) == 0
    assert "Traceback" not in capfd.readouterr().err
    _assert_repaired(out, reference, rel, "the journal says")


def test_the_old_index_stays_until_the_new_one_is_written(built, assets, reference, damaged_copy, tmp_path):
    """The driver is killed (SIGKILL, no clean-up) while it renders the damaged shard again: the
    finished set's index.json is still there, byte for byte; the next run completes the set."""
    out, rel = damaged_copy
    path = out / rel
    path.write_bytes(path.read_bytes()[:_members(path)[5].offset])
    old_index = (out / "index.json").read_bytes()
    char = json.loads((out / "journal.jsonl").read_text().splitlines()[1])["character"]
    meshes, poses = built
    # The same characters (same plan, same bytes); the damaged one's job sleeps 2 s a sample here.
    slow = write_assets(tmp_path / "slow-assets", meshes, poses,
                         [character_record(c, **({"fault": "slow:2"} if rel.startswith(f"train/{c}") else {})) for c in CHARS])
    proc = subprocess.Popen(SERIALGEN + _args(slow, out), env={**os.environ, "SERIALGEN_FAULT_INJECTION": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    log = out / "logs" / (rel[:-len(".tar")] + ".log")
    try:
        end = time.monotonic() + 120
        while time.monotonic() < end and "sample 1/" not in (log.read_text().split("== ok")[-1] if log.is_file() else ""):
            time.sleep(0.1)
        assert "sample 1/" in log.read_text().split("== ok")[-1], f"the re-render of {rel} ({char}) did not start"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert (out / "index.json").read_bytes() == old_index
    assert main(_args(assets, out)) == 0
    keys = _indexed_keys(out)
    assert sorted(keys) == reference[2] and _tars(out) == reference[1]


def test_flipped_data_with_the_same_size_is_caught_by_repair(assets, reference, damaged_copy, capsys):
    out, rel = damaged_copy
    path = out / rel
    m = next(m for m in _members(path) if m.name.endswith("ref.png"))
    data = bytearray(path.read_bytes())
    data[m.offset_data + m.size // 2] ^= 0x55
    path.write_bytes(bytes(data))
    capsys.readouterr()
    # The cheap check (size, member list) cannot see it: nothing to render, nothing written.
    assert main(_args(assets, out)) == 0
    assert "nothing to render" in capsys.readouterr().out
    assert main(["shards", "verify", str(out)]) == 1
    assert main(_args(assets, out, "--repair")) == 0
    _assert_repaired(out, reference, rel, "sha256")


def test_a_flipped_header_byte_with_the_same_size_is_caught_from_the_headers(assets, reference, damaged_copy):
    out, rel = damaged_copy
    path = out / rel
    data = bytearray(path.read_bytes())
    data[_members(path)[2].offset + 3] ^= 0x01  # a letter of the 3rd member's name: its header checksum fails
    path.write_bytes(bytes(data))
    assert main(_args(assets, out)) == 0
    _assert_repaired(out, reference, rel, "")


def test_a_damaged_shard_the_journal_does_not_know_is_not_kept(assets, reference, damaged_copy):
    out, rel = damaged_copy
    (out / "journal.jsonl").unlink()
    (out / "index.json").unlink()
    path = out / rel
    path.write_bytes(path.read_bytes()[:_members(path)[5].offset])
    assert main(_args(assets, out)) == 0
    # read whole: the tar ends after its first sample (the reader's words for it may vary)
    report = _assert_repaired(out, reference, rel, "")
    pair_shards = [p for p in reference[1] if "/standard/" not in p]
    assert report["shards_read_from_disk"] == len(pair_shards) - 1  # the whole ones, adopted


def test_a_damaged_standard_tar_is_written_again(assets, reference, damaged_copy):
    """Format 3: a character's standard image lives in one standard tar, written by its job whose
    range starts at 0. Cut it, and that job runs again (the pairs it wrote are rewritten too)."""
    out, rel = damaged_copy
    std = next(p for p in reference[1] if p.startswith("train/standard/"))
    path = out / std
    m = _members(path)[0]
    path.write_bytes(path.read_bytes()[:m.offset_data + m.size // 2])
    assert main(_args(assets, out)) == 0
    _assert_repaired(out, reference, rel, "standard tar")


def test_a_damaged_index_is_written_again(assets, reference, damaged_copy, capsys):
    out, _ = damaged_copy
    (out / "index.json").write_text('{"format": "serialgen.shards", "format_ver')
    assert main(_args(assets, out)) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "complete" and report["pairs_rendered"] == 0
    assert sorted(_indexed_keys(out)) == reference[2] and _tars(out) == reference[1]
    assert main(["shards", "verify", str(out)]) == 0


def test_another_rendering_version_is_refused_in_one_line_unless_overwrite(assets, reference, damaged_copy, capsys):
    out, _ = damaged_copy
    run = json.loads((out / "run.json").read_text())
    old = run["rendering_version"] - 1
    run["rendering_version"] = run["config"]["rendering_version"] = old
    (out / "run.json").write_text(json.dumps(run))
    before = _tars(out)
    capsys.readouterr()
    assert main(_args(assets, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"rendered with rendering version {old}, this code renders version {old + 1}" in err[0]
    assert "--overwrite" in err[0] and _tars(out) == before
    assert main(_args(assets, out, "--overwrite")) == 0
    assert _tars(out) == reference[1]
    assert json.loads((out / "run.json").read_text())["rendering_version"] == old + 1

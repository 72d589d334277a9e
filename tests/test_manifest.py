"""Manifests: JSONL round trip, validation errors name file:line, incremental re-scan, report, paths."""

import json
import os

import pytest

from serialgen.assets_manifest import manifest as mf
from serialgen.errors import UserInputError


def _rec(i, **kw):
    return mf.make_record("background", f"bg-{i}", "user", path=f"/data/{i}.png", sha256="ab" * 32,
                          stats={"w": i}, width=640, height=480, **kw)


def test_round_trip(tmp_path):
    recs = [_rec(1), mf.reject(_rec(2), "image_too_small", "100x80"), _rec(3, generator={"seed": 7, "ü": [1, 2]})]
    path = mf.write_jsonl(tmp_path / "backgrounds.jsonl", recs)
    assert mf.read_jsonl(path, "background") == recs
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3 and json.loads(lines[1])["reason"] == "image_too_small"
    assert all(json.loads(x)["schema"] == "serialgen.background/1" for x in lines)
    assert not (tmp_path / "backgrounds.jsonl.tmp").exists()


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.pop("sha256"), "missing field"),
    (lambda r: r.update(schema="serialgen.background/2"), "unsupported"),
    (lambda r: r.update(schema="other/1"), "unknown schema"),
    (lambda r: r.update(status="maybe"), "status"),
    (lambda r: r.update(status="rejected", reason="Bad Reason"), "snake_case"),
    (lambda r: r.update(reason="duplicate"), "accepted record has reason null"),
    (lambda r: r.update(id="../etc"), "invalid asset id"),
])
def test_invalid_records_name_the_line(tmp_path, edit, message):
    good, bad = _rec(1), _rec(2)
    edit(bad)
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(UserInputError, match=f"m.jsonl:3: .*{message}"):
        mf.read_jsonl(path)


def test_bad_json_kind_mismatch_and_previous(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text("{not json\n")
    with pytest.raises(UserInputError, match="m.jsonl:1: invalid JSON"):
        mf.read_jsonl(path)
    assert mf.read_previous(path, "background") == []  # a broken earlier build just means no reuse
    mf.write_jsonl(path, [_rec(1)])
    with pytest.raises(UserInputError, match="expected a character record"):
        mf.read_jsonl(path, "character")
    with pytest.raises(UserInputError, match="not found"):
        mf.read_jsonl(tmp_path / "none.jsonl")


def test_paths_are_sanitised(tmp_path):
    (tmp_path / "a").mkdir()
    assert mf.safe_relpath(tmp_path / "a" / "x.png", tmp_path) == "a/x.png"
    with pytest.raises(UserInputError):
        mf.safe_relpath(tmp_path.parent / "x.png", tmp_path)
    assert mf.resolve_record_path(tmp_path, "a/x.png") == tmp_path.resolve() / "a" / "x.png"
    assert mf.resolve_record_path(tmp_path, "/abs/x.png").is_absolute()
    for bad in ("../x.png", "a/../../x.png", "a\\x.png", "", "a\x00b"):
        with pytest.raises(UserInputError):
            mf.resolve_record_path(tmp_path, bad)


def test_incremental_scan_reuses_unchanged_files(tmp_path):
    files = []
    for i in range(3):
        f = tmp_path / f"f{i}.bin"
        f.write_bytes(bytes([i]) * 100)
        files.append(f)
    calls = []

    def process(path, sha):
        calls.append(path.name)
        if path.name == "f2.bin":
            raise RuntimeError("importer crashed")
        return mf.make_record("background", f"x-{sha[:8]}", "user", path=str(path), sha256=sha)

    def on_error(path, sha, exc):
        return mf.make_record("background", f"x-{sha[:8]}", "user", status="rejected", reason="import_failed",
                              detail=str(exc), path=str(path), sha256=sha)

    recs, counts = mf.incremental_scan(files, [], process, on_error=on_error)
    assert counts == {"reused": 0, "processed": 3} and calls == ["f0.bin", "f1.bin", "f2.bin"]
    assert recs[2]["reason"] == "import_failed" and recs[0]["stats"]["file_size"] == 100
    mf.write_jsonl(tmp_path / "m.jsonl", recs)
    previous = mf.read_jsonl(tmp_path / "m.jsonl")

    calls.clear()
    # f0 untouched; f1 touched (new mtime, same bytes); f2 changed content.
    st = os.stat(files[1])
    os.utime(files[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    files[2].write_bytes(b"new content")
    recs2, counts2 = mf.incremental_scan(files, previous, process, on_error=on_error)
    assert calls == ["f2.bin"] and counts2 == {"reused": 2, "processed": 1}
    assert recs2[1]["stats"]["mtime_ns"] == os.stat(files[1]).st_mtime_ns  # fingerprint refreshed
    assert recs2[0] == previous[0]


def test_report_counts(tmp_path):
    recs = [_rec(1), mf.reject(_rec(2), "duplicate", "x"), mf.reject(_rec(3), "duplicate", "y"),
            mf.reject(_rec(4), "unreadable_image", "z")]
    path = mf.write_report(tmp_path, {"backgrounds": recs, "characters": []}, poses={"n": 5})
    rep = mf.read_report(path)
    b = rep["manifests"]["backgrounds"]
    assert b["total"] == 4 and b["by_status"] == {"accepted": 1, "rejected": 3}
    assert b["by_reason"] == {"duplicate": 2, "unreadable_image": 1}
    assert b["by_kind"] == {"user": {"accepted": 1, "rejected": 3}}
    assert rep["poses"] == {"n": 5} and rep["manifests"]["characters"]["total"] == 0

"""Hostile and damaged shards, generated here (no binary blobs): tar members named ``../../x`` or
``/abs/x`` (also through pax and GNU long-name headers), symlink, hardlink, FIFO, device and
directory members, keys that are not ``[A-Za-z0-9_-]{1,90}``, repeated members and keys, members
over the size cap, and tars cut inside a member, at a member boundary or with a damaged header.

Every case goes through every reader of render-pair shards: the format layer's reader
(``tarset.read_samples``), the training loader (skipped and counted by reason, shard and key),
``serialgen shards preview``, ``serialgen data preview`` and ``serialgen shards verify``; the
whole samples around the bad one are kept, and nothing is ever written outside (readers only read).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from serialgen.cli import main as cli_main
from serialgen.dataset import shards as S
from serialgen.dataset import tarset as T
from serialgen.dataset.loader import LoaderConfig, RenderPairDataset
from test_loader_synth import synth_pair

SIZE = (64, 96)


def sample(character: int, pose: int, key: str) -> dict[str, bytes]:
    """A whole render-pair sample (small synthetic images) under ``key``."""
    return synth_pair(character, pose, size=SIZE, key=key)


def add(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, **extra) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.type = (len(data) if kind == tarfile.REGTYPE else 0), 0, 0o644, kind
    for k, v in extra.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def add_sample(tar: tarfile.TarFile, key: str, members: dict[str, bytes], prefix: str = "") -> None:
    for m in S.MEMBERS:
        add(tar, f"{prefix}{key}.{m}", members[m])


def shard_bytes(build, fmt=tarfile.USTAR_FORMAT) -> bytes:
    """A shard: a good sample ``good_a``, whatever ``build(tar)`` adds, a good sample ``good_b``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        add_sample(tar, "good_a", sample(1, 0, "good_a"))
        build(tar)
        add_sample(tar, "good_b", sample(1, 1, "good_b"))
    return buf.getvalue()


def evil(key: str, kind=tarfile.REGTYPE, member: str = "ref.png", **extra):
    """A builder adding sample ``key`` whose ``member`` is of ``kind`` (the rest regular)."""
    def build(tar):
        members = sample(2, 0, "x")
        for m in S.MEMBERS:
            if m == member:
                add(tar, f"{key}.{m}", members[m] if kind == tarfile.REGTYPE else b"", kind, **extra)
            else:
                add(tar, f"{key}.{m}", members[m])
    return build


def dotdot(tar):
    add_sample(tar, "x", sample(2, 0, "x"), prefix="../../")


def absolute(tar):
    add_sample(tar, "x", sample(2, 0, "x"), prefix="/abs/")


def repeated_member(tar):
    members = sample(2, 0, "dup")
    add_sample(tar, "dup", members)
    add(tar, "dup.ref.png", members["ref.png"])


def split_key(tar):
    add_sample(tar, "again", sample(2, 0, "again"))
    add_sample(tar, "between", sample(2, 1, "between"))
    add(tar, "again.ref.png", sample(2, 0, "again")["ref.png"])


def pax_dotdot(tar):  # the real name lives in a pax header, the ustar name looks harmless
    members = sample(2, 0, "x")
    for m in S.MEMBERS:
        info = tarfile.TarInfo(f"x.{m}")
        info.size = len(members[m])
        info.pax_headers = {"path": f"../pax/x.{m}"}
        tar.addfile(info, io.BytesIO(members[m]))


def gnu_long_dotdot(tar):
    add_sample(tar, "x", sample(2, 0, "x"), prefix="../" + "d" * 120 + "/")


# (case, builder, tar format, expected reason, the refused key)
MEMBER_CASES = [
    ("dotdot_name", dotdot, tarfile.USTAR_FORMAT, T.REJECT_UNSAFE_NAME, "../../x"),
    ("absolute_name", absolute, tarfile.USTAR_FORMAT, T.REJECT_UNSAFE_NAME, "/abs/x"),
    ("pax_dotdot_name", pax_dotdot, tarfile.PAX_FORMAT, T.REJECT_UNSAFE_NAME, "../pax/x"),
    ("gnu_long_dotdot_name", gnu_long_dotdot, tarfile.GNU_FORMAT, T.REJECT_UNSAFE_NAME, "../" + "d" * 120 + "/x"),
    ("symlink", evil("lnk", tarfile.SYMTYPE, linkname="/etc/passwd"), tarfile.USTAR_FORMAT, T.REJECT_LINK, "lnk"),
    ("symlink_outside", evil("lnk", tarfile.SYMTYPE, linkname="../../../../outside.png"), tarfile.USTAR_FORMAT,
     T.REJECT_LINK, "lnk"),
    ("hardlink", evil("hard", tarfile.LNKTYPE, member="ref_pose.json", linkname="good_a.ref_pose.json"),
     tarfile.USTAR_FORMAT,
     T.REJECT_LINK, "hard"),
    ("fifo", evil("fifo", tarfile.FIFOTYPE), tarfile.USTAR_FORMAT, T.REJECT_SPECIAL, "fifo"),
    ("char_device", evil("dev", tarfile.CHRTYPE, devmajor=1, devminor=3), tarfile.USTAR_FORMAT, T.REJECT_SPECIAL, "dev"),
    ("directory", evil("dir", tarfile.DIRTYPE), tarfile.USTAR_FORMAT, T.REJECT_SPECIAL, "dir"),
    ("key_with_space", evil("bad key"), tarfile.USTAR_FORMAT, T.REJECT_KEY, "bad key"),
    ("key_too_long", evil("k" * 91, member="meta.json"), tarfile.GNU_FORMAT, T.REJECT_KEY, "k" * 91),
    ("key_not_ascii", evil("caf\u00e9"), tarfile.PAX_FORMAT, T.REJECT_KEY, "caf\u00e9"),
    ("key_in_a_folder", evil("sub/k"), tarfile.USTAR_FORMAT, T.REJECT_KEY, "sub/k"),
    ("repeated_member", repeated_member, tarfile.USTAR_FORMAT, T.REJECT_DUPLICATE_MEMBER, "dup"),
    ("key_split_by_another", split_key, tarfile.USTAR_FORMAT, T.REJECT_DUPLICATE_KEY, "again"),
]


def write_set(root: Path, data: bytes, name: str = "hostile.tar") -> Path:
    """A format 3 set of one pair shard (``data``) and the standards of characters 1 and 2, whose
    index lists the shard with its true size and sha256 (as if it had been written so: the readers
    must not trust a shard because its checksum matches)."""
    path = root / "train" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    sha, size = T.sha256_file(path)
    standards, characters = [], {}
    for c in (1, 2):
        m = synth_pair(c, 0, size=SIZE)
        pose = json.loads(m["std_pose.json"])
        standards.append(S.write_standard(root, "train", f"synth{c:04d}", m["std.png"], pose, {}))
        characters[f"synth{c:04d}"] = {"split": "train", "standard_pose": pose}
    S.write_index(root, [S.ShardSummary(f"train/{name}", "train", 2, size, sha)], {"synthetic": True}, [],
                  characters=characters, standards=standards)
    return path


def reader_result(data: bytes, **kw) -> tuple[list[str], list[T.Rejected]]:
    keys, rejected = [], []
    for got in T.read_samples(io.BytesIO(data), **kw):
        if isinstance(got, T.Rejected):
            rejected.append(got)
        else:
            keys.append(got[0])
    return keys, rejected


def loader_stats(root: Path, **cfg):
    ds = RenderPairDataset(str(root), None, LoaderConfig(resolution=SIZE, shuffle_buffer=0, dtype="uint8",
                                                         std_pose="per_character", **cfg))
    keys = [s["__key__"] for s in ds]
    return keys, ds.stats


def outside_untouched(tmp_path: Path) -> None:
    """Nothing a hostile name points at was created by reading (the readers write nothing)."""
    for p in ("x.ref.png", "abs/x.ref.png", "pax/x.ref.png", "outside.png"):
        assert not (tmp_path.parent / p).exists() and not (tmp_path / p).exists()
    assert not Path("/abs").exists()


@pytest.mark.parametrize("case, build, fmt, reason, key", MEMBER_CASES, ids=[c[0] for c in MEMBER_CASES])
def test_hostile_members_are_refused_by_every_reader(tmp_path, capsys, case, build, fmt, reason, key):
    data = shard_bytes(build, fmt)
    # the format layer's reader: the sample is refused with its reason, the samples around it kept
    keys, rejected = reader_result(data)
    assert [k for k in keys if k.startswith("good")] == ["good_a", "good_b"]
    assert [(r.reason, r.key) for r in rejected] == [(reason, key)], rejected
    # a key met again after other keys: its first, whole sample was read before the repeat showed
    first = 1 if reason == T.REJECT_DUPLICATE_KEY else 0
    assert keys.count(key) == first
    root = tmp_path / "set"
    write_set(root, data)
    # the training loader: skipped and counted by reason, shard and key
    got, stats = loader_stats(root)
    assert "good_a" in got and "good_b" in got and got.count(key) == first
    assert stats.skipped[reason] == 1 and stats.keys[reason] == {"train/hostile.tar": [key]}
    assert f"1 x {reason} (train/hostile.tar: {key}" in stats.summary()
    # serialgen shards preview: not drawn, counted
    capsys.readouterr()
    assert cli_main(["shards", "preview", str(root), "--out", str(tmp_path / "sheet.png"), "--thumb-height", "32"]) == 0
    out = capsys.readouterr().out
    assert f"1 x {reason}" in out and "pairs" in out
    # serialgen data preview: the loader's counts
    assert cli_main(["data", "preview", str(root), "--out", str(tmp_path / "grid.png"), "--count", "2",
                     "--resolution", "64x96", "--thumb-height", "32"]) == 0
    assert f"1 x {reason}" in capsys.readouterr().out
    # serialgen shards verify: damaged data, exit 1, naming the shard and the reason
    assert cli_main(["shards", "verify", str(root)]) == 1
    err = capsys.readouterr().err
    assert f"train/hostile.tar: {reason}" in err
    outside_untouched(tmp_path)


def cut(data: bytes, at: int) -> bytes:
    return data[:at]


def member_offsets(data: bytes) -> list[tuple[str, int, int]]:
    """(name, header offset, data offset) of every member, from tarfile."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.name, m.offset, m.offset_data) for m in tar.getmembers()]


def good_shard(n: int = 4) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(n):
            add_sample(tar, f"s{i}", sample(1, i, f"s{i}"))
    return buf.getvalue()


def damaged_header(data: bytes) -> bytes:
    """The 3rd sample's first header with one byte changed (its checksum no longer matches)."""
    name, offset, _ = [m for m in member_offsets(data) if m[0] == "s2.ref.png"][0]
    b = bytearray(data)
    b[offset + 10] ^= 0x20
    return bytes(b)


def mid_member(data: bytes) -> bytes:
    _, _, start = [m for m in member_offsets(data) if m[0] == "s2.ref.png"][0]
    return data[:start + 100]


def at_boundary(data: bytes) -> bytes:
    _, offset, _ = [m for m in member_offsets(data) if m[0] == "s2.ref.png"][0]
    return data[:offset]  # s0 and s1 whole, no end-of-archive block


def mid_header(data: bytes) -> bytes:
    _, offset, _ = [m for m in member_offsets(data) if m[0] == "s2.ref.png"][0]
    return data[:offset + 200]


# (case, damage, reason, the whole samples kept, the sample lost)
DAMAGE_CASES = [
    ("cut_inside_a_member", mid_member, T.REJECT_TRUNCATED, ["s0", "s1"], "s2"),
    # The sample being read when the tar breaks is lost even if it looks whole: the broken header
    # may have been one of its members.
    ("cut_inside_a_header", mid_header, T.REJECT_TRUNCATED, ["s0"], "s1"),
    ("cut_at_a_member_boundary", at_boundary, T.REJECT_TRUNCATED, ["s0"], "s1"),
    ("damaged_header", damaged_header, T.REJECT_DAMAGED, ["s0"], "s1"),
    ("not_a_tar", lambda d: b"this is not a tar file at all" * 40, T.REJECT_UNREADABLE, [], None),
    ("empty_file", lambda d: b"", T.REJECT_UNREADABLE, [], None),
]


@pytest.mark.parametrize("case, damage, reason, kept, lost", DAMAGE_CASES, ids=[c[0] for c in DAMAGE_CASES])
def test_damaged_shards_keep_the_whole_samples_and_count_one_reason(tmp_path, capsys, case, damage, reason, kept, lost):
    data = damage(good_shard())
    keys, rejected = reader_result(data)
    assert keys == kept
    assert [(r.reason, r.key) for r in rejected] == [(reason, lost)], rejected
    root = tmp_path / "set"
    write_set(root, data)
    got, stats = loader_stats(root)
    assert sorted(got) == kept
    assert dict(stats.skipped) == {reason: 1}
    assert stats.keys[reason] == {"train/hostile.tar": [lost]}
    assert cli_main(["shards", "verify", str(root)]) == 1
    assert f"train/hostile.tar: {reason}" in capsys.readouterr().err


def test_a_truncated_shard_in_the_bench_is_one_truncated_shard_not_hundreds_of_duplicates(tmp_path, capsys):
    """Issue 12, item 4: ``data bench`` reads a shard cut inside a member again and again
    (resampled): one sample lost in one shard, under the right reason, however often it is met."""
    root = tmp_path / "set"
    write_set(root, mid_member(good_shard()))
    assert cli_main(["data", "bench", str(root), "--json", "--seconds", "0.3", "--warmup", "0.1",
                     "--resolution", "64x96", "--batch-size", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["skipped"] == {T.REJECT_TRUNCATED: 1}
    assert result["skipped_where"] == {T.REJECT_TRUNCATED: {"train/hostile.tar": ["s2"]}}


def test_a_member_over_the_size_cap_is_never_read(tmp_path, monkeypatch):
    data = shard_bytes(evil("big", member="ref.png"))
    keys, rejected = reader_result(data, max_member_bytes=2000)
    assert [(r.reason, r.key) for r in rejected if r.key == "big"] == [(T.REJECT_TOO_LARGE, "big")]
    # the loader uses the format layer's cap
    monkeypatch.setattr(T, "MAX_MEMBER_BYTES", 2000)
    root = tmp_path / "set"
    write_set(root, data)
    _, stats = loader_stats(root)
    assert stats.skipped[T.REJECT_TOO_LARGE] >= 1 and "big" in stats.keys[T.REJECT_TOO_LARGE]["train/hostile.tar"]

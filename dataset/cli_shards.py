"""``serialgen shards verify`` and ``serialgen shards preview``: check a shard set, look at it."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from serialgen.errors import UserInputError

__all__ = ["register", "contact_sheet", "display_name", "SPLIT_COLOURS"]

# OpenPose-ish limb colours by keypoint index; a point is drawn only when visible.
_COLOURS = [(255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
            (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
            (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85)]


def _handle_verify(args: argparse.Namespace) -> int:
    from serialgen.dataset.shards import read_index, verify
    from serialgen.dataset.tarset import ForeignSetError, TarSetError, index_path

    root = Path(args.shards)
    if not root.exists():
        raise UserInputError(f"{root}: no such file or folder; expected a shard set (a folder with index.json)")
    if not index_path(root).is_file():
        unfinished = root.is_dir() and any(root.glob("*/*.tar"))
        raise UserInputError(f"{root}: not a shard set (no {index_path(root).name}"
                             + ("; its shards have no index: an unfinished render? run it again" if unfinished else "")
                             + ")")
    try:
        read_index(root)
    except ForeignSetError:
        raise  # the wrong folder or the wrong serialgen: a usage error (exit 2)
    except TarSetError as exc:  # an index that is there but damaged: damaged data (exit 1)
        print(f"{exc}", file=sys.stderr)
        print("verify: FAILED, the index is damaged", file=sys.stderr)
        return 1
    problems = verify(root, deep=not args.quick, decode=args.decode)
    if problems:
        for line in problems:
            print(f"{root}: {line}", file=sys.stderr)
        print(f"verify: FAILED, {len(problems)} problem{'s' if len(problems) != 1 else ''}", file=sys.stderr)
        return 1
    index = read_index(root)
    splits = ", ".join(f"{k} {v['samples']} pairs / {v['shards']} shards" for k, v in index["splits"].items())
    depth = "sizes and sha256 only" if args.quick else "every image decoded" if args.decode else "every sample checked"
    print(f"verify: OK, {len(index['shards'])} shards, {index['samples']} pairs ({splits}; index version "
          f"{index['format_version']}; {depth})")
    return 0


def _draw(image, pose: dict, scale: float):
    from PIL import ImageDraw

    d = ImageDraw.Draw(image)
    r = max(2, round(image.height / 90))
    for i, (x, y, v) in enumerate(pose["keypoints"]):
        if v:
            x, y = x * scale, y * scale
            d.ellipse([x - r, y - r, x + r, y + r], fill=_COLOURS[i % len(_COLOURS)], outline=(0, 0, 0))


SPLIT_COLOURS = {"train": (40, 110, 200), "test": (200, 90, 30)}  # the badge of each split in a preview


def display_name(character, characters: dict) -> str:
    """What previews and logs call a character: its display name from the index
    (``characters[id]["name"]``, e.g. ``Knight-e48437``), else its id."""
    record = characters.get(character) if isinstance(character, str) else None
    return str((record or {}).get("name") or character or "?")


class _Refused(Exception):
    """A pair the preview cannot draw (its reason is the message)."""


def contact_sheet(root: str | Path, out: str | Path, count: int = 8, thumb_height: int = 256,
                  split: str | None = None) -> tuple[Path, int, Counter]:
    """Draw ``count`` pairs (ref on a grey checkerboard | std), keypoints drawn, as one PNG; each
    cell is labelled with the key, the character's display name (index ``characters[id]["name"]``,
    else its id), its split, framing and expression. Returns (the PNG, pairs drawn, refused samples
    by reason): a sample the tar reader refuses (unsafe member names, links, bad keys, a damaged
    tar) or whose images fail their CRCs or do not decode is not drawn but counted."""
    from PIL import Image, ImageDraw

    from serialgen.dataset.shards import (MEMBERS, MEMBERS_V2, decode_png, png_problem, read_index, read_standard,
                                          standard_paths)
    from serialgen.dataset.tarset import TarSetError, iter_samples

    index = read_index(root)
    characters = index.get("characters") or {}
    members = MEMBERS if index["format_version"] >= 3 else MEMBERS_V2
    paths = standard_paths(root, index)
    standards: dict = {}  # character -> (std.png bytes, std_pose.json bytes), or the reason it has none

    def standard_of(character) -> tuple[bytes, bytes]:
        if character not in standards:
            if character not in paths:
                standards[character] = "missing standard"
            else:
                try:
                    std = read_standard(paths[character], character)
                    standards[character] = (std["std.png"], std["std_pose.json"])
                except TarSetError:
                    standards[character] = "corrupt standard"
        got = standards[character]
        if isinstance(got, str):
            raise _Refused(got)
        return got

    refused: Counter = Counter()
    cells = []
    for entry in index["shards"]:
        if split and entry["split"] != split:
            continue
        for key, sample in iter_samples(Path(root) / entry["path"], on_reject=lambda r: refused.update([r.reason])):
            if any(m not in sample for m in members):
                refused["incomplete sample"] += 1
                continue
            member = "meta.json"
            try:
                meta = json.loads(sample["meta.json"])
                if not isinstance(meta, dict):
                    raise ValueError("meta.json is not an object")
                std_png, std_pose = ((sample["std.png"], sample["std_pose.json"]) if "std.png" in sample
                                     else standard_of(meta.get("character")))
                for member, data in (("ref.png", sample["ref.png"]), ("std.png", std_png)):
                    why = png_problem(data)
                    if why:
                        raise ValueError(why)
                member = "ref.png"
                ref = Image.fromarray(decode_png(sample["ref.png"], "RGBA"), "RGBA")
                member = "std.png"
                std = Image.fromarray(decode_png(std_png, "RGB"), "RGB")
                member = "ref_pose.json/std_pose.json"
                poses = json.loads(sample["ref_pose.json"]), json.loads(std_pose)
                if not all(isinstance(p, dict) and "keypoints" in p for p in poses):
                    raise ValueError("not pose objects")
            except _Refused as exc:
                refused[str(exc)] += 1
                continue
            except (ValueError, OSError, EOFError, RecursionError):
                refused[f"corrupt {member}"] += 1
                continue
            cells.append((key, entry["split"], ref, std, meta, poses))
            if len(cells) >= count:
                break
        if len(cells) >= count:
            break
    if not cells:
        raise UserInputError(f"{root}: no samples to preview" + (f" in split {split!r}" if split else "")
                             + (f" (refused: {dict(refused)})" if refused else ""))
    rows = []
    for key, sample_split, ref, std, meta, (ref_pose, std_pose) in cells:
        scale = thumb_height / ref.height
        size = (max(1, round(ref.width * scale)), thumb_height)
        board = Image.new("RGBA", ref.size, (150, 150, 150, 255))
        dd = ImageDraw.Draw(board)
        step = max(8, ref.width // 16)
        for y in range(0, ref.height, step):
            for x in range((y // step) % 2 * step, ref.width, 2 * step):
                dd.rectangle([x, y, x + step - 1, y + step - 1], fill=(190, 190, 190, 255))
        board.alpha_composite(ref)
        left, right = board.convert("RGB").resize(size), std.resize(size)
        _draw(left, ref_pose, scale)
        _draw(right, std_pose, scale)
        row = Image.new("RGB", (2 * size[0] + 4, thumb_height + 28), "white")
        row.paste(left, (0, 28))
        row.paste(right, (size[0] + 4, 28))
        name = display_name(meta.get("character"), characters)
        d = ImageDraw.Draw(row)
        d.rectangle([0, 0, 40, 13], fill=SPLIT_COLOURS.get(sample_split, (90, 90, 90)))  # the split at a glance
        d.text((3, 1), sample_split.upper(), fill=(255, 255, 255))
        d.text((46, 1), str(name), fill=(0, 0, 0))
        d.text((2, 14), f"{key} {meta.get('framing')} {meta.get('expression')}", fill=(0, 0, 0))
        rows.append(row)
    cols = 4
    w, h = rows[0].size
    sheet = Image.new("RGB", (cols * (w + 8), ((len(rows) + cols - 1) // cols) * (h + 8)), "white")
    for i, row in enumerate(rows):
        sheet.paste(row, ((i % cols) * (w + 8), (i // cols) * (h + 8)))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out, len(rows), refused


def _handle_preview(args: argparse.Namespace) -> int:
    if args.count < 1:
        raise UserInputError(f"--count {args.count}: must be at least 1")
    if args.thumb_height < 16:
        raise UserInputError(f"--thumb-height {args.thumb_height}: must be at least 16")
    path, drawn, refused = contact_sheet(args.shards, args.out, count=args.count, thumb_height=args.thumb_height,
                                         split=args.split)
    note = "; refused " + ", ".join(f"{n} x {r}" for r, n in refused.most_common()) if refused else ""
    print(f"preview: wrote {path} ({drawn} pairs{note})")
    return 0


def register(sub, groups) -> None:
    shards = groups["shards"]
    v = shards.add_parser("verify", help="check every shard against index.json (exit 1 on damaged data)",
                          description="Check that every pair shard and standard tar listed in SHARDS/index.json "
                                      "exists with its size and sha256, that no unlisted tar lies in the split or "
                                      "standard folders, and (unless --quick) that every tar reads whole with safe "
                                      "regular members, every sample has its members (format 3 pairs: ref.png RGBA, "
                                      "ref_pose.json, std_pose.json, meta.json; standards: std.png RGB, std_pose.json, "
                                      "meta.json; formats 1-2: std.png in each pair), every PNG's chunk CRCs match, and, "
                                      "when the index lists its characters, each sample's character is listed with "
                                      "its split and standard pose. Exit 0 when all is well, 1 on damaged data (one "
                                      "line per problem), 2 when SHARDS is not a shard set.")
    v.add_argument("shards", metavar="SHARDS", help="shard folder (holds index.json)")
    v.add_argument("--quick", action="store_true",
                   help="sizes and sha256 only, no sample checks (default: every sample checked)")
    v.add_argument("--decode", action="store_true",
                   help="also decode every image and check its size against its pose file (slower: "
                        "about 3 ms per pair); default: chunk CRCs and headers only")
    v.set_defaults(handler=_handle_verify)
    p = shards.add_parser("preview", help="contact sheet of pairs (ref | std) with keypoints drawn",
                          description="Draw a contact sheet PNG: per pair, the non-standard image on a "
                                      "checkerboard and its character's standard image, with visible keypoints "
                                      "drawn, each cell marked with its split (train blue, test orange) and the "
                                      "character's display name. Samples that cannot be drawn (refused by the tar "
                                      "reader, damaged images, a missing standard) are counted by reason.")
    p.add_argument("shards", metavar="SHARDS", help="shard folder (holds index.json)")
    p.add_argument("--out", required=True, metavar="PNG", help="output image")
    p.add_argument("--count", type=int, default=8, help="pairs to draw (default 8)")
    p.add_argument("--split", choices=["train", "test"], default=None, help="only this split (default: both)")
    p.add_argument("--thumb-height", type=int, default=256, help="cell height in pixels (default 256)")
    p.set_defaults(handler=_handle_preview)

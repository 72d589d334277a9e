"""``serialgen shards verify`` and ``serialgen shards preview``: check a shard set, look at it."""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

from serialgen.errors import UserInputError

__all__ = ["register"]

# OpenPose-ish limb colours by keypoint index; a point is drawn only when visible.
_COLOURS = [(255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
            (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
            (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85)]


def _handle_verify(args: argparse.Namespace) -> int:
    from serialgen.dataset.shards import read_index, verify

    problems = verify(args.shards, deep=not args.quick)
    if problems:
        for line in problems:
            print(f"{args.shards}: {line}", file=sys.stderr)
        print(f"verify: FAILED, {len(problems)} problems", file=sys.stderr)
        return 1
    index = read_index(args.shards)
    splits = ", ".join(f"{k} {v['samples']} pairs / {v['shards']} shards" for k, v in index["splits"].items())
    print(f"verify: OK, {len(index['shards'])} shards, {index['samples']} pairs ({splits}; index version "
          f"{index['format_version']})")
    return 0


def _draw(image, pose: dict, scale: float):
    from PIL import ImageDraw

    d = ImageDraw.Draw(image)
    r = max(2, round(image.height / 90))
    for i, (x, y, v) in enumerate(pose["keypoints"]):
        if v:
            x, y = x * scale, y * scale
            d.ellipse([x - r, y - r, x + r, y + r], fill=_COLOURS[i % len(_COLOURS)], outline=(0, 0, 0))


def contact_sheet(root: str | Path, out: str | Path, count: int = 8, thumb_height: int = 256,
                  split: str | None = None) -> Path:
    """Draw ``count`` pairs (ref on a grey checkerboard | std), keypoints drawn, as one PNG."""
    from PIL import Image, ImageDraw

    from serialgen.dataset.shards import iter_shard, read_index

    index = read_index(root)
    cells = []
    for entry in index["shards"]:
        if split and entry["split"] != split:
            continue
        for key, sample in iter_shard(Path(root) / entry["path"]):
            cells.append((key, sample))
            if len(cells) >= count:
                break
        if len(cells) >= count:
            break
    if not cells:
        raise UserInputError(f"{root}: no samples to preview" + (f" in split {split!r}" if split else ""))
    rows = []
    for key, sample in cells:
        ref = Image.open(io.BytesIO(sample["ref.png"])).convert("RGBA")
        std = Image.open(io.BytesIO(sample["std.png"])).convert("RGB")
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
        _draw(left, json.loads(sample["ref_pose.json"]), scale)
        _draw(right, json.loads(sample["std_pose.json"]), scale)
        row = Image.new("RGB", (2 * size[0] + 4, thumb_height + 14), "white")
        row.paste(left, (0, 14))
        row.paste(right, (size[0] + 4, 14))
        meta = json.loads(sample["meta.json"])
        ImageDraw.Draw(row).text((2, 1), f"{key} {meta.get('framing')} {meta.get('expression')}", fill=(0, 0, 0))
        rows.append(row)
    cols = 4
    w, h = rows[0].size
    sheet = Image.new("RGB", (cols * (w + 8), ((len(rows) + cols - 1) // cols) * (h + 8)), "white")
    for i, row in enumerate(rows):
        sheet.paste(row, ((i % cols) * (w + 8), (i // cols) * (h + 8)))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def _handle_preview(args: argparse.Namespace) -> int:
    if args.count < 1:
        raise UserInputError(f"--count {args.count}: must be at least 1")
    path = contact_sheet(args.shards, args.out, count=args.count, split=args.split)
    print(f"preview: wrote {path}")
    return 0


def register(sub, groups) -> None:
    shards = groups["shards"]
    v = shards.add_parser("verify", help="check every shard against index.json (exit 1 on any mismatch)",
                          description="Check that every shard listed in SHARDS/index.json exists with its size "
                                      "and sha256, that no unlisted shard lies in the split folders, and that "
                                      "every sample has its five members (ref.png RGBA, std.png RGB, "
                                      "ref_pose.json, std_pose.json, meta.json) and, when the index lists its "
                                      "characters (format version 2), that each sample's character is listed "
                                      "with its split and standard pose. Exit 1 on any problem.")
    v.add_argument("shards", metavar="SHARDS", help="shard folder (holds index.json)")
    v.add_argument("--quick", action="store_true", help="sizes and checksums only, no sample checks")
    v.set_defaults(handler=_handle_verify)
    p = shards.add_parser("preview", help="contact sheet of pairs (ref | std) with keypoints drawn",
                          description="Draw a contact sheet PNG: per pair, the non-standard image on a "
                                      "checkerboard and the standard image, with visible keypoints drawn.")
    p.add_argument("shards", metavar="SHARDS", help="shard folder (holds index.json)")
    p.add_argument("--out", required=True, metavar="PNG", help="output image")
    p.add_argument("--count", type=int, default=8, help="pairs to draw (default 8)")
    p.add_argument("--split", choices=["train", "test"], default=None, help="only this split")
    p.set_defaults(handler=_handle_preview)

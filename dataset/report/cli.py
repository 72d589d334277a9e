"""``serialgen report DIR``: the HTML page of a shard set or an asset folder."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from serialgen.argtypes import positive_int
from serialgen.errors import UserInputError

__all__ = ["register"]

_DEFAULT_SAMPLE = 2000
_DEFAULT_MAX_CHARACTERS = 200
_DEFAULT_PAIRS = 6


def register(sub, groups) -> None:
    p = sub.add_parser(
        "report", help="write a static HTML page about a shard set or an asset folder",
        description="Write a self-contained HTML page (a folder: index.html and img/; no server, no network) "
                    "about DIR: a shard set (run settings, code fingerprint, counts per split, distributions, "
                    "failures, character cards) or an asset folder (accepted/rejected by reason, pose library "
                    "coverage, backgrounds). Prints the page's path.")
    p.add_argument("dir", metavar="DIR", help="a shard set folder (with index.json) or an asset folder "
                                              "(with characters.jsonl)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="folder to write (replaced if it holds an earlier report; default: DIR/report)")
    p.add_argument("--assets", metavar="DIR", default=None,
                   help="shard sets: the asset folder they were rendered from, for file names and rejected "
                        "characters when the render did not record them (default: what run.json recorded)")
    p.add_argument("--sample", type=positive_int, default=_DEFAULT_SAMPLE, metavar="N",
                   help="shard sets without stats.json: read at most N samples' meta.json for the distributions "
                        f"(default {_DEFAULT_SAMPLE}; sets with stats.json read none)")
    p.add_argument("--max-characters", type=positive_int, default=_DEFAULT_MAX_CHARACTERS, metavar="N",
                   help=f"character cards shown, problem characters first (default {_DEFAULT_MAX_CHARACTERS})")
    p.add_argument("--pairs-per-character", type=positive_int, default=_DEFAULT_PAIRS, metavar="K",
                   help=f"references in each card's strip (default {_DEFAULT_PAIRS})")
    p.set_defaults(handler=_handle)


def _handle(args) -> int:
    from serialgen.dataset.tarset import INDEX_NAME, TarSetError

    root = Path(args.dir)
    if not root.is_dir():
        raise UserInputError(f"{root}: no such folder")
    out = Path(args.out) if args.out else root / "report"
    t0 = time.perf_counter()
    if (root / INDEX_NAME).is_file():
        from serialgen.dataset.report.shards_report import build_shards_report

        if args.assets is not None and not (Path(args.assets) / "characters.jsonl").is_file():
            raise UserInputError(f"--assets {args.assets}: no characters.jsonl there (not an asset folder)")
        try:
            page = build_shards_report(root, out, assets=args.assets, sample=args.sample,
                                       max_characters=args.max_characters, pairs_per_character=args.pairs_per_character)
        except TarSetError as exc:  # the index is there but cannot be read: damaged data
            print(f"serialgen: error: {exc}", file=sys.stderr)
            return 1
    elif (root / "characters.jsonl").is_file() or (root / "poses.npz").is_file():
        from serialgen.dataset.report.assets_report import build_assets_report

        if args.assets is not None:
            raise UserInputError("--assets: only for shard sets (DIR is an asset folder)")
        page = build_assets_report(root, out)
    else:
        raise UserInputError(f"{root}: neither a shard set (no {INDEX_NAME}) nor an asset folder "
                             "(no characters.jsonl or poses.npz)")
    print(f"report: {page} ({time.perf_counter() - t0:.1f} s)")
    return 0

"""Make the pictures of the README and the docs (``docs/images/``) from ``make shards`` output.

One script, the same commands a user runs, each picture made small enough to commit (< 200 KB):

* ``pairs.jpg``: ``serialgen shards preview`` (reference | standard, keypoints drawn);
* ``loader_grid.jpg``: ``serialgen data preview`` (composite, mask, pose map, standard, standard pose);
* ``pose_library.png``: ``serialgen assets poses-preview`` (stick figures of every motion);
* ``report_page.jpg``: ``serialgen report`` loaded in headless Chromium (top of the page: run,
  counts, distributions, the first character cards); the page must load cleanly (every image,
  no script error) or the script stops.

Usage (after ``make shards``)::

    .venv/bin/python benchmarks/make_doc_images.py [--shards data/shards] [--assets data/assets] [--out docs/images]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from serialgen.dataset.report.browser import check_page

MAX_BYTES = 200_000


def serialgen(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "serialgen.cli", *args], check=True, stdout=subprocess.DEVNULL)


def save_small(image: Image.Image, path: Path, *, width: int | None = None, colours: int | None = None) -> None:
    """Resize to ``width`` (aspect kept), then JPEG (photos) or a paletted PNG (line art)."""
    if width and image.width > width:
        image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
    if path.suffix == ".jpg":
        for quality in (85, 78, 70, 60):
            image.convert("RGB").save(path, "JPEG", quality=quality, optimize=True, progressive=True)
            if path.stat().st_size < MAX_BYTES:
                break
    else:
        image.convert("RGB").quantize(colors=colours or 64).save(path, "PNG", optimize=True)
    size = path.stat().st_size
    print(f"{path}: {image.width}x{image.height}, {size / 1000:.0f} KB")
    if size >= MAX_BYTES:
        raise SystemExit(f"{path}: {size} bytes, over the {MAX_BYTES} limit for committed images")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", default="data/shards", help="shard set (default: data/shards, as make shards writes)")
    ap.add_argument("--assets", default="data/assets", help="its asset folder (default: data/assets)")
    ap.add_argument("--out", default="docs/images", help="where the pictures go (default: docs/images)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        serialgen("shards", "preview", args.shards, "--out", str(tmp / "pairs.png"), "--count", "8",
                  "--thumb-height", "192")
        save_small(Image.open(tmp / "pairs.png"), out / "pairs.jpg", width=1100)

        serialgen("data", "preview", args.shards, "--backgrounds", args.assets, "--out", str(tmp / "loader.png"),
                  "--count", "3", "--thumb-height", "192", "--split", "train")
        save_small(Image.open(tmp / "loader.png"), out / "loader_grid.jpg")

        serialgen("assets", "poses-preview", args.assets, "--out", str(tmp / "poses.png"), "--per-motion", "4")
        save_small(Image.open(tmp / "poses.png"), out / "pose_library.png", width=1000, colours=16)

        t0 = time.perf_counter()
        serialgen("report", args.shards, "--assets", args.assets, "--out", str(tmp / "report"))
        took = time.perf_counter() - t0
        shot = tmp / "report.png"
        # where the character cards start: the picture shows everything above and one row of cards
        check = check_page(tmp / "report" / "index.html", screenshot=shot,
                           evaluate="document.getElementById('characters').getBoundingClientRect().top")
        if check.broken_images or check.errors or check.outside_requests:
            raise SystemExit(f"the report page does not load cleanly: broken images {check.broken_images}, "
                             f"errors {check.errors}, outside requests {check.outside_requests}")
        page = Image.open(shot)
        bottom = min(page.height, int(check.evaluated) + 420)
        save_small(page.crop((0, 0, page.width, bottom)), out / "report_page.jpg", width=1000)
        print(f"report: written in {took:.1f} s (serialgen report, one process), {len(check.images)} images "
              f"loaded in Chromium, no errors")
    return 0


if __name__ == "__main__":
    sys.exit(main())

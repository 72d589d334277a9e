"""The report pages in a real browser: Debian's Chromium, headless, loading the page from disk.

Every image must load (naturalWidth > 0), no script may throw or log an error, nothing may be
fetched from outside the folder, and a screenshot is saved. The set-up installs Chromium once per
machine (`apt-get install -y chromium`) when it is missing and we run as root, as CI does; where it
cannot be installed the tests skip with one line saying why.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from PIL import Image

from serialgen.dataset.report.assets_report import build_assets_report
from serialgen.dataset.report.browser import check_page, find_chromium
from serialgen.dataset.report.shards_report import build_shards_report
from test_report_page import asset_folder, full_set, write_set  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow


def _install_chromium() -> str | None:
    """Why Chromium could not be installed (None: it is there now)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "Chromium is not installed and installing it needs root (apt-get install chromium)"
    if shutil.which("apt-get") is None:
        return "Chromium is not installed and this machine has no apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for step in (["apt-get", "install", "-y", "-q", "chromium"], ["apt-get", "update", "-q"],
                 ["apt-get", "install", "-y", "-q", "chromium"]):
        done = subprocess.run(step, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode == 0 and step[1] == "install":
            return None
    return f"apt-get install chromium failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}"


@pytest.fixture(scope="session")
def chromium() -> str:
    binary = find_chromium()
    if binary is None:
        why = _install_chromium()
        binary = find_chromium()
        if binary is None:
            pytest.skip(why or "Chromium installed but not found on PATH")
    return binary


def _assert_clean(check, min_images: int):
    assert len(check.images) >= min_images
    assert check.broken_images == [], f"images that did not load: {check.broken_images}"
    assert check.errors == [], f"errors in the browser: {check.errors}"
    assert check.outside_requests == [], f"requests outside the folder: {check.outside_requests}"


def test_shard_report_loads_cleanly_in_chromium(chromium, full_set, tmp_path):
    root, page = full_set
    shot = tmp_path / "shards-report.png"
    check = check_page(page, screenshot=shot, chromium=chromium,
                       evaluate="document.getElementById('card-count').textContent")
    _assert_clean(check, min_images=9 + 5 + 4)
    assert check.title == "Shard set report: shards"
    assert check.evaluated == "4 of 4 shown"  # the filter script ran to its end
    with Image.open(shot) as im:
        assert im.width == 1280 and im.height > 900  # the whole page, not only the window


def test_asset_report_loads_cleanly_in_chromium(chromium, asset_folder, tmp_path):
    page = build_assets_report(asset_folder, tmp_path / "out")
    check = check_page(page, screenshot=tmp_path / "assets-report.png", chromium=chromium)
    _assert_clean(check, min_images=6)


def test_the_check_sees_broken_images_scripts_and_outside_requests(chromium, tmp_path):
    # The check must be able to fail: a missing image, a throwing script and a fetch from outside
    # (port 9 on loopback: refused at once, so the load event does not wait for a timeout).
    page = tmp_path / "bad.html"
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    page.write_text('<!doctype html><title>bad</title><img src="ok.png"><img src="missing.png">'
                    '<img src="http://127.0.0.1:9/x.png"><script>undefinedFunction();</script>')
    check = check_page(page, chromium=chromium, timeout=30)
    assert [src for src, w, _ in check.images if w > 0] == ["ok.png"]
    assert set(check.broken_images) == {"missing.png", "http://127.0.0.1:9/x.png"}
    assert any("undefinedFunction" in e for e in check.errors)
    assert check.outside_requests == ["http://127.0.0.1:9/x.png"]


def test_a_set_without_side_files_loads_cleanly(chromium, tmp_path):
    root = write_set(tmp_path / "s", {"c1": ("train", 2), "c2": ("test", 1)})
    page = build_shards_report(root, tmp_path / "out")
    _assert_clean(check_page(page, chromium=chromium), min_images=9 + 3 + 2)

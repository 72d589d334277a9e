"""Load a report page in headless Chromium and check it the way a reader's browser would.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: requests
on file descriptor 3, answers on 4, NUL-separated JSON), so nothing listens on a port and no
client library is needed. One :func:`check_page` call starts a fresh browser with an empty profile,
opens the page from disk (``file://``), waits for its load event (which waits for every image),
then reports each image's ``naturalWidth``, every script exception and console/log error, every
request that left the folder, and can save a full-page screenshot. Used by the report's tests and
by ``benchmarks/make_doc_images.py``.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CHROMIUM_FLAGS", "find_chromium", "PageCheck", "check_page"]

# Headless and quiet: no GPU, no sandbox (we may run as root), and no background traffic to
# Google's hosts (this machine's closed network refuses it, many requests at a time).
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--mute-audio")
_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """Path of a Chromium binary ($SERIALGEN_CHROMIUM, else the usual names on PATH), or None."""
    env = os.environ.get("SERIALGEN_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    for name in _CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class PageCheck:
    """What the browser saw. ``images``: (src as written in the page, naturalWidth, naturalHeight)."""

    url: str
    images: list[tuple[str, int, int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # script exceptions, console errors, failed loads
    outside_requests: list[str] = field(default_factory=list)  # anything not file: or data:
    title: str = ""
    evaluated: object = None  # the value of ``evaluate``, when given
    seconds: float = 0.0

    @property
    def broken_images(self) -> list[str]:
        return [src for src, w, _h in self.images if w <= 0]


class _Pipe:
    """The DevTools protocol over Chromium's debugging pipe."""

    def __init__(self, proc: subprocess.Popen, write_fd: int, read_fd: int):
        self.proc, self.write_fd, self.read_fd = proc, write_fd, read_fd
        self.buf = b""
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> int:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        data = json.dumps(msg).encode() + b"\0"
        while data:
            data = data[os.write(self.write_fd, data):]
        return self.next_id

    def receive(self, deadline: float) -> dict:
        while b"\0" not in self.buf:
            ready, _, _ = select.select([self.read_fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self.read_fd, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium closed the debugging pipe (exit status {self.proc.poll()})")
            self.buf += chunk
        raw, self.buf = self.buf.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30.0) -> dict:
        ident = self.send(method, params, session)
        deadline = time.monotonic() + timeout
        while True:
            msg = self.receive(deadline)
            if msg.get("id") == ident:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error'].get('message')}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, event: str, timeout: float) -> dict:
        for k, msg in enumerate(self.events):
            if msg.get("method") == event:
                return self.events.pop(k)
        deadline = time.monotonic() + timeout
        while True:
            msg = self.receive(deadline)
            if msg.get("method") == event:
                return msg
            self.events.append(msg)


def _start(binary: str, profile: str, width: int, height: int):
    to_chrome_r, to_chrome_w = os.pipe()
    from_chrome_r, from_chrome_w = os.pipe()

    def fds_3_and_4():  # in the child, before exec: the protocol's fixed descriptor numbers
        a, b = os.dup(to_chrome_r), os.dup(from_chrome_w)
        os.dup2(a, 3)
        os.dup2(b, 4)

    args = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
            "--remote-debugging-pipe", "about:blank"]
    proc = subprocess.Popen(args, pass_fds=(3, 4), preexec_fn=fds_3_and_4, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(to_chrome_r)
    os.close(from_chrome_w)
    return proc, _Pipe(proc, to_chrome_w, from_chrome_r)


def check_page(page: str | Path, *, screenshot: str | Path | None = None, width: int = 1280, height: int = 900,
               full_page: bool = True, timeout: float = 60.0, chromium: str | None = None,
               evaluate: str | None = None) -> PageCheck:
    """Open ``page`` (an HTML file) in a fresh headless Chromium and report what it saw.

    ``screenshot``: write a PNG of the page (the whole page when ``full_page``, else the window).
    ``evaluate``: a JavaScript expression evaluated after the load event; its (JSON) value is
    ``PageCheck.evaluated``.
    Raises RuntimeError when no Chromium is found or it does not start.
    """
    binary = chromium or find_chromium()
    if binary is None:
        raise RuntimeError("no Chromium found (install Debian's chromium, or set SERIALGEN_CHROMIUM)")
    url = Path(page).resolve().as_uri()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="serialgen-chromium-") as profile:
        proc, pipe = _start(binary, profile, width, height)
        try:
            target = pipe.call("Target.createTarget", {"url": "about:blank"}, timeout=timeout)["targetId"]
            session = pipe.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page", "Runtime", "Log", "Network"):
                pipe.call(f"{domain}.enable", session=session)
            pipe.call("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=session)
            pipe.call("Page.navigate", {"url": url}, session=session)
            pipe.wait_for("Page.loadEventFired", timeout)
            probe = ("JSON.stringify({title: document.title, images: Array.from(document.images)"
                     ".map(function (i) { return [i.getAttribute('src'), i.naturalWidth, i.naturalHeight]; })})")
            seen = json.loads(pipe.call("Runtime.evaluate", {"expression": probe, "returnByValue": True},
                                        session=session)["result"]["value"])
            evaluated = None
            if evaluate is not None:
                evaluated = pipe.call("Runtime.evaluate", {"expression": evaluate, "returnByValue": True},
                                      session=session)["result"].get("value")
            shot = None
            if screenshot is not None:
                shot = pipe.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": full_page},
                                 session=session, timeout=timeout)["data"]
            pipe.call("Runtime.evaluate", {"expression": "1"}, session=session)  # flush pending events
            try:
                pipe.call("Browser.close", timeout=10)
            except (RuntimeError, TimeoutError):
                pass  # it may close the pipe before answering
        finally:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            os.close(pipe.write_fd)
            os.close(pipe.read_fd)
    check = PageCheck(url=url, title=seen["title"], images=[(s or "", int(w), int(h)) for s, w, h in seen["images"]],
                      evaluated=evaluated)
    for msg in pipe.events:
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Runtime.exceptionThrown":
            d = params.get("exceptionDetails", {})
            check.errors.append(f"script exception: {(d.get('exception') or {}).get('description') or d.get('text')} "
                                f"(line {d.get('lineNumber')})")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            check.errors.append("console.error: " + " ".join(str(a.get("value", a.get("description")))
                                                             for a in params.get("args", [])))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            e = params["entry"]
            check.errors.append(f"{e.get('source')}: {e.get('text')} {e.get('url') or ''}".strip())
        elif method == "Network.requestWillBeSent":
            req = params.get("request", {}).get("url", "")
            if not req.startswith(("file:", "data:")):
                check.outside_requests.append(req)
    if shot is not None:
        Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
        Path(screenshot).write_bytes(base64.b64decode(shot))
    check.seconds = time.monotonic() - t0
    return check

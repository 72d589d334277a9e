"""The report folder: one static HTML page, its images beside it, no server and no network.

Everything on the page comes from files a stranger may have written (character file names,
rejection details, manifest fields), so every text goes through :func:`esc` and every file the page
names is one this module wrote under a name it chose (``img/0003-std.png``), never a name taken
from the data. The folder is written under a temporary name and swapped in whole, so a page is
never half old, half new; an existing ``--out`` folder is replaced only when it holds one of our
pages (the generator tag), never a folder of someone else's files.
"""

from __future__ import annotations

import html
import io
import os
import shutil
import tempfile
from pathlib import Path

from serialgen.errors import UserInputError

__all__ = ["Page", "esc", "table", "kv_table", "human_bytes", "not_recorded"]

GENERATOR = "serialgen report"
IMAGE_DIR = "img"
PAGE_NAME = "index.html"

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;color:#1d232a;background:#f6f7f9}
header{background:#22303c;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}header p{margin:4px 0 0;color:#c8d3dd}
main{padding:8px 24px 40px;max-width:1500px}
h2{margin:26px 0 8px;font-size:17px;border-bottom:1px solid #d8dde3;padding-bottom:4px}
h3{margin:14px 0 6px;font-size:15px}
table{border-collapse:collapse;background:#fff;margin:4px 0 10px}
td,th{border:1px solid #dde2e7;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#eef1f4;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
code{font:12px ui-monospace,SFMono-Regular,Menlo,monospace;background:#eef1f4;padding:0 3px;border-radius:3px;word-break:break-all}
.note{color:#5b6670}.warn{color:#a0400b}.bad{color:#b01c1c}.ok{color:#1d7a35}
.plots{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start}.plots figure{margin:0;background:#fff;border:1px solid #dde2e7;padding:4px}
.plots figcaption{font-size:12px;color:#5b6670;max-width:380px}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{background:#fff;border:1px solid #dde2e7;border-radius:6px;padding:8px;width:fit-content;max-width:100%}
.card.failed{border-color:#e0a0a0}.card.rejected{border-color:#d9b36c;background:#fffaf0}
.card h3{margin:0 0 4px;font-size:14px}.card .meta{font-size:12px;color:#5b6670;margin-bottom:6px}
.strip{display:flex;gap:4px;align-items:flex-end}
.strip img,.thumbs img{background-color:#fff;background-image:linear-gradient(45deg,#e4e7ea 25%,transparent 25%,transparent 75%,#e4e7ea 75%),linear-gradient(45deg,#e4e7ea 25%,transparent 25%,transparent 75%,#e4e7ea 75%);background-size:12px 12px;background-position:0 0,6px 6px;border:1px solid #e3e6ea}
.strip img.std{border-color:#7a8a99;margin-right:8px}
.thumbs{display:flex;flex-wrap:wrap;gap:3px}
.filter{margin:6px 0 10px}.filter input{padding:3px 6px;width:260px}
ul.reasons{margin:4px 0;padding-left:18px;font-size:12px}
"""

# The one script: a filter over the character cards (name, id, status). Plain DOM, no library.
_SCRIPT = """
(function () {
  var box = document.getElementById('card-filter');
  if (!box) { return; }
  var status = document.getElementById('card-status');
  var cards = Array.prototype.slice.call(document.querySelectorAll('.card[data-search]'));
  var count = document.getElementById('card-count');
  function apply() {
    var q = box.value.trim().toLowerCase(), s = status.value, shown = 0;
    cards.forEach(function (c) {
      var hit = c.getAttribute('data-search').indexOf(q) >= 0 && (!s || c.getAttribute('data-status') === s);
      c.style.display = hit ? '' : 'none';
      shown += hit ? 1 : 0;
    });
    count.textContent = shown + ' of ' + cards.length + ' shown';
  }
  box.addEventListener('input', apply);
  status.addEventListener('change', apply);
  apply();
})();
"""


def esc(value) -> str:
    """Text (any value) as HTML-escaped text: data never becomes markup."""
    return html.escape("" if value is None else str(value), quote=True)


def not_recorded(what: str = "not recorded") -> str:
    return f'<span class="note">{esc(what)}</span>'


def human_bytes(n: float | int | None) -> str:
    if n is None:
        return "–"
    n = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} TB"


def table(headers: list[str], rows: list[list], numeric: set[int] = frozenset()) -> str:
    """An HTML table; cells are escaped unless given as ``("html", text)`` (markup this package made)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            text = cell[1] if isinstance(cell, tuple) and cell and cell[0] == "html" else esc(cell)
            cells.append(f'<td class="n">{text}</td>' if i in numeric else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def kv_table(pairs: list[tuple[str, object]]) -> str:
    """A two-column table of (label, value); a value given as ``("html", text)`` is kept as markup."""
    rows = []
    for k, v in pairs:
        text = v[1] if isinstance(v, tuple) and v and v[0] == "html" else esc(v)
        rows.append(f"<tr><th>{esc(k)}</th><td>{text}</td></tr>")
    return f"<table><tbody>{''.join(rows)}</tbody></table>"


class Page:
    """Collects sections and images, then :meth:`write` puts the folder in place.

    Images are added as bytes (:meth:`image`) or PIL images (:meth:`pil`) and get a name chosen
    here; the returned relative path goes into ``<img src>``.
    """

    def __init__(self, out: str | Path, title: str, subtitle: str = ""):
        self.out = Path(out)
        _check_out(self.out)
        self.title, self.subtitle = title, subtitle
        self.sections: list[str] = []
        self._images: dict[str, bytes] = {}

    def section(self, title: str, body: str, anchor: str | None = None) -> None:
        ident = f' id="{esc(anchor)}"' if anchor else ""
        self.sections.append(f"<section{ident}><h2>{esc(title)}</h2>{body}</section>")

    def image(self, stem: str, data: bytes, ext: str) -> str:
        name = f"{IMAGE_DIR}/{stem}.{ext}"
        self._images[name] = data
        return name

    def pil(self, stem: str, image, fmt: str = "PNG") -> str:
        buf = io.BytesIO()
        if fmt == "JPEG":
            image.convert("RGB").save(buf, "JPEG", quality=85)
            return self.image(stem, buf.getvalue(), "jpg")
        image.save(buf, "PNG", compress_level=6)  # optimize=True: 5x the time for a few % of bytes
        return self.image(stem, buf.getvalue(), "png")

    def html(self) -> str:
        sub = f"<p>{esc(self.subtitle)}</p>" if self.subtitle else ""
        return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<meta name=\"generator\" content=\"{GENERATOR}\">"
                "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
                f"<title>{esc(self.title)}</title><style>{_CSS}</style></head>\n<body>"
                f"<header><h1>{esc(self.title)}</h1>{sub}</header><main>\n"
                + "\n".join(self.sections)
                + f"\n</main><script>{_SCRIPT}</script></body></html>\n")

    def write(self) -> Path:
        """Write the folder (temporary sibling, then swapped in); returns the page's path."""
        parent = self.out.parent
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", dir=parent))
        try:
            (tmp / IMAGE_DIR).mkdir()
            for name, data in self._images.items():
                (tmp / name).write_bytes(data)
            (tmp / PAGE_NAME).write_text(self.html(), encoding="utf-8")
            os.chmod(tmp, 0o755)  # mkdtemp makes 0700; a report is for others to read
            if self.out.exists():
                old = self.out.with_name(f".{self.out.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                self.out.rename(old)
                tmp.rename(self.out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(self.out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.out / PAGE_NAME


def _check_out(out: Path) -> None:
    """Refuse an ``--out`` that is a file, or a folder that is not one of our reports."""
    if out.is_file():
        raise UserInputError(f"--out {out}: is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        page = out / PAGE_NAME
        try:
            ours = f'content="{GENERATOR}"' in page.read_text(encoding="utf-8", errors="replace")[:2000]
        except OSError:
            ours = False
        if not ours:
            raise UserInputError(f"--out {out}: folder exists and holds no serialgen report; "
                                 "give an empty or new folder")

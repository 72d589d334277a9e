"""Stage II pair building: run a standardizer over a corpus of real images on Ray Data, write pair shards.

``serialgen standardize --checkpoint CK --input CORPUS --out PAIRS`` on a folder (or on WebDataset
shards) lands here. The corpus is listed and sorted, cut into shards of ``samples_per_shard`` inputs
(shard i always holds the same inputs, so names are deterministic and retries idempotent), and the
shards not yet complete in PAIRS become rows of a Ray dataset. ``map_batches`` runs a pool of
:class:`ShardBuilder` actors (one per GPU on a cluster, CPU here); each actor loads the standardizer
once, builds whole shards (micro-batches of ``batch_size`` images through the model) and writes them
straight to PAIRS (temp name + rename), returning only a small manifest. Rerunning skips complete
shards; ``plan.json`` pins the input list so a rerun against a changed corpus is refused, not mixed.

Inputs:
* a folder of images (``.jpg .jpeg .png .webp``, recursive, hidden entries ignored); captions from a
  sidecar ``NAME.txt`` (the caption) or ``NAME.json`` (``caption`` / ``text`` / ``prompt``; also
  ``identity`` / ``character_id`` / ``character``); without a sidecar identity the image's subfolder is
  its identity (``corpus/alice/1.jpg`` -> ``alice``);
* WebDataset tars (a ``.tar`` or a folder of them): image member ``jpg``/``jpeg``/``png``/``webp``/
  ``target.jpg``/``ref.png``, caption ``txt``/``caption.txt``, metadata ``json``/``meta.json``.

Images of one identity reference each other as ``alt_ref.jpg`` (the next image of the identity, in
order), which the ``paired-one-stage`` baseline trains on. Unreadable inputs are skipped, counted and
listed with a reason in the shard sidecar; they never stop the run.

Standardizers (``--checkpoint``): a Stage I checkpoint folder
(:class:`serialgen.training.stage1.pipeline.Stage1Standardizer`); ``identity`` (NOT a standardizer: the
image letterboxed to ``--resolution``, default 512x768, on white; for tests and as a no-standardization
control); or ``module:function`` returning a callable (list of PIL -> list of PIL) when called with ``device=``.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from serialgen.errors import UserInputError
from serialgen.imaging import flatten_on_white, letterbox
from serialgen.resolution import DEFAULT_RESOLUTION, format_resolution

__all__ = [
    "SourceItem",
    "IdentityStandardizer",
    "load_standardizer",
    "discover_inputs",
    "ShardBuilder",
    "build_pairs",
    "add_pair_arguments",
    "run_build_pairs",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
_SHARD_IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp", "target.jpg", "ref.png", "image.jpg", "image.png")
_SHARD_CAPTION_MEMBERS = ("txt", "caption.txt", "caption")
_SHARD_JSON_MEMBERS = ("json", "meta.json")


# ----------------------------------------------------------------------------------------- standardizers

class IdentityStandardizer:
    """NOT a standardizer: letterboxes each image to ``resolution`` on white, nothing else.

    A clearly labelled stand-in so pair building and Stage II can be exercised without a Stage I
    checkpoint, and a no-standardization control (the reference is the raw image, only resized).
    """

    def __init__(self, resolution: tuple[int, int] = DEFAULT_RESOLUTION):
        self.resolution = tuple(resolution)
        self.name = f"identity (no standardization: letterbox to {format_resolution(self.resolution)} on white)"

    def __call__(self, images: Sequence[Any], seed: int | None = None) -> list[Any]:
        return [letterbox(im.convert("RGB"), self.resolution)[0] for im in images]


def load_standardizer(spec: str, device: str = "cpu", *, resolution: tuple[int, int] | None = None,
                      **options: Any) -> Callable[..., list[Any]]:
    """``identity`` | ``module:function`` (called with ``device=``) | a Stage I checkpoint folder.

    ``resolution``: the output size (None: the checkpoint config's, or 512x768 for ``identity``).
    ``options`` go to the Stage I standardizer (dwpose_det, dwpose_pose, white_threshold, steps, guidance).
    """
    if spec == "identity":
        return IdentityStandardizer(resolution or DEFAULT_RESOLUTION)
    if ":" in spec and not Path(spec).exists():
        mod_name, _, fn_name = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as exc:
            raise UserInputError(f"--checkpoint: cannot import standardizer factory {spec!r} ({exc})") from None
        std = fn(device=device)
        if not hasattr(std, "name"):
            std.name = spec  # type: ignore[attr-defined]
        return std
    p = Path(spec).expanduser()
    if not p.is_dir():
        raise UserInputError(f"--checkpoint: {spec} not found; expected a Stage I checkpoint folder, 'identity' or module:function")
    from serialgen.training.stage1.pipeline import Stage1Standardizer

    return Stage1Standardizer(p, device=device, resolution=resolution,
                              **{k: v for k, v in options.items() if v is not None})


# ----------------------------------------------------------------------------------------- inputs

@dataclass
class SourceItem:
    """One corpus image: where it is, its caption and identity, and its ordinal in the sorted corpus."""

    source: str  # relative path, or "<tar name>#<key>"
    path: str  # file, or tar path
    member: str | None  # tar member name of the image, or None for a file
    caption: str
    identity: str | None
    ordinal: int = 0
    alt: int | None = None  # ordinal of another image of the same identity


def _sidecar(image: Path) -> tuple[str, str | None]:
    caption, identity = "", None
    txt, js = image.with_suffix(".txt"), image.with_suffix(".json")
    if js.is_file():
        try:
            data = json.loads(js.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = {}
        if isinstance(data, dict):
            caption = str(next((data[k] for k in ("caption", "text", "prompt") if isinstance(data.get(k), str)), ""))
            ident = next((data[k] for k in ("identity", "character_id", "character") if data.get(k) not in (None, "")), None)
            identity = None if ident is None else str(ident)
    if txt.is_file():
        caption = txt.read_text(encoding="utf-8", errors="replace").strip()
    return caption, identity


def _tar_items(tar_path: Path) -> list[SourceItem]:
    import tarfile

    groups: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    with tarfile.open(tar_path, "r:*") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, _, ext = info.name.rsplit("/", 1)[-1].partition(".")
            if key not in groups:
                groups[key] = {}
                order.append(key)
            if ext in _SHARD_CAPTION_MEMBERS or ext in _SHARD_JSON_MEMBERS:
                f = tar.extractfile(info)
                groups[key][ext] = f.read() if f else b""
            else:
                groups[key].setdefault("_members", {})[ext] = info.name
    items = []
    for key in order:
        g = groups[key]
        members = g.get("_members", {})
        image_ext = next((e for e in _SHARD_IMAGE_MEMBERS if e in members), None)
        if image_ext is None:
            continue
        caption, identity = "", None
        for e in _SHARD_JSON_MEMBERS:
            if e in g:
                try:
                    meta = json.loads(g[e].decode("utf-8"))
                except ValueError:
                    meta = {}
                if isinstance(meta, dict):
                    caption = str(meta.get("caption") or meta.get("text") or "")
                    ident = meta.get("identity") or meta.get("character_id") or meta.get("character")
                    identity = None if ident is None else str(ident)
        for e in _SHARD_CAPTION_MEMBERS:
            if e in g:
                caption = g[e].decode("utf-8", errors="replace").strip()
        items.append(SourceItem(f"{tar_path.name}#{key}", str(tar_path), members[image_ext], caption, identity))
    return items


def discover_inputs(path: str | Path) -> list[SourceItem]:
    """The sorted corpus under ``path`` with ordinals and alt-reference links filled in."""
    root = Path(path).expanduser()
    if not root.exists():
        raise UserInputError(f"--input: {root} not found; expected a folder of images or WebDataset .tar shards")
    items: list[SourceItem] = []
    if root.is_file():
        if root.suffix != ".tar":
            raise UserInputError(f"--input: {root} is a single file; pair building needs a folder of images or .tar shards")
        items = _tar_items(root)
    else:
        tars, images = [], []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in filenames:
                if name.startswith("."):
                    continue
                f = Path(dirpath) / name
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    images.append(f)
                elif f.suffix == ".tar":
                    tars.append(f)
        if images:
            for f in images:
                rel = f.relative_to(root).as_posix()
                caption, identity = _sidecar(f)
                if identity is None and "/" in rel:
                    identity = rel.rsplit("/", 1)[0]
                items.append(SourceItem(rel, str(f), None, caption, identity))
        else:
            for t in sorted(tars):
                items.extend(_tar_items(t))
    if not items:
        raise UserInputError(f"--input: {root} holds no images ({', '.join(IMAGE_SUFFIXES)}) and no image shards")
    items.sort(key=lambda it: it.source)
    groups: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        it.ordinal = i
        if it.identity is not None:
            groups.setdefault(it.identity, []).append(i)
    for members in groups.values():
        if len(members) > 1:
            for j, i in enumerate(members):
                items[i].alt = members[(j + 1) % len(members)]
    return items


def _plan_shards(items: Sequence[SourceItem], samples_per_shard: int) -> list[dict[str, Any]]:
    """Jobs ``{"index": i, "items": JSON list}``; shard i holds inputs [i*n, (i+1)*n) plus their alt refs."""
    jobs = []
    for index, s0 in enumerate(range(0, len(items), samples_per_shard)):
        chunk = []
        for it in items[s0 : s0 + samples_per_shard]:
            row = asdict(it)
            row["alt_item"] = None if it.alt is None else asdict(items[it.alt])
            chunk.append(row)
        jobs.append({"index": index, "items": json.dumps(chunk)})
    return jobs


def _plan_fingerprint(items: Sequence[SourceItem], samples_per_shard: int) -> str:
    h = hashlib.sha256(str(samples_per_shard).encode())
    for it in items:
        h.update(f"{it.source}\0{it.caption}\0{it.identity}\n".encode("utf-8"))
    return h.hexdigest()


# ----------------------------------------------------------------------------------------- building

def _read_source(row: dict[str, Any]) -> tuple[Any, bytes]:
    """(RGB PIL image, JPEG bytes for target.jpg) of one input; raises OSError/ValueError if unreadable.

    JPEG inputs are stored byte-for-byte unless EXIF rotates them; other formats (and transparent
    images, flattened onto white) are re-encoded as JPEG quality 95.
    """
    import tarfile

    from PIL import Image, ImageOps

    if row["member"] is None:
        data = Path(row["path"]).read_bytes()
    else:
        with tarfile.open(row["path"], "r:*") as tar:
            f = tar.extractfile(row["member"])
            if f is None:
                raise OSError(f"member {row['member']} missing")
            data = f.read()
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        fmt = im.format
        exif_rotated = im.getexif().get(0x0112, 1) not in (1, None)
        rgb = flatten_on_white(ImageOps.exif_transpose(im))
    if fmt == "JPEG" and not exif_rotated:
        return rgb, data
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=95)
    return rgb, buf.getvalue()


class ShardBuilder:
    """Ray Data actor: loads the standardizer once, then builds whole pair shards from job rows."""

    def __init__(self, standardizer: str, out_dir: str, batch_size: int = 8, device: str | None = None,
                 seed: int = 0, options: dict[str, Any] | None = None):
        import torch

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.set_num_threads(max(1, int(os.environ.get("SERIALGEN_TORCH_THREADS", "1"))))
        self.std = load_standardizer(standardizer, device=device, **(options or {}))
        self.std_name = getattr(self.std, "name", standardizer)
        self.out_dir, self.batch_size, self.seed = out_dir, int(batch_size), int(seed)

    def _seed(self, ordinal: int) -> int:
        # A function of the run seed and the first input's ordinal: rebuilding a shard redraws the same noise.
        return (self.seed * 1_000_003 + int(ordinal)) % (2**63 - 1)

    def build(self, index: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
        from serialgen.dataset.pairs import PairShardWriter, make_key

        with PairShardWriter(self.out_dir, index) as writer:
            for b0 in range(0, len(rows), self.batch_size):
                loaded = []
                for row in rows[b0 : b0 + self.batch_size]:
                    try:
                        image, target_bytes = _read_source(row)
                    except Exception as exc:  # noqa: BLE001 - any decoder failure: skip this input, keep going
                        writer.skip(row["source"], f"unreadable image: {type(exc).__name__}: {exc}"[:300])
                        continue
                    alt_bytes = None
                    if row.get("alt_item"):
                        try:
                            alt_bytes = _read_source(row["alt_item"])[1]
                        except Exception:  # noqa: BLE001 - an unreadable alt only loses the alt reference
                            alt_bytes = None
                    loaded.append((row, image, target_bytes, alt_bytes))
                if not loaded:
                    continue
                try:
                    standardized = self.std([x[1] for x in loaded], seed=self._seed(loaded[0][0]["ordinal"]))
                except Exception as exc:  # noqa: BLE001 - retry one by one so one bad image costs one pair
                    standardized = []
                    for x in loaded:
                        try:
                            standardized.append(self.std([x[1]], seed=self._seed(x[0]["ordinal"]))[0])
                        except Exception as exc1:  # noqa: BLE001
                            standardized.append(None)
                            writer.skip(x[0]["source"], f"standardizer failed: {type(exc1).__name__}: {exc1}"[:300])
                    del exc
                for (row, image, target_bytes, alt_bytes), std in zip(loaded, standardized):
                    if std is None:
                        continue
                    meta = {
                        "source": row["source"], "identity": row["identity"], "standardizer": self.std_name,
                        "target_size": list(image.size), "std_size": list(std.size),
                        "alt_source": row["alt_item"]["source"] if alt_bytes is not None else None,
                    }
                    writer.add(make_key(row["ordinal"], row["source"]), std, target_bytes, row["caption"], meta,
                               alt_ref=alt_bytes)
        return writer.stats.to_json()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, list] = {"name": [], "samples": [], "skipped": []}
        for index, items in zip(batch["index"], batch["items"]):
            stats = self.build(int(index), json.loads(str(items)))
            out["name"].append(stats["path"])
            out["samples"].append(stats["samples"])
            out["skipped"].append(json.dumps(stats["skipped"]))
        return out


def build_pairs(
    input_path: str | Path,
    out_dir: str | Path,
    *,
    standardizer: str = "identity",
    samples_per_shard: int = 1000,
    batch_size: int = 8,
    workers: int | None = None,
    gpus_per_worker: float = 0.0,
    address: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    standardizer_options: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Build (or finish) a pair set; returns a report (shards built/kept, pairs, skipped and why, pairs/s).

    ``standardizer_options`` reach :func:`load_standardizer` (resolution, and for a Stage I checkpoint
    dwpose_det, dwpose_pose, white_threshold, steps, guidance); ``seed`` seeds its sampling per micro-batch so a rebuilt shard is identical.
    """
    from tqdm import tqdm

    from serialgen.dataset.pairs import completed_shards, shard_name, write_index

    if samples_per_shard < 1 or batch_size < 1:
        raise UserInputError("--samples-per-shard and --batch-size must be >= 1")
    t0 = time.perf_counter()
    items = discover_inputs(input_path)
    if limit is not None:
        items = items[: int(limit)]
        for it in items:  # alt links must stay inside the limited corpus
            if it.alt is not None and it.alt >= len(items):
                it.alt = None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = _plan_fingerprint(items, samples_per_shard)
    plan_file = out / "plan.json"
    if plan_file.is_file():
        old = json.loads(plan_file.read_text(encoding="utf-8"))
        if old.get("fingerprint") != fingerprint:
            raise UserInputError(
                f"--out: {out} holds pairs of a different input list or shard size; use a new --out (or delete it)"
            )
    else:
        plan_file.write_text(json.dumps({"input": str(Path(input_path).resolve()), "samples": len(items),
                                         "samples_per_shard": samples_per_shard, "fingerprint": fingerprint}, indent=1))
    jobs = _plan_shards(items, samples_per_shard)
    done = completed_shards(out)
    todo = [j for j in jobs if shard_name(j["index"]) not in done]
    built: list[dict[str, Any]] = []
    if todo:
        import ray

        started = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "ignore_reinit_error": True}
            if address:
                kwargs["address"] = address
            else:
                kwargs["num_cpus"] = os.cpu_count() or 1
            ray.init(**kwargs)
            started = True
        try:
            n_workers = workers or (max(1, int(ray.cluster_resources().get("GPU", 0) // gpus_per_worker))
                                    if gpus_per_worker else 1)
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False
            ds = ray.data.from_items(todo, override_num_blocks=len(todo)).map_batches(
                ShardBuilder,
                fn_constructor_kwargs={"standardizer": standardizer, "out_dir": str(out.resolve()),
                                       "batch_size": batch_size, "seed": seed, "options": standardizer_options or {}},
                batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=min(n_workers, len(todo))),
                num_gpus=gpus_per_worker or None,
                num_cpus=1,
            )
            with tqdm(total=len(todo), desc="pair shards", unit="shard", disable=not progress) as bar:
                for row in ds.iter_rows():
                    built.append({"name": row["name"], "samples": int(row["samples"]), "skipped": json.loads(row["skipped"])})
                    bar.update(1)
        finally:
            if started:
                ray.shutdown()
    identity_size = (standardizer_options or {}).get("resolution") or DEFAULT_RESOLUTION
    std_name = standardizer if standardizer != "identity" else IdentityStandardizer(identity_size).name
    index = write_index(out, {"built_by": "serialgen standardize", "standardizer": std_name,
                              "input": str(Path(input_path).resolve()), "samples_per_shard": samples_per_shard})
    reasons: dict[str, int] = {}
    for info in completed_shards(out).values():
        for s in info.get("skipped", []):
            reason = s["reason"].split(":")[0]
            reasons[reason] = reasons.get(reason, 0) + 1
    seconds = time.perf_counter() - t0
    new_pairs = sum(b["samples"] for b in built)
    return {
        "out": str(out),
        "inputs": len(items),
        "shards": len(jobs),
        "shards_built": len(built),
        "shards_kept": len(jobs) - len(todo),
        "pairs": index["samples"],
        "pairs_built_now": new_pairs,
        "skipped": index["skipped"],
        "skip_reasons": reasons,
        "with_alt_ref": sum(1 for it in items if it.alt is not None),
        "seconds": round(seconds, 2),
        "pairs_per_s": round(new_pairs / seconds, 2) if seconds > 0 else 0.0,
        "standardizer": std_name,
    }


# ----------------------------------------------------------------------------------------- CLI glue

def add_pair_arguments(parser: Any) -> None:
    """Add the pair-building options to ``serialgen standardize``, whose ``--batch-size``, ``--seed``,
    ``--resolution``, ``--steps``, ``--guidance``, ``--white-threshold`` and ``--dwpose-*`` they share.

    ``--pairs`` switches the command to pair building; the other options only matter then.
    """
    g = parser.add_argument_group("Stage II pair building (--pairs: --input is a folder of real images or .tar shards)")
    g.add_argument("--pairs", action="store_true",
                   help="write Stage II pair shards (std_ref.png, target.jpg, caption.txt, meta.json) to --out, on Ray Data")
    g.add_argument("--samples-per-shard", type=int, default=1000, help="inputs per pair shard (default 1000)")
    g.add_argument("--workers", type=int, default=None,
                   help="standardizer actors (default: 1, or one per GPU with --gpus-per-worker)")
    g.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per actor on a cluster (default 0: CPU)")
    g.add_argument("--address", default=None, help="Ray cluster address (default: a local Ray)")
    g.add_argument("--limit", type=int, default=None, help="only the first N inputs (sorted)")
    g.add_argument("--json", action="store_true", help="print the report as JSON")


def run_build_pairs(args: Any) -> int:
    """Handler body for ``serialgen standardize --pairs`` (``standardize``'s arguments plus
    :func:`add_pair_arguments`)."""
    options = {k: getattr(args, k) for k in ("resolution", "dwpose_det", "dwpose_pose", "white_threshold", "steps",
                                             "guidance")}
    report = build_pairs(
        args.input, args.out, standardizer=args.checkpoint, samples_per_shard=args.samples_per_shard,
        batch_size=args.batch_size, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
        address=args.address, limit=args.limit, seed=args.seed,
        standardizer_options=options, progress=not args.json,
    )
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(
            f"pairs: {report['pairs']} in {report['shards']} shards at {report['out']} "
            f"({report['shards_built']} built now, {report['shards_kept']} kept; {report['skipped']} inputs skipped"
            + (f": {report['skip_reasons']}" if report["skip_reasons"] else "")
            + f"; {report['pairs_per_s']} pairs/s; standardizer {report['standardizer']})"
        )
    return 0

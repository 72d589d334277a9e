"""Stage II pair building: run a standardizer over a corpus of real images on Ray Data, write pair shards.

``serialgen pairs build --checkpoint CK --input CORPUS --out PAIRS`` (a folder, or WebDataset shards)
lands here. The corpus is listed and sorted, cut into shards of ``samples_per_shard`` inputs
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

Each picture's Stage I mask and pose come from the person estimator (MediaPipe, docs/estimator.md)
unless told otherwise (``--mask threshold`` / ``--pose blank`` must be asked for), and every pair's
``meta.json`` says where they came from (``mask_source``, ``pose_source``) with the estimate's
confidence, people count and person height. A :class:`SkipPolicy` skips, with a reason in the shard
sidecar and the report, pictures where no person was found, several people were, the person is too
small or the pose confidence too low (stylised characters are often not found: the report gives the
skip rate per reason).

Images of one identity reference each other as ``alt_ref.jpg`` (the next image of the identity, in
order), which the ``paired-one-stage`` baseline trains on. Unreadable inputs are skipped, counted and
listed with a reason in the shard sidecar; they never stop the run.

Standardizers (``--checkpoint``): a Stage I checkpoint folder (its
:class:`serialgen.training.stage1.pipeline.StandardizePipeline` in ``--dtype``, fed the prepared
references); ``identity`` (NOT a standardizer: the
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
    "SkipPolicy",
    "IdentityStandardizer",
    "CheckpointStandardizer",
    "load_standardizer",
    "discover_inputs",
    "ShardBuilder",
    "build_pairs",
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


@dataclass(frozen=True)
class SkipPolicy:
    """Which pictures become pairs. ``no_person`` / ``several_people``: "skip" (default) or "keep" (a
    kept picture without a person gets Stage I's "no estimate" inputs: zero mask, black pose, recorded
    as ``none``). ``min_height``: the person's box height over the picture's (0: any size);
    ``min_confidence``: the estimate's pose confidence (0: any; default 0.6: on renders, estimates
    under 0.7 had PCK@0.1 near 0.2, and BlazePose's skeletons on chibis score about 0.5). Checked
    only where the estimator ran."""

    no_person: str = "skip"
    several_people: str = "skip"
    min_height: float = 0.2
    min_confidence: float = 0.6

    def __post_init__(self):
        for flag, value in (("--no-person", self.no_person), ("--several-people", self.several_people)):
            if value not in ("skip", "keep"):
                raise UserInputError(f"{flag} {value}: expected skip or keep")
        for flag, value in (("--min-person-height", self.min_height), ("--min-confidence", self.min_confidence)):
            if not 0.0 <= value <= 1.0:
                raise UserInputError(f"{flag} {value}: expected a fraction in [0, 1]")

    def reason(self, estimate) -> str | None:
        """Why this estimate's picture is skipped (the reason's first words name the rule), or None."""
        if estimate is None:
            return None
        if not estimate.person:
            return "no person found" if self.no_person == "skip" else None
        if estimate.people > 1 and self.several_people == "skip":
            return f"several people: {estimate.people} faces"
        if estimate.height_fraction() < self.min_height:
            return f"person too small: {estimate.height_fraction():.2f} of the height < {self.min_height:g}"
        if estimate.confidence < self.min_confidence:
            return f"low pose confidence: {estimate.confidence:.2f} < {self.min_confidence:g}"
        return None


class CheckpointStandardizer:
    """A Stage I checkpoint run on prepared references (``ReferencePreparer`` output: image, mask,
    pose), so the pair builder decides and records where each mask and pose came from."""

    takes_references = True

    def __init__(self, checkpoint: Path, device: str = "cpu", *, resolution: tuple[int, int] | None = None,
                 steps: int | None = None, guidance: float | None = None, dtype: str | None = None):
        from serialgen.training.stage1.pipeline import StandardizePipeline, inference_dtype

        self.pipeline = StandardizePipeline.from_checkpoint(checkpoint, device=device, dtype=inference_dtype(dtype, device),
                                                            num_inference_steps=steps, guidance_scale=guidance,
                                                            resolution=resolution)
        self.resolution = tuple(self.pipeline.resolution)
        self.name = f"stage1:{Path(checkpoint).resolve()}"

    def __call__(self, references: Sequence[dict], seed: int | None = None) -> list[Any]:
        import torch
        from PIL import Image

        from serialgen.training.common.run_log import to_uint8_image

        generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        out = self.pipeline(torch.stack([r["ref"] for r in references]), torch.stack([r["ref_mask"] for r in references]),
                            torch.stack([r["ref_pose"] for r in references]), generator=generator)
        return [Image.fromarray(to_uint8_image(x, (0, 1))) for x in out]


def load_standardizer(spec: str, device: str = "cpu", *, resolution: tuple[int, int] | None = None,
                      **options: Any) -> Callable[..., list[Any]]:
    """``identity`` | ``module:function`` (called with ``device=``) | a Stage I checkpoint folder.

    ``resolution``: the output size (None: the checkpoint config's, or 512x768 for ``identity``).
    ``options`` go to :class:`CheckpointStandardizer` (steps, guidance, dtype).
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
    return CheckpointStandardizer(p, device=device, resolution=resolution,
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


def _plan_fingerprint(items: Sequence[SourceItem], samples_per_shard: int, settings: dict[str, Any]) -> str:
    h = hashlib.sha256(str(samples_per_shard).encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    for it in items:
        h.update(f"{it.source}\0{it.caption}\0{it.identity}\n".encode("utf-8"))
    return h.hexdigest()


# ----------------------------------------------------------------------------------------- building

def _read_source(row: dict[str, Any]) -> tuple[Any, bytes]:
    """(PIL image for the reference: RGBA when the file has transparency, else RGB; JPEG bytes for
    target.jpg) of one input; raises OSError/ValueError if unreadable.

    JPEG inputs are stored byte-for-byte unless EXIF rotates them; other formats (and transparent
    images, flattened onto white) are re-encoded as JPEG quality 95. The reference keeps the alpha
    channel: it is the picture's exact mask (``mask_source`` "alpha").
    """
    import tarfile

    from PIL import Image, ImageOps

    from serialgen.imaging import has_alpha

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
        upright = ImageOps.exif_transpose(im)
        picture = upright.convert("RGBA") if has_alpha(upright) else upright.convert("RGB")
        rgb = flatten_on_white(upright)
    if fmt == "JPEG" and not exif_rotated:
        return picture, data
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=95)
    return picture, buf.getvalue()


def _estimate_meta(estimate, estimator_name: str | None) -> dict[str, Any] | None:
    if estimate is None:
        return None
    return {"estimator": estimator_name, "person": bool(estimate.person), "confidence": round(float(estimate.confidence), 4),
            "people": int(estimate.people), "height_fraction": round(float(estimate.height_fraction()), 4),
            "keypoints_visible": int(estimate.pose.visible.sum()),
            "box": None if estimate.box is None else [round(float(v), 1) for v in estimate.box]}


class ShardBuilder:
    """Ray Data actor: loads the standardizer and the person estimator once, then builds whole pair
    shards from job rows.

    ``options``: the standardizer's (resolution, steps, guidance, dtype). ``reference``:
    :class:`serialgen.training.stage1.reference_inputs.ReferencePreparer`'s (mask, pose,
    white_threshold, dwpose_det, dwpose_pose). ``policy``: :class:`SkipPolicy`'s fields.
    """

    def __init__(self, standardizer: str, out_dir: str, batch_size: int = 8, device: str | None = None,
                 seed: int = 0, options: dict[str, Any] | None = None, reference: dict[str, Any] | None = None,
                 policy: dict[str, Any] | None = None):
        import torch

        from serialgen.training.stage1.reference_inputs import ReferencePreparer

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.set_num_threads(max(1, int(os.environ.get("SERIALGEN_TORCH_THREADS", "1"))))
        self.std = load_standardizer(standardizer, device=device, **(options or {}))
        self.std_name = getattr(self.std, "name", standardizer)
        self.resolution = tuple(getattr(self.std, "resolution", None) or (options or {}).get("resolution")
                                or DEFAULT_RESOLUTION)
        self.prepare = ReferencePreparer(**(reference or {}))
        self.policy = SkipPolicy(**(policy or {}))
        self.out_dir, self.batch_size, self.seed = out_dir, int(batch_size), int(seed)

    def _seed(self, ordinal: int) -> int:
        # A function of the run seed and the first input's ordinal: rebuilding a shard redraws the same noise.
        return (self.seed * 1_000_003 + int(ordinal)) % (2**63 - 1)

    def _standardize(self, loaded: list, seed: int) -> list:
        if getattr(self.std, "takes_references", False):
            return self.std([x[4] for x in loaded], seed=seed)
        return self.std([flatten_on_white(x[1]) for x in loaded], seed=seed)

    def build(self, index: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
        from serialgen.dataset.pairs import PairShardWriter, make_key

        sources: dict[str, int] = {}
        with PairShardWriter(self.out_dir, index) as writer:
            for b0 in range(0, len(rows), self.batch_size):
                loaded = []
                for row in rows[b0 : b0 + self.batch_size]:
                    try:
                        image, target_bytes = _read_source(row)
                    except Exception as exc:  # noqa: BLE001 - any decoder failure: skip this input, keep going
                        writer.skip(row["source"], f"unreadable image: {type(exc).__name__}: {exc}"[:300])
                        continue
                    reference = self.prepare(image, self.resolution)
                    reason = self.policy.reason(reference["estimate"])
                    if reason is not None:
                        writer.skip(row["source"], reason)
                        continue
                    alt_bytes = None
                    if row.get("alt_item"):
                        try:
                            alt_bytes = _read_source(row["alt_item"])[1]
                        except Exception:  # noqa: BLE001 - an unreadable alt only loses the alt reference
                            alt_bytes = None
                    loaded.append((row, image, target_bytes, alt_bytes, reference))
                if not loaded:
                    continue
                try:
                    standardized = self._standardize(loaded, self._seed(loaded[0][0]["ordinal"]))
                except Exception as exc:  # noqa: BLE001 - retry one by one so one bad image costs one pair
                    standardized = []
                    for x in loaded:
                        try:
                            standardized.append(self._standardize([x], self._seed(x[0]["ordinal"]))[0])
                        except Exception as exc1:  # noqa: BLE001
                            standardized.append(None)
                            writer.skip(x[0]["source"], f"standardizer failed: {type(exc1).__name__}: {exc1}"[:300])
                    del exc
                for (row, image, target_bytes, alt_bytes, reference), std in zip(loaded, standardized):
                    if std is None:
                        continue
                    meta = {
                        "source": row["source"], "identity": row["identity"], "standardizer": self.std_name,
                        "target_size": list(image.size), "std_size": list(std.size),
                        "alt_source": row["alt_item"]["source"] if alt_bytes is not None else None,
                        "mask_source": reference["mask_source"], "pose_source": reference["pose_source"],
                        "estimate": _estimate_meta(reference["estimate"], self.prepare.estimator_name),
                    }
                    tally = f"mask {reference['mask_source']}, pose {reference['pose_source']}"
                    sources[tally] = sources.get(tally, 0) + 1
                    writer.add(make_key(row["ordinal"], row["source"]), std, target_bytes, row["caption"], meta,
                               alt_ref=alt_bytes)
        return writer.stats.to_json() | {"sources": sources}

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, list] = {"name": [], "samples": [], "skipped": [], "sources": []}
        for index, items in zip(batch["index"], batch["items"]):
            stats = self.build(int(index), json.loads(str(items)))
            out["name"].append(stats["path"])
            out["samples"].append(stats["samples"])
            out["skipped"].append(json.dumps(stats["skipped"]))
            out["sources"].append(json.dumps(stats["sources"]))
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
    reference_options: dict[str, Any] | None = None,
    policy: SkipPolicy | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Build (or finish) a pair set; returns a report (shards built/kept, pairs, skipped and why, the
    skip rate, where the new pairs' masks and poses came from, pairs/s).

    ``standardizer_options`` reach :func:`load_standardizer` (resolution; for a Stage I checkpoint
    steps, guidance, dtype); ``reference_options`` the ``ReferencePreparer`` (mask, pose,
    white_threshold, dwpose_det, dwpose_pose; default: the estimator for both, so a missing estimator
    is an error, never a silent threshold mask); ``policy`` the :class:`SkipPolicy`. ``seed`` seeds the
    sampling per micro-batch so a rebuilt shard is identical.
    """
    from tqdm import tqdm

    from serialgen.dataset.pairs import completed_shards, shard_name, write_index
    from serialgen.dataset.person_estimate import SETUP_HINT, EstimatorUnavailable, estimator_python
    from serialgen.ray_local import init_ray
    from serialgen.training.stage1.reference_inputs import ReferencePreparer

    if samples_per_shard < 1 or batch_size < 1:
        raise UserInputError("--samples-per-shard and --batch-size must be >= 1")
    reference_options = {"mask": "estimator", "pose": "estimator"} | dict(reference_options or {})
    policy = policy or SkipPolicy()
    t0 = time.perf_counter()
    items = discover_inputs(input_path)
    # Checked here, in the driver, so a missing estimator or DWPose file is one line before Ray starts.
    if "estimator" in (reference_options.get("mask"), reference_options.get("pose")) and estimator_python() is None:
        raise EstimatorUnavailable(f"--mask/--pose estimator: the person estimator is not set up: {SETUP_HINT} "
                                   "(or pass --mask threshold --pose blank to build without it)")
    ReferencePreparer(**reference_options, estimator=_NoEstimator()).close()
    if limit is not None:
        items = items[: int(limit)]
        for it in items:  # alt links must stay inside the limited corpus
            if it.alt is not None and it.alt >= len(items):
                it.alt = None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # What decides which pictures become pairs is part of the plan: a rerun with another policy or
    # mask/pose source into the same folder is refused, not mixed.
    settings = {"reference": reference_options, "policy": asdict(policy)}
    fingerprint = _plan_fingerprint(items, samples_per_shard, settings)
    plan_file = out / "plan.json"
    if plan_file.is_file():
        old = json.loads(plan_file.read_text(encoding="utf-8"))
        if old.get("fingerprint") != fingerprint:
            raise UserInputError(
                f"--out: {out} holds pairs of a different input list, shard size, mask/pose source or skip policy; "
                "use a new --out (or delete it)"
            )
    else:
        plan_file.write_text(json.dumps({"input": str(Path(input_path).resolve()), "samples": len(items),
                                         "samples_per_shard": samples_per_shard, "settings": settings,
                                         "fingerprint": fingerprint}, indent=1))
    jobs = _plan_shards(items, samples_per_shard)
    done = completed_shards(out)
    todo = [j for j in jobs if shard_name(j["index"]) not in done]
    built: list[dict[str, Any]] = []
    if todo:
        import ray

        started = init_ray(address, log_to_driver=False, **({} if address else {"num_cpus": os.cpu_count() or 1}))
        try:
            n_workers = workers or (max(1, int(ray.cluster_resources().get("GPU", 0) // gpus_per_worker))
                                    if gpus_per_worker else 1)
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False
            ds = ray.data.from_items(todo, override_num_blocks=len(todo)).map_batches(
                ShardBuilder,
                fn_constructor_kwargs={"standardizer": standardizer, "out_dir": str(out.resolve()),
                                       "batch_size": batch_size, "seed": seed, "options": standardizer_options or {},
                                       "reference": reference_options, "policy": asdict(policy)},
                batch_size=1,
                compute=ray.data.ActorPoolStrategy(size=min(n_workers, len(todo))),
                num_gpus=gpus_per_worker or None,
                num_cpus=1,
            )
            with tqdm(total=len(todo), desc="pair shards", unit="shard", disable=not progress) as bar:
                for row in ds.iter_rows():
                    built.append({"name": row["name"], "samples": int(row["samples"]),
                                  "skipped": json.loads(row["skipped"]), "sources": json.loads(row["sources"])})
                    bar.update(1)
        finally:
            if started:
                ray.shutdown()
    identity_size = (standardizer_options or {}).get("resolution") or DEFAULT_RESOLUTION
    std_name = standardizer if standardizer != "identity" else IdentityStandardizer(identity_size).name
    index = write_index(out, {"built_by": "serialgen pairs build", "standardizer": std_name,
                              "input": str(Path(input_path).resolve()), "samples_per_shard": samples_per_shard,
                              "reference": reference_options, "policy": asdict(policy)})
    reasons: dict[str, int] = {}
    for info in completed_shards(out).values():
        for s in info.get("skipped", []):
            reason = s["reason"].split(":")[0]
            reasons[reason] = reasons.get(reason, 0) + 1
    sources: dict[str, int] = {}
    for b in built:
        for k, v in b["sources"].items():
            sources[k] = sources.get(k, 0) + v
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
        "skip_rate": round(index["skipped"] / len(items), 4) if items else 0.0,
        "skip_reasons": dict(sorted(reasons.items())),
        "sources_built_now": dict(sorted(sources.items())),
        "with_alt_ref": sum(1 for it in items if it.alt is not None),
        "seconds": round(seconds, 2),
        "pairs_per_s": round(new_pairs / seconds, 2) if seconds > 0 else 0.0,
        "standardizer": std_name,
    }


class _NoEstimator:
    """Stands in for the estimator while the driver only checks the options (the workers start theirs)."""

    name = None

    def __call__(self, image):  # pragma: no cover - never called: the check prepares no picture
        raise AssertionError("the option check prepares no picture")

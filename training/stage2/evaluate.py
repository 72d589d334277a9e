"""The paper's personalization metrics (Tables 1, 2, 4): CLIP-I, CLIP-T, AP-CLIP-I, Face Sim.

Definitions (cosines of L2-normalised embeddings):

* **CLIP-I** = 100 x cos(E(fg(generated)), E(fg(reference))), averaged over a reference's series. The
  background of both images is removed first (replaced by white) by a pluggable segmenter, as the
  paper does "to more precisely measure the similarity between two character images".
* **CLIP-T** = max(100 x cos(E(generated), T(prompt)), 0), averaged (torchmetrics' CLIPScore
  convention); the generated image keeps its background (the prompt describes it).
* **AP-CLIP-I** = the mean of 100 x cos(E(fg(a)), E(fg(b))) over unordered pairs of images of one
  reference's series; by default only pairs from *different prompts* (the paper: "appearance
  consistency among multiple outputs ... generated from different text prompts"), ``--ap-pairs all``
  counts every pair.
* **Face Sim** = cos(ArcFace(generated face), ArcFace(reference face)), on the paper's 0..1 scale (not
  x100); images where no face is found are left out and counted.

Images go to CLIP padded to a white square (the same choice as Stage II's reference encoder, see
:mod:`serialgen.training.stage2.ip_adapter`), so a full-body 2:3 image is not cropped at head and feet.
CLIP is a transformers ``CLIPModel`` from a local folder (the paper does not name one; ViT-L/14 is
the usual choice). Face Sim uses ArcFace ONNX files (e.g. insightface buffalo_l ``det_10g.onnx`` +
``w600k_r50.onnx``) through onnxruntime (optional extra ``faces``). Nothing is downloaded.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

from serialgen.errors import UserInputError

__all__ = [
    "Segmenter",
    "WhiteThresholdSegmenter",
    "MaskFolderSegmenter",
    "RembgSegmenter",
    "make_segmenter",
    "ClipScorer",
    "FaceEmbedder",
    "ArcFaceOnnx",
    "ap_clip_i",
    "SeriesScores",
    "evaluate_outputs",
    "format_table",
]


# ------------------------------------------------------------------------------------------ segmenters

class Segmenter(Protocol):
    name: str

    def __call__(self, image: Any, path: Path | None = None) -> Any:
        """RGB(A) PIL image (+ its file, for mask lookups) -> (H, W) bool numpy array, True = foreground."""


def _alpha_mask(image: Any):
    import numpy as np

    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        return np.asarray(image.convert("RGBA"))[..., 3] >= 128
    return None


class WhiteThresholdSegmenter:
    """Foreground = pixels with any channel below ``threshold`` (0..255); alpha wins when present.

    Right for images on a white background (standardized references, renders); a crude fallback for
    photographs, where the ``rembg`` or dataset-mask segmenters should be used.
    """

    def __init__(self, threshold: int = 240):
        self.threshold = int(threshold)
        self.name = f"white<{self.threshold}"

    def __call__(self, image: Any, path: Path | None = None) -> Any:
        import numpy as np

        alpha = _alpha_mask(image)
        if alpha is not None:
            return alpha
        return (np.asarray(image.convert("RGB")) < self.threshold).any(axis=-1)


class MaskFolderSegmenter:
    """Masks from a folder (e.g. the dataset's): ``<stem>.png`` or ``<stem>.mask.png``, white = foreground.

    Images without a mask file fall back to ``fallback`` (default: white threshold), and are counted.
    """

    def __init__(self, folder: str | Path, fallback: Segmenter | None = None):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise UserInputError(f"--segmenter masks:{folder}: folder not found")
        self.fallback = fallback or WhiteThresholdSegmenter()
        self.name = f"masks:{self.folder}"
        self.missing = 0

    def __call__(self, image: Any, path: Path | None = None) -> Any:
        import numpy as np
        from PIL import Image

        if path is not None:
            for cand in (self.folder / f"{path.stem}.png", self.folder / f"{path.stem}.mask.png"):
                if cand.is_file():
                    with Image.open(cand) as m:
                        mask = m.convert("L").resize(image.size, Image.NEAREST)
                    return np.asarray(mask) >= 128
        self.missing += 1
        return self.fallback(image, path)


class RembgSegmenter:
    """``rembg`` with a local ONNX model (e.g. u2net.onnx); optional, never downloads.

    rembg looks for ``<U2NET_HOME>/<model name>.onnx``; we point U2NET_HOME at the file's folder.
    """

    def __init__(self, model_path: str | Path):
        import os

        p = Path(model_path).expanduser()
        if not p.is_file():
            raise UserInputError(f"--segmenter rembg:{model_path}: model file not found (e.g. u2net.onnx)")
        try:
            import rembg  # noqa: F401
        except ImportError:
            raise UserInputError("--segmenter rembg needs the rembg package (pip install rembg onnxruntime)") from None
        os.environ["U2NET_HOME"] = str(p.parent)
        from rembg import new_session

        self._session = new_session(p.stem)
        self.name = f"rembg:{p.name}"

    def __call__(self, image: Any, path: Path | None = None) -> Any:
        import numpy as np
        from rembg import remove

        alpha = _alpha_mask(image)
        if alpha is not None:
            return alpha
        out = remove(image.convert("RGB"), session=self._session, only_mask=True)
        return np.asarray(out.convert("L")) >= 128


def make_segmenter(spec: str) -> Segmenter:
    """``white`` | ``white:T`` | ``masks:DIR`` | ``rembg:MODEL.onnx``."""
    kind, _, arg = spec.partition(":")
    if kind == "white":
        return WhiteThresholdSegmenter(int(arg) if arg else 240)
    if kind == "masks" and arg:
        return MaskFolderSegmenter(arg)
    if kind == "rembg" and arg:
        return RembgSegmenter(arg)
    raise UserInputError(f"--segmenter: {spec!r} is not one of white[:T], masks:DIR, rembg:MODEL.onnx")


def _remove_background(image: Any, mask: Any) -> Any:
    """Composite the foreground (mask True) onto white; RGB out."""
    import numpy as np
    from PIL import Image

    rgb = np.asarray(image.convert("RGB")).copy()
    rgb[~mask] = 255
    return Image.fromarray(rgb)


# ------------------------------------------------------------------------------------------ CLIP

class ClipScorer:
    """L2-normalised CLIP image / text embeddings from a local transformers CLIP folder."""

    def __init__(self, path: str | Path, device: str = "cpu", batch_size: int = 16):
        import torch
        from transformers import AutoTokenizer, CLIPModel

        from serialgen.dataset.clip_inputs import clip_processor

        p = Path(path).expanduser()
        if not (p / "config.json").is_file():
            raise UserInputError(
                f"--clip: {p} not found or not a model folder; expected a local transformers CLIP (config.json, "
                "weights, tokenizer), e.g. openai/clip-vit-large-patch14"
            )
        self.model = CLIPModel.from_pretrained(p, local_files_only=True).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
        self.processor = clip_processor(int(self.model.config.vision_config.image_size))
        self.device, self.batch_size, self.name = device, batch_size, str(p)
        self._torch = torch

    def images(self, images: Sequence[Any]) -> Any:
        """(N, D) unit vectors; each image padded to a white square first."""
        from serialgen.imaging import pad_to_square

        torch = self._torch
        out = []
        with torch.no_grad():
            for i in range(0, len(images), self.batch_size):
                chunk = [pad_to_square(im) for im in images[i : i + self.batch_size]]
                px = self.processor(images=chunk, return_tensors="pt").pixel_values.to(self.device)
                feats = self.model.get_image_features(pixel_values=px)
                feats = getattr(feats, "pooler_output", feats)
                out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu())
        return torch.cat(out)

    def texts(self, texts: Sequence[str]) -> Any:
        """(N, D) unit vectors (prompts truncated at CLIP's 77 tokens)."""
        torch = self._torch
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                tok = self.tokenizer(list(texts[i : i + self.batch_size]), padding=True, truncation=True,
                                     max_length=77, return_tensors="pt").to(self.device)
                feats = self.model.get_text_features(**tok)
                feats = getattr(feats, "pooler_output", feats)
                out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu())
        return torch.cat(out)


def ap_clip_i(embeddings: Any, groups: Sequence[Any] | None = None) -> float:
    """AP-CLIP-I: mean of 100 x cos over unordered pairs (i < j) of unit vectors ``embeddings`` (N, D).

    With ``groups`` (e.g. the prompt of each image), only pairs from different groups count.
    Returns NaN when there is no pair.
    """
    n = int(embeddings.shape[0])
    sims = []
    for i, j in itertools.combinations(range(n), 2):
        if groups is not None and groups[i] == groups[j]:
            continue
        sims.append(float((embeddings[i] * embeddings[j]).sum()))
    return 100.0 * sum(sims) / len(sims) if sims else float("nan")


# ------------------------------------------------------------------------------------------ faces

class FaceEmbedder(Protocol):
    name: str

    def __call__(self, image: Any) -> Any:
        """RGB PIL image -> unit identity vector (numpy, (D,)) of its largest face, or None."""


# ArcFace's canonical 5-point template for 112x112 crops (eyes, nose tip, mouth corners).
_ARCFACE_DST = [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]


class ArcFaceOnnx:
    """ArcFace identity embeddings through onnxruntime: SCRFD detection, 5-point alignment, recognition.

    ``det_path``: an SCRFD detector with keypoints (insightface ``det_10g.onnx``); ``rec_path``: an ArcFace
    recognition model (``w600k_r50.onnx``, 112x112 input, 512-d output). Both local files.
    """

    def __init__(self, det_path: str | Path, rec_path: str | Path, det_size: int = 640, det_threshold: float = 0.5):
        for flag, p in (("--face-det", det_path), ("--face-rec", rec_path)):
            if not Path(p).expanduser().is_file():
                raise UserInputError(f"{flag}: {p} not found; expected an ONNX file (insightface buffalo_l: det_10g.onnx, w600k_r50.onnx)")
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserInputError("Face Sim needs onnxruntime: pip install 'serialgen[faces]'") from None
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        self.det = ort.InferenceSession(str(det_path), providers=providers)
        self.rec = ort.InferenceSession(str(rec_path), providers=providers)
        self.det_size, self.det_threshold = det_size, det_threshold
        self.name = f"arcface:{Path(rec_path).name}"

    def _detect(self, rgb: Any) -> Any:
        """Keypoints (5, 2) of the highest-scoring face, or None (SCRFD decoding as insightface does it)."""
        import numpy as np
        from PIL import Image

        h, w = rgb.shape[:2]
        s = self.det_size / max(h, w)
        nh, nw = int(round(h * s)), int(round(w * s))
        # SCRFD's own input: top-left aligned on black, as insightface feeds it (not serialgen.imaging's
        # centred white letterbox); the keypoints are mapped back by the scale alone.
        canvas = np.zeros((self.det_size, self.det_size, 3), np.float32)
        canvas[:nh, :nw] = np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.BILINEAR), np.float32)
        blob = ((canvas - 127.5) / 128.0).transpose(2, 0, 1)[None]
        outs = self.det.run(None, {self.det.get_inputs()[0].name: blob})
        fmc = len(outs) // 3
        strides = [8, 16, 32, 64, 128][:fmc]
        best, best_kps = self.det_threshold, None
        for i, stride in enumerate(strides):
            scores = outs[i].reshape(-1)
            kps = outs[i + 2 * fmc].reshape(-1, 10) * stride if len(outs) >= 3 * fmc else None
            fh, fw = self.det_size // stride, self.det_size // stride
            anchors = len(scores) // (fh * fw)
            ys, xs = np.mgrid[:fh, :fw]
            centers = np.stack([xs, ys], -1).reshape(-1, 2).astype(np.float32) * stride
            centers = np.repeat(centers, anchors, axis=0)
            j = int(np.argmax(scores))
            if scores[j] > best and kps is not None:
                best = float(scores[j])
                best_kps = (centers[j][None] + kps[j].reshape(5, 2)) / s
        return best_kps

    def __call__(self, image: Any) -> Any:
        import numpy as np
        from PIL import Image
        from skimage.transform import SimilarityTransform

        rgb = np.asarray(image.convert("RGB"))
        kps = self._detect(rgb)
        if kps is None:
            return None
        tform = SimilarityTransform()
        tform.estimate(np.asarray(_ARCFACE_DST, np.float32), kps.astype(np.float32))  # output -> input map
        coeffs = tform.params[:2].reshape(-1).tolist()
        face = Image.fromarray(rgb).transform((112, 112), Image.AFFINE, coeffs, resample=Image.BILINEAR)
        blob = ((np.asarray(face, np.float32) - 127.5) / 127.5).transpose(2, 0, 1)[None]
        emb = self.rec.run(None, {self.rec.get_inputs()[0].name: blob})[0].reshape(-1)
        return emb / (np.linalg.norm(emb) + 1e-12)


# ------------------------------------------------------------------------------------------ evaluation

@dataclass
class SeriesScores:
    name: str
    reference: str
    images: int
    clip_i: float
    clip_t: float
    ap_clip_i: float
    face_sim: float | None = None
    faces_found: int | None = None
    per_image: list[dict[str, Any]] = field(default_factory=list)


def _open(path: Path) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (OSError, UnidentifiedImageError) as exc:
        raise UserInputError(f"{path}: not a readable image ({exc})") from None


def _evaluate_series(series_dir: str | Path, reference: str | Path, clip: ClipScorer, segmenter: Segmenter, *,
                    faces: FaceEmbedder | None = None, ap_pairs: str = "cross-prompt") -> SeriesScores:
    """Score one series folder (``series.json`` + images from ``serialgen generate``) against its reference."""
    d = Path(series_dir)
    record = json.loads((d / "series.json").read_text(encoding="utf-8"))
    entries = record.get("images") or []
    if not entries:
        raise UserInputError(f"{d / 'series.json'}: lists no images")
    ref_path = Path(reference)
    ref = _open(ref_path)
    gens = [_open(d / e["file"]) for e in entries]
    prompts = [e["prompt"] for e in entries]
    ref_fg = _remove_background(ref, segmenter(ref, ref_path))
    gen_fg = [_remove_background(g, segmenter(g, d / e["file"])) for g, e in zip(gens, entries)]
    e_ref = clip.images([ref_fg])[0]
    e_fg = clip.images(gen_fg)
    e_full = clip.images([g.convert("RGB") for g in gens])
    e_txt = clip.texts(prompts)
    clip_i = [100.0 * float((e * e_ref).sum()) for e in e_fg]
    clip_t = [max(100.0 * float((a * b).sum()), 0.0) for a, b in zip(e_full, e_txt)]
    groups = prompts if ap_pairs == "cross-prompt" and len(set(prompts)) > 1 else None
    scores = SeriesScores(
        name=d.name, reference=str(ref_path), images=len(gens), clip_i=sum(clip_i) / len(clip_i),
        clip_t=sum(clip_t) / len(clip_t), ap_clip_i=ap_clip_i(e_fg, groups),
        per_image=[{"file": e["file"], "prompt": e["prompt"], "clip_i": a, "clip_t": b}
                   for e, a, b in zip(entries, clip_i, clip_t)],
    )
    if faces is not None:
        import numpy as np

        f_ref = faces(ref.convert("RGB"))
        sims = []
        for item, g in zip(scores.per_image, gens):
            f = faces(g.convert("RGB")) if f_ref is not None else None
            item["face_sim"] = None if f is None else float(np.dot(f, f_ref))
            if f is not None:
                sims.append(item["face_sim"])
        scores.faces_found = len(sims)
        scores.face_sim = sum(sims) / len(sims) if sims else None
    return scores


def _series_dirs(outputs: Sequence[str | Path]) -> list[Path]:
    dirs: list[Path] = []
    for o in outputs:
        p = Path(o)
        if (p / "series.json").is_file():
            dirs.append(p)
        elif p.is_dir():
            found = sorted(q.parent for q in p.glob("*/series.json"))
            if not found:
                raise UserInputError(f"--outputs: {p} holds no series.json (one folder per `serialgen generate --out`)")
            dirs.extend(found)
        else:
            raise UserInputError(f"--outputs: {p} not found")
    return dirs


def _match_reference(series_dir: Path, refs: Sequence[str | Path]) -> Path:
    record = json.loads((series_dir / "series.json").read_text(encoding="utf-8"))
    original = Path(record.get("reference", ""))
    candidates: list[Path] = []
    for r in refs:
        p = Path(r)
        candidates.extend(sorted(q for q in p.iterdir() if q.is_file()) if p.is_dir() else [p])
    for c in candidates:  # by the original reference's file name, then by the series folder's name
        if c.name == original.name or c.stem == series_dir.name:
            return c
    if not refs:
        if original.is_file():
            return original
        if (series_dir / record.get("reference_copy", "reference.png")).is_file():
            return series_dir / record.get("reference_copy", "reference.png")
    raise UserInputError(f"--refs: no reference for series {series_dir} (looked for {original.name} or {series_dir.name}.*)")


def evaluate_outputs(outputs: Sequence[str | Path], refs: Sequence[str | Path], clip: ClipScorer,
                     segmenter: Segmenter, *, faces: FaceEmbedder | None = None,
                     ap_pairs: str = "cross-prompt") -> dict[str, Any]:
    """Score every series under ``outputs``; returns ``{"series": [...], "mean": {...}, settings}``."""
    series = [_evaluate_series(d, _match_reference(d, refs), clip, segmenter, faces=faces, ap_pairs=ap_pairs)
              for d in _series_dirs(outputs)]

    def mean(key: str) -> float | None:
        vals = [getattr(s, key) for s in series if getattr(s, key) is not None and getattr(s, key) == getattr(s, key)]
        return sum(vals) / len(vals) if vals else None

    return {
        "format": "serialgen-personalization-metrics",
        "version": 1,
        "clip_model": clip.name,
        "segmenter": segmenter.name,
        "face_model": getattr(faces, "name", None),
        "ap_pairs": ap_pairs,
        "scales": {"clip_i": "x100", "clip_t": "x100", "ap_clip_i": "x100", "face_sim": "cosine (0..1, as the paper)"},
        "series": [s.__dict__ for s in series],
        "mean": {k: mean(k) for k in ("clip_i", "clip_t", "ap_clip_i", "face_sim")},
        "images": sum(s.images for s in series),
    }


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table: one row per series, then the mean."""
    def f(v: Any, digits: int = 2) -> str:
        return "-" if v is None or v != v else f"{v:.{digits}f}"

    rows = [("series", "images", "CLIP-I", "CLIP-T", "AP-CLIP-I", "Face Sim")]
    for s in result["series"]:
        rows.append((s["name"], str(s["images"]), f(s["clip_i"]), f(s["clip_t"]), f(s["ap_clip_i"]), f(s["face_sim"], 3)))
    m = result["mean"]
    rows.append(("mean", str(result["images"]), f(m["clip_i"]), f(m["clip_t"]), f(m["ap_clip_i"]), f(m["face_sim"], 3)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    lines.append(f"CLIP: {result['clip_model']}; background removal: {result['segmenter']}; "
                 f"AP-CLIP-I pairs: {result['ap_pairs']}; CLIP-I/T x100, Face Sim cosine")
    return "\n".join(lines)


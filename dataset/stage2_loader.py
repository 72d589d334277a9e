"""Stage II training data: pair shards -> (target pixels, reference CLIP pixels, caption, SDXL sizes).

The dataset is map-style over a random-access table of every pair (tar member offsets, see
:func:`serialgen.dataset.tarset.scan_shard`): the training code's resumable sampler gives a seeded
global permutation per epoch, ranks take disjoint shares, and an exact resume starts mid-epoch
without decoding the samples already seen.

The reference the adapter sees depends on the training mode (the paper's Table 2):

* ``two-stage``: ``std_ref.png``, the Stage I standardization of the target (the paper's model);
* ``unpaired``: the target itself, augmented (flip, crop, colour jitter), as in one-stage training;
* ``paired-one-stage``: ``alt_ref.jpg``, another real image of the same identity, not standardized.
  Pairs without one are left out of this mode's table (counted in ``skipped``).

Classifier-free-guidance dropout is drawn per sample in the training step from the step's seeded
generator (:func:`draw_cfg_dropout`), not here, so it is independent of data workers.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any, Sequence

from serialgen.dataset.pairs import PAIR_MEMBERS, PairShardWriter, completed_shards, make_key, read_index, shard_name, write_index
from serialgen.dataset.tarset import index_path, read_member, scan_shard
from serialgen.errors import UserInputError
from serialgen.resolution import DEFAULT_RESOLUTION

__all__ = [
    "Stage2PairDataset",
    "draw_cfg_dropout",
    "sdxl_time_ids",
    "cover_crop",
    "augment_reference",
    "write_synthetic_pairs",
]


def draw_cfg_dropout(batch_size: int, rates: dict[str, float], generator: Any) -> tuple[Any, Any]:
    """Per-sample (drop_image, drop_text) bool tensors (B,), exclusive draws as in IP-Adapter training.

    One uniform u per sample: u < image -> image only; < image+text -> text only; < image+text+both ->
    both. With the default 0.05 / 0.05 / 0.05, 5 % of samples lose the image alone, 5 % the text alone,
    5 % both, 85 % keep both; so P(drop image) = P(drop text) = 0.10.
    """
    import torch

    u = torch.rand(batch_size, generator=generator, device=generator.device)
    a = rates["image"]
    b = a + rates["text"]
    c = b + rates["both"]
    drop_image = (u < a) | ((u >= b) & (u < c))
    drop_text = (u >= a) & (u < c)
    return drop_image, drop_text


def sdxl_time_ids(original_size: Any, crop_top_left: Any, target_size: tuple[int, int]) -> Any:
    """SDXL micro-conditioning, (B, 6) float: original (h, w), crop top-left (y, x), target (h, w).

    As diffusers' SDXL training script: the original size of the source image, where the crop started
    in the resized image, and the training size, (768, 512) for the paper's 512x768. At inference the
    pipeline passes original = target = the output size and crop (0, 0), the "uncropped" condition.
    """
    import torch

    b = original_size.shape[0]
    target = torch.tensor(target_size, dtype=torch.float32).expand(b, 2)
    return torch.cat([original_size.float(), crop_top_left.float(), target], dim=1)


def cover_crop(image: Any, width: int, height: int, rng: random.Random | None = None) -> tuple[Any, tuple[int, int], tuple[int, int]]:
    """Resize ``image`` to cover width x height (aspect kept, bicubic), then crop to exactly that size.

    The crop is centred, or at a random offset from ``rng``. Returns (cropped PIL image,
    original (h, w), crop top-left (y, x) in the resized image).
    """
    from PIL import Image

    w0, h0 = image.size
    scale = max(width / w0, height / h0)
    rw, rh = max(width, round(w0 * scale)), max(height, round(h0 * scale))
    resized = image.resize((rw, rh), Image.BICUBIC)
    if rng is None:
        x, y = (rw - width) // 2, (rh - height) // 2
    else:
        x, y = rng.randint(0, rw - width), rng.randint(0, rh - height)
    return resized.crop((x, y, x + width, y + height)), (h0, w0), (y, x)


def augment_reference(image: Any, rng: random.Random, flip: float = 0.5, min_scale: float = 0.7, jitter: float = 0.1) -> Any:
    """The ``unpaired`` baseline's reference: an augmented copy of the target.

    Horizontal flip with probability ``flip``; a crop keeping a random ``[min_scale, 1]`` of each side at a
    random position; brightness and contrast scaled by ``1 +- jitter``. Deterministic given ``rng``.
    """
    from PIL import Image, ImageEnhance

    if rng.random() < flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    w, h = image.size
    s = rng.uniform(min_scale, 1.0)
    cw, ch = max(1, round(w * s)), max(1, round(h * s))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    image = image.crop((x, y, x + cw, y + ch))
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(1 - jitter, 1 + jitter))
    return ImageEnhance.Contrast(image).enhance(rng.uniform(1 - jitter, 1 + jitter))


def _to_tensor(image: Any) -> Any:
    """PIL RGB -> float tensor (3, H, W) in [-1, 1] (the VAE's input range)."""
    import numpy as np
    import torch

    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _decode(data: bytes) -> Any:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


class Stage2PairDataset:
    """Map-style dataset over one or more pair sets (a torch ``Dataset`` by duck typing).

    ``__getitem__`` returns ``{"pixel_values": (3, H, W) in [-1, 1], "ref_pixel_values": (3, S, S) CLIP
    normalised, "caption": str, "original_size": (2,) long, "crop_top_left": (2,) long, "index": int}``.
    Randomness (unpaired augmentation, random crops) comes from ``random.Random((seed, epoch, index))``,
    so a sample is identical on every run, worker layout and resume.
    """

    def __init__(
        self,
        pair_dirs: Sequence[str | Path],
        *,
        mode: str = "two-stage",
        resolution: tuple[int, int] = DEFAULT_RESOLUTION,
        clip_size: int = 224,
        seed: int = 0,
        random_crop: bool = False,
        augment: dict[str, float] | None = None,
    ):
        self.mode, self.seed, self.random_crop = mode, int(seed), bool(random_crop)
        self.width, self.height = int(resolution[0]), int(resolution[1])
        self.clip_size = int(clip_size)
        self.augment = dict(augment or {"flip": 0.5, "min_scale": 0.7, "jitter": 0.1})
        self.epoch = 0
        self.entries: list[tuple[str, dict[str, tuple[int, int]]]] = []
        self.skipped: dict[str, int] = {}
        need = set(PAIR_MEMBERS) | ({"alt_ref.jpg"} if mode == "paired-one-stage" else set())
        for d in pair_dirs:
            index_file = index_path(d)
            for shard in read_index(d)["shards"]:
                path = index_file.parent / shard["path"]
                if not path.is_file():
                    raise UserInputError(f"{path}: listed in {index_file} but missing")
                for _key, members in scan_shard(path):
                    missing = need - set(members)
                    if missing:
                        reason = "no alt_ref.jpg" if missing == {"alt_ref.jpg"} else "incomplete sample"
                        self.skipped[reason] = self.skipped.get(reason, 0) + 1
                        continue
                    self.entries.append((str(path), members))
        if not self.entries:
            hint = " (paired-one-stage needs alt_ref.jpg: build pairs from identity-grouped images)" if mode == "paired-one-stage" else ""
            raise UserInputError(f"data.pairs: no usable pairs in {', '.join(map(str, pair_dirs))}{hint}")

    def __len__(self) -> int:
        return len(self.entries)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _member(self, index: int, ext: str) -> bytes:
        path, members = self.entries[index]
        return read_member(path, *members[ext])

    def _rng(self, index: int) -> random.Random:
        return random.Random(f"{self.seed}/{self.epoch}/{index}")  # str seeds hash deterministically

    def reference_image(self, index: int, target: Any = None) -> Any:
        """The PIL reference this mode feeds the adapter for sample ``index`` (before CLIP padding)."""
        if self.mode == "two-stage":
            return _decode(self._member(index, "std_ref.png"))
        if self.mode == "paired-one-stage":
            return _decode(self._member(index, "alt_ref.jpg"))
        if target is None:
            target = _decode(self._member(index, "target.jpg"))
        return augment_reference(target, self._rng(index), **self.augment)

    def caption(self, index: int) -> str:
        return self._member(index, "caption.txt").decode("utf-8")

    def meta(self, index: int) -> dict[str, Any]:
        return json.loads(self._member(index, "meta.json").decode("utf-8"))

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        from serialgen.dataset.clip_inputs import reference_pixel_values

        target = _decode(self._member(index, "target.jpg"))
        rng = self._rng(index)
        crop_rng = random.Random(rng.random()) if self.random_crop else None
        cropped, original, top_left = cover_crop(target, self.width, self.height, crop_rng)
        ref = self.reference_image(index, target)
        return {
            "pixel_values": _to_tensor(cropped),
            "ref_pixel_values": reference_pixel_values([ref], self.clip_size)[0],
            "caption": self.caption(index),
            "original_size": torch.tensor(original, dtype=torch.long),
            "crop_top_left": torch.tensor(top_left, dtype=torch.long),
            "index": index,
        }


def write_synthetic_pairs(out_dir: str | Path, count: int, *, seed: int = 0, size: tuple[int, int] = (64, 96),
                          per_shard: int = 4) -> Path:
    """A small deterministic pair set of drawn figures (tiny runs and tests); returns ``out_dir``.

    Each identity (two images each) has its own clothing colours. ``std_ref`` is the figure front-on,
    centred on white at ``size``; ``target`` the same figure shifted and scaled on a coloured
    background at a different size; ``alt_ref`` the identity's other target. Already-complete shards
    are kept (same resumable writer as real pair building).
    """
    from PIL import Image, ImageDraw

    out = Path(out_dir)
    rng = random.Random(seed)
    w, h = size
    samples = []
    for i in range(count):
        ident = i // 2
        irng = random.Random(f"identity/{seed}/{ident}")
        top = tuple(irng.randrange(256) for _ in range(3))
        bottom = tuple(irng.randrange(256) for _ in range(3))
        skin = (224, 172, 140)

        def figure(canvas_w: int, canvas_h: int, bg: tuple[int, int, int], dx: float, s: float) -> Any:
            im = Image.new("RGB", (canvas_w, canvas_h), bg)
            dr = ImageDraw.Draw(im)
            cx, fh = canvas_w * (0.5 + dx), canvas_h * 0.9 * s
            y0 = canvas_h * 0.05
            u = fh / 8  # head units
            dr.ellipse([cx - u * 0.5, y0, cx + u * 0.5, y0 + u], fill=skin)
            dr.rectangle([cx - u, y0 + u, cx + u, y0 + 4 * u], fill=top)
            dr.rectangle([cx - u, y0 + 4 * u, cx + u, y0 + 8 * u], fill=bottom)
            return im

        std = figure(w, h, (255, 255, 255), 0.0, 1.0)
        bg = tuple(rng.randrange(256) for _ in range(3))
        tw, th = (w * 3 // 2, h) if i % 2 else (w, h * 5 // 4)
        target = figure(tw, th, bg, rng.uniform(-0.15, 0.15), rng.uniform(0.7, 1.0))
        samples.append((f"synthetic/{ident:03d}/{i % 2}", std, target, f"a person in clothes number {ident}", ident))
    done = completed_shards(out)
    for s0 in range(0, count, per_shard):
        index = s0 // per_shard
        if shard_name(index) in done:
            continue
        with PairShardWriter(out, index) as writer:
            for j in range(s0, min(s0 + per_shard, count)):
                source, std, target, caption, ident = samples[j]
                alt = samples[j ^ 1][2] if (j ^ 1) < count else None
                meta = {"source": source, "identity": f"synthetic-{ident:03d}", "standardizer": "synthetic",
                        "target_size": list(target.size)}
                writer.add(make_key(j, source), std, target, caption, meta, alt_ref=alt)
    write_index(out, {"built_by": "synthetic", "seed": seed})
    return out

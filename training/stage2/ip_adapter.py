"""IP-Adapter "Full" on SDXL, built from stock diffusers classes, and its reference preprocessing.

Model (paper section 4.1; tencent-ailab/IP-Adapter ``MLPProjModel`` / ``IPAdapterFull``):

* reference encoder: a CLIP vision tower (OpenCLIP ViT-H/14 for the paper), its *penultimate* hidden
  states, shape (B, 257, 1280) for ViT-H/14 at 224 px (16x16 patches + CLS);
* image projection: ``IPAdapterFullImageProjection`` = Linear(h, h) -> GELU -> Linear(h, cross) ->
  LayerNorm(cross), applied per token, so 257 tokens of width 2048 for SDXL;
* decoupled cross-attention: every cross-attention layer (``attn2``) of the UNet gets diffusers'
  ``IPAdapterAttnProcessor2_0`` with its own ``to_k_ip`` / ``to_v_ip``, initialised from that layer's
  frozen ``to_k`` / ``to_v`` (as the IP-Adapter training scripts do), output = text attention +
  scale x image attention.

We install it the way ``StableDiffusionXLPipeline.load_ip_adapter`` does, through
``UNet2DConditionModel._load_ip_adapter_weights`` on a state dict in the original tencent layout
(``image_proj.proj.{0,2,3}.*``, ``ip_adapter.{1,3,5,...}.to_{k,v}_ip.weight``). That function is private, so
diffusers is pinned (0.42.1) and a test checks the round trip through the public loader. Saving inverts
the same key map, so a training checkpoint *is* a file that stock ``load_ip_adapter`` reads.

Reference preprocessing (the paper is silent; our decision). A standardized reference is a 2:3
full-body image (512x768). ``CLIPImageProcessor``'s default resizes the short side to 224 and crops the
centre 224x224, which for a 2:3 image drops the top and bottom sixth: the head and the feet. We instead
pad the image to a square with white (the standardized background colour), centred, and only then apply
the processor; its centre crop is then a no-op and the whole figure reaches the encoder (at 149x224 px
inside the 224 square). The same :func:`reference_pixel_values` runs in training, in generation and in
the metrics, and generation passes padded images to the stock pipeline, whose own processor then does
exactly the same resize and normalisation.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterable

import torch

from serialgen.errors import UserInputError
from serialgen.imaging import flatten_on_white

__all__ = [
    "NUM_TOKENS",
    "WEIGHT_NAME",
    "open_reference",
    "encode_reference",
    "initial_adapter_state_dict",
    "attach_ip_adapter",
    "adapter_state_dict",
    "adapter_config",
    "AdapterView",
    "ip_adapter_scale",
    "resolve_adapter_file",
    "count_parameters",
]

NUM_TOKENS = 257  # ViT-H/14 at 224 px; diffusers hard-codes this count for "Full" (proj.3.* keys)
WEIGHT_NAME = "ip_adapter.safetensors"


def open_reference(path: str | Path, what: str) -> Any:
    """A reference picture as RGB, transparency flattened onto white (the background the adapter
    sees everywhere: CLIP padding, standard images). ``what`` names the argument in errors."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise UserInputError(f"{what}: {p} not found")
    try:
        with Image.open(p) as im:
            im.load()
            return flatten_on_white(im)
    except (UnidentifiedImageError, OSError) as exc:
        raise UserInputError(f"{what}: {p} is not a readable image ({exc})") from None


def encode_reference(image_encoder: Any, pixel_values: Any, drop: Any = None) -> Any:
    """Penultimate hidden states of the vision encoder: (B, 257, hidden) for ViT-H/14.

    ``drop`` (bool tensor (B,)) replaces those samples' pixels by zeros *before* the encoder, which is
    exactly the unconditional input diffusers builds at inference
    (``image_encoder(torch.zeros_like(image)).hidden_states[-2]``), so image dropout in training
    teaches the model the same "no reference" tokens classifier-free guidance uses later.
    """
    param = next(image_encoder.parameters())
    pixel_values = pixel_values.to(device=param.device, dtype=param.dtype)
    if drop is not None:
        keep = (~drop.to(device=pixel_values.device, dtype=torch.bool)).to(pixel_values.dtype)
        pixel_values = pixel_values * keep.view(-1, 1, 1, 1)
    out = image_encoder(pixel_values, output_hidden_states=True)
    return out.hidden_states[-2]


def _cross_attention_layers(unet: Any) -> list[tuple[str, Any]]:
    """(processor name, Attention module) of every cross-attention layer, in ``attn_processors`` order.

    That order is what diffusers uses to number ``ip_adapter`` keys (1, 3, 5, ...: the original scripts
    counted all processors and cross-attention came second in each block).
    """
    modules = dict(unet.named_modules())
    layers = []
    for name in unet.attn_processors.keys():
        if name.endswith("attn1.processor") or "motion_modules" in name:
            continue
        layers.append((name, modules[name[: -len(".processor")]]))
    return layers


def initial_adapter_state_dict(unet: Any, image_embed_dim: int, seed: int = 0) -> dict[str, dict[str, Any]]:
    """A fresh adapter in tencent layout: ``{"image_proj": {...}, "ip_adapter": {...}}``.

    The projection gets PyTorch's default init (seeded here, not from the global RNG); ``to_k_ip`` /
    ``to_v_ip`` are copies of each layer's ``to_k`` / ``to_v``, so at step 0 the image branch attends
    the way the text branch would.
    """
    from diffusers.models.embeddings import IPAdapterFullImageProjection

    cross = int(unet.config.cross_attention_dim)
    fork_devices: list[Any] = []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        proj = IPAdapterFullImageProjection(image_embed_dim=image_embed_dim, cross_attention_dim=cross)
    image_proj = _full_projection_to_original(proj.state_dict())
    ip = {}
    key_id = 1
    for _name, attn in _cross_attention_layers(unet):
        ip[f"{key_id}.to_k_ip.weight"] = attn.to_k.weight.detach().clone().float()
        ip[f"{key_id}.to_v_ip.weight"] = attn.to_v.weight.detach().clone().float()
        key_id += 2
    return {"image_proj": image_proj, "ip_adapter": ip}


# IPAdapterFullImageProjection (diffusers) <-> MLPProjModel (original) parameter names.
_PROJ_KEYS = {"ff.net.0.proj": "proj.0", "ff.net.2": "proj.2", "norm": "proj.3"}


def _full_projection_to_original(sd: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in sd.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix not in _PROJ_KEYS:
            raise ValueError(f"unexpected IPAdapterFullImageProjection key {key}")
        out[f"{_PROJ_KEYS[prefix]}.{leaf}"] = value.detach().clone()
    return out


def attach_ip_adapter(unet: Any, image_embed_dim: int, state_dict: dict | None = None, seed: int = 0) -> list[Any]:
    """Install IP-Adapter Full into ``unet`` in place; freeze everything else; return the trainable params.

    ``state_dict`` (tencent layout) loads given weights; ``None`` starts fresh
    (:func:`initial_adapter_state_dict`). Adapter parameters are kept in fp32 even if the UNet is not.
    """
    if state_dict is None:
        state_dict = initial_adapter_state_dict(unet, image_embed_dim, seed=seed)
    # low_cpu_mem_usage=False: build real tensors (the meta-device path needs a device map per module).
    unet._load_ip_adapter_weights([state_dict], low_cpu_mem_usage=False)
    unet.requires_grad_(False)
    params = _adapter_parameters(unet)
    for p in params:
        p.data = p.data.to(torch.float32)
        p.requires_grad_(True)
    return params


def _adapter_modules(unet: Any) -> tuple[Any, list[tuple[str, Any]]]:
    """(image projection module, [(processor name, IPAdapterAttnProcessor2_0), ...])."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0

    hid = getattr(unet, "encoder_hid_proj", None)
    if hid is None or getattr(unet.config, "encoder_hid_dim_type", None) != "ip_image_proj":
        raise ValueError("the UNet has no IP-Adapter installed (attach_ip_adapter first)")
    if len(hid.image_projection_layers) != 1:
        raise ValueError("exactly one IP-Adapter is supported")
    procs = [
        (name, proc)
        for name, proc in unet.attn_processors.items()
        if isinstance(proc, (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0))
    ]
    return hid.image_projection_layers[0], procs


def _adapter_parameters(unet: Any) -> list[Any]:
    """Every adapter parameter (projection MLP, then to_k_ip / to_v_ip per layer), in a fixed order."""
    proj, procs = _adapter_modules(unet)
    params = list(proj.parameters())
    for _name, proc in procs:
        params.extend(proc.parameters())
    return params


def adapter_state_dict(unet: Any) -> dict[str, Any]:
    """Flat ``{"image_proj.proj.0.weight": ..., "ip_adapter.1.to_k_ip.weight": ...}`` (fp32, CPU, contiguous).

    The key layout of the original IP-Adapter releases, which
    ``StableDiffusionXLPipeline.load_ip_adapter(..., weight_name="ip_adapter.safetensors")`` reads.
    """
    proj, procs = _adapter_modules(unet)
    out = {}
    for key, value in _full_projection_to_original(proj.state_dict()).items():
        out[f"image_proj.{key}"] = value
    key_id = 1
    for _name, proc in procs:
        if len(proc.to_k_ip) != 1:
            raise ValueError("exactly one IP-Adapter is supported")
        out[f"ip_adapter.{key_id}.to_k_ip.weight"] = proc.to_k_ip[0].weight
        out[f"ip_adapter.{key_id}.to_v_ip.weight"] = proc.to_v_ip[0].weight
        key_id += 2
    return {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in out.items()}


class AdapterView(torch.nn.Module):
    """The installed adapter's parameters (shared, not copied) under their IP-Adapter file names.

    ``named_parameters()`` yields ``image_proj.proj.{0,2,3}.{weight,bias}`` and
    ``ip_adapter.{1,3,...}.to_{k,v}_ip.weight``: the optimizer, the checkpoint writer and the loader all
    see the adapter in the layout ``load_ip_adapter`` reads, with no conversion step to forget.
    """

    def __init__(self, unet: Any):
        super().__init__()
        proj, procs = _adapter_modules(unet)
        # Registered in sorted name order, the order safetensors stores keys in, so the names read back
        # from a checkpoint file line up one-to-one with named_parameters().
        self.image_proj = torch.nn.Module()
        self.image_proj.proj = torch.nn.ModuleDict()
        for prefix, original in sorted(_PROJ_KEYS.items(), key=lambda kv: kv[1]):
            holder = torch.nn.Module()
            for leaf, param in sorted(proj.get_submodule(prefix).named_parameters(recurse=False)):
                holder.register_parameter(leaf, param)
            self.image_proj.proj[original.split(".")[1]] = holder
        layers = {}
        for i, (_name, proc) in enumerate(procs):
            holder = torch.nn.Module()
            holder.to_k_ip = proc.to_k_ip[0]
            holder.to_v_ip = proc.to_v_ip[0]
            layers[str(1 + 2 * i)] = holder  # diffusers numbers cross-attention layers 1, 3, 5, ...
        self.ip_adapter = torch.nn.ModuleDict({k: layers[k] for k in sorted(layers)})


@contextlib.contextmanager
def ip_adapter_scale(pipe: Any, scale: float):
    """``pipe.set_ip_adapter_scale(scale)`` for the block, then every processor's scale as it was.

    The setter writes into the processors of ``pipe.unet``; during training that is the UNet being
    trained, so a validation grid at another scale would otherwise leave that scale in every later
    training step."""
    processors = [p for p in pipe.unet.attn_processors.values() if isinstance(getattr(p, "scale", None), list)]
    saved = [list(p.scale) for p in processors]
    pipe.set_ip_adapter_scale(scale)
    try:
        yield
    finally:
        for processor, scales in zip(processors, saved):
            processor.scale = scales


def adapter_config(unet: Any) -> dict[str, Any]:
    """The installed adapter's own config (JSON types), saved as ``model_config.json`` beside its weights."""
    proj, procs = _adapter_modules(unet)
    first = proj.get_submodule("ff.net.0.proj")
    return {
        "_class_name": "IPAdapterFull",
        "weight_name": WEIGHT_NAME,
        "num_tokens": NUM_TOKENS,
        "image_embed_dim": int(first.in_features),
        "cross_attention_dim": int(unet.config.cross_attention_dim),
        "cross_attention_layers": len(procs),
    }


def resolve_adapter_file(path: str | Path) -> Path:
    """Accept the safetensors file itself or a folder (checkpoint or run dir) holding ``ip_adapter.safetensors``."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / WEIGHT_NAME
    if not p.is_file():
        raise UserInputError(f"adapter: {p} not found; expected an {WEIGHT_NAME} (or a folder holding one)")
    return p


def count_parameters(params: Iterable[Any]) -> int:
    """Number of scalar parameters (for logs: ~345 M for SDXL + ViT-H/14)."""
    return sum(int(p.numel()) for p in params)

"""Stage II: IP-Adapter Full on a tiny SDXL, its training run, generation and the personalization metrics.

All models are tiny and random-initialised (no weights, no hub); the training run is the packaged
`stage2-tiny` config on a synthetic pair set. Whatever trains or generates is `slow`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from serialgen.errors import UserInputError

TINY_STEPS = 4


def _train(out: Path, max_steps: int, *overrides: str) -> dict:
    from serialgen.training.stage2.config import load_stage2_config
    from serialgen.training.stage2.train import train_stage2

    config = load_stage2_config("stage2-tiny", ["validation.num_references=1", *overrides])
    return train_stage2(config, output_dir=out, max_steps=max_steps, progress=False)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A 4-step tiny training run (checkpoints at steps 2 and 4, a validation grid at the end)."""
    out = tmp_path_factory.mktemp("stage2") / "run"
    summary = _train(out, TINY_STEPS, f"validation.every={TINY_STEPS}")
    assert summary["steps"] == TINY_STEPS and summary["resumed_from"] == 0
    return out


def _tiny_pipeline():
    from serialgen.training.stage2.components import build_tiny_components

    return build_tiny_components(0).pipeline()


def _generate(pipe, **kw) -> np.ndarray:
    return pipe("a person walking", height=96, width=64, num_inference_steps=2, guidance_scale=1.0,
                generator=torch.Generator().manual_seed(0), output_type="np", **kw).images


@pytest.mark.slow
def test_trained_adapter_loads_in_stock_diffusers_and_scale_zero_is_no_adapter(tiny_run):
    from safetensors.torch import load_file

    from serialgen.imaging import pad_to_square
    from serialgen.training.stage2.ip_adapter import adapter_state_dict, initial_adapter_state_dict

    saved = load_file(str(tiny_run / "ip_adapter.safetensors"))
    assert saved and all(k.startswith(("image_proj.", "ip_adapter.")) for k in saved)
    assert "image_proj.proj.3.weight" in saved  # the key diffusers uses to pick IPAdapterFullImageProjection

    pipe = _tiny_pipeline()
    # training moved the adapter away from its initialisation (to_k_ip started as a copy of to_k)
    init = initial_adapter_state_dict(pipe.unet, 32)
    assert not torch.equal(saved["ip_adapter.1.to_k_ip.weight"], init["ip_adapter"]["1.to_k_ip.weight"])

    ref = pad_to_square(Image.new("RGB", (64, 96), (200, 40, 40)))
    base = _generate(pipe)
    pipe.load_ip_adapter(str(tiny_run), subfolder="", weight_name="ip_adapter.safetensors", image_encoder_folder=None)
    loaded = adapter_state_dict(pipe.unet)
    assert set(loaded) == set(saved) and all(torch.equal(loaded[k], saved[k]) for k in saved)
    pipe.set_ip_adapter_scale(0.0)
    assert np.array_equal(_generate(pipe, ip_adapter_image=ref), base)
    pipe.set_ip_adapter_scale(1.0)
    assert np.abs(_generate(pipe, ip_adapter_image=ref) - base).max() > 1e-3

    # every checkpoint folder is itself loadable by the stock loader
    ck = tiny_run / "checkpoints" / "step-00000002"
    pipe2 = _tiny_pipeline()
    pipe2.load_ip_adapter(str(ck), subfolder="", weight_name="ip_adapter.safetensors", image_encoder_folder=None)
    assert (tiny_run / "metrics.jsonl").is_file() and (tiny_run / "validation" / f"step-{TINY_STEPS:08d}.png").is_file()
    # the adapter's own config beside its weights, in the run folder and in every checkpoint
    for folder in (tiny_run, ck):
        model_config = json.loads((folder / "model_config.json").read_text())
        assert model_config == {"_class_name": "IPAdapterFull", "weight_name": "ip_adapter.safetensors", "num_tokens": 257,
                                "image_embed_dim": 32, "cross_attention_dim": 64,
                                "cross_attention_layers": model_config["cross_attention_layers"]}
        assert model_config["cross_attention_layers"] > 0
    steps = [json.loads(line)["step"] for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, TINY_STEPS + 1))


@pytest.mark.slow
def test_resume_is_exact(tiny_run, tmp_path):
    import shutil

    from safetensors.torch import load_file

    # the run as it stood after step 2 (a run stopped there wrote exactly this checkpoint)
    out = tmp_path / "run"
    shutil.copytree(tiny_run / "checkpoints" / "step-00000002", out / "checkpoints" / "step-00000002")
    shutil.copytree(tiny_run / "synthetic-pairs", out / "synthetic-pairs")
    lines = (tiny_run / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(lines[:2] + ['{"step": 3, "loss": 9.9}']) + "\n")  # 3: a crashed step
    summary = _train(out, TINY_STEPS)  # stage2-tiny: validation.every 0, no grid
    assert summary["resumed_from"] == 2 and summary["steps"] == TINY_STEPS
    a = load_file(str(tiny_run / "ip_adapter.safetensors"))
    b = load_file(str(out / "ip_adapter.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda p: [json.loads(line)["loss"] for line in (p / "metrics.jsonl").read_text().splitlines()]
    assert losses(out) == losses(tiny_run)
    assert not (out / "validation").exists()  # every: 0 disables validation, as in Stage I
    with pytest.raises(UserInputError, match="different mode"):
        _train(out, TINY_STEPS + 1, "mode=unpaired")


def test_cfg_dropout_rates_hold_over_many_draws():
    from serialgen.dataset.stage2_loader import draw_cfg_dropout

    n = 200_000
    g = torch.Generator().manual_seed(123)
    img, txt = draw_cfg_dropout(n, {"image": 0.05, "text": 0.05, "both": 0.05}, g)
    only_image = (img & ~txt).float().mean().item()
    only_text = (txt & ~img).float().mean().item()
    both = (img & txt).float().mean().item()
    for rate in (only_image, only_text, both):
        assert abs(rate - 0.05) < 0.003  # ~6 standard deviations at n = 200k
    assert abs((~img & ~txt).float().mean().item() - 0.85) < 0.004
    img0, txt0 = draw_cfg_dropout(1000, {"image": 0.0, "text": 0.0, "both": 0.0}, g)
    assert not img0.any() and not txt0.any()


def test_dropped_image_is_a_zero_image_through_the_encoder():
    from serialgen.training.stage2.ip_adapter import encode_reference
    from serialgen.training.common.tiny_models import build_tiny_clip_vision

    enc = build_tiny_clip_vision(0, image_size=224, patch_size=14)
    px = torch.randn(3, 3, 224, 224)
    out = encode_reference(enc, px, torch.tensor([False, True, False]))
    assert out.shape == (3, 257, 32)  # ViT-H/14 geometry: 16 x 16 patches + CLS
    with torch.no_grad():
        zero = enc(torch.zeros(1, 3, 224, 224), output_hidden_states=True).hidden_states[-2]
        kept = enc(px[[0]], output_hidden_states=True).hidden_states[-2]
    assert torch.allclose(out[1:2], zero, atol=1e-6)
    assert torch.allclose(out[0:1], kept, atol=1e-6)


def test_padding_preprocessing_keeps_head_and_feet():
    from serialgen.dataset.clip_inputs import clip_processor, reference_pixel_values

    # a 512x768 standardized figure: red head band at the very top, blue feet band at the very bottom
    arr = np.full((768, 512, 3), 255, np.uint8)
    arr[:60, 200:312] = (255, 0, 0)
    arr[-60:, 200:312] = (0, 0, 255)
    image = Image.fromarray(arr)
    mean = torch.tensor(clip_processor(224).image_mean).view(3, 1, 1)
    std = torch.tensor(clip_processor(224).image_std).view(3, 1, 1)

    def colours(px: torch.Tensor) -> tuple[bool, bool]:
        rgb = (px * std + mean).clamp(0, 1)
        red = ((rgb[0] > 0.8) & (rgb[1] < 0.2) & (rgb[2] < 0.2)).any().item()
        blue = ((rgb[2] > 0.8) & (rgb[0] < 0.2) & (rgb[1] < 0.2)).any().item()
        return red, blue

    padded = reference_pixel_values([image], 224)[0]
    assert padded.shape == (3, 224, 224)
    assert colours(padded) == (True, True)
    # sides are white padding, the figure keeps its 2:3 aspect inside the square
    rgb = (padded * std + mean)
    assert rgb[:, :, :30].min() > 0.95 and rgb[:, :, -30:].min() > 0.95
    # the default centre crop (what a stock pipeline would do to the unpadded image) loses both
    cropped = clip_processor(224)(images=[image], return_tensors="pt").pixel_values[0]
    assert colours(cropped) == (False, False)


def test_ap_clip_i_equals_a_hand_computation():
    from serialgen.training.stage2.evaluate import ap_clip_i

    e = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 1.0, 0.0], [0.0, 0.6, 0.8]]), dim=-1)
    # cosines: (0,1)=.6 (0,2)=0 (0,3)=0 (1,2)=.8 (1,3)=.48 (2,3)=.6
    assert ap_clip_i(e) == pytest.approx(100 * (0.6 + 0 + 0 + 0.8 + 0.48 + 0.6) / 6)
    # two prompts (images 0,1 from "a", 2,3 from "b"): only cross-prompt pairs (0,2) (0,3) (1,2) (1,3)
    assert ap_clip_i(e, ["a", "a", "b", "b"]) == pytest.approx(100 * (0 + 0 + 0.8 + 0.48) / 4)
    assert math.isnan(ap_clip_i(e[:1]))


def test_missing_weights_path_is_one_clear_line(tmp_path, capsys):
    from serialgen.cli import main
    from serialgen.training.stage2.components import build_components
    from serialgen.training.stage2.config import ModelConfig

    with pytest.raises(UserInputError) as err:
        build_components(ModelConfig(pretrained_model=str(tmp_path / "no-sdxl"), image_encoder=str(tmp_path)))
    msg = str(err.value)
    assert "model.pretrained_model" in msg and "no-sdxl" in msg and "unet/" in msg and "\n" not in msg
    (tmp_path / "sdxl").mkdir()
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        (tmp_path / "sdxl" / sub).mkdir()
    with pytest.raises(UserInputError, match="model.image_encoder: .*vit-h not found"):
        build_components(ModelConfig(pretrained_model=str(tmp_path / "sdxl"), image_encoder=str(tmp_path / "vit-h")))

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{pretrained_model: {tmp_path / 'absent'}, image_encoder: {tmp_path}}}\ndata: {{synthetic: 4}}\n")
    assert main(["train", "stage2", "--config", str(cfg), "--output-dir", str(tmp_path / "o"), "--no-progress"]) == 2
    err_line = capsys.readouterr().err.strip()
    assert err_line.startswith("serialgen: error: model.pretrained_model:") and "absent" in err_line and "\n" not in err_line


def test_config_errors_name_the_key(tmp_path):
    from serialgen.training.stage2.config import load_stage2_config

    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {batchsize: 8}\n")
    with pytest.raises(UserInputError, match=r"unknown key train.batchsize \(valid keys of train: batch_size, max_steps"):
        load_stage2_config(bad)
    bad.write_text("mode: three-stage\ndata: {synthetic: 4}\n")
    with pytest.raises(UserInputError, match="mode must be one of two-stage, unpaired, paired-one-stage, got 'three-stage'"):
        load_stage2_config(bad)
    with pytest.raises(UserInputError, match="train.drop.image"):
        load_stage2_config("stage2-tiny", ["train.drop.image=1.5"])
    with pytest.raises(UserInputError, match="unknown key train.batchsize"):
        load_stage2_config("stage2-tiny", ["train.batchsize=3"])
    paper = load_stage2_config("stage2")
    assert paper.train.batch_size == 8  # the paper: batch 8 per GPU at 512x768
    assert paper.data.resolution == (512, 768)


def test_training_modes_pick_their_reference(tmp_path):
    from serialgen.dataset.stage2_loader import Stage2PairDataset, sdxl_time_ids, write_synthetic_pairs

    pairs = write_synthetic_pairs(tmp_path / "pairs", 4, seed=0, size=(64, 96))
    two = Stage2PairDataset([pairs], mode="two-stage", resolution=(64, 96))
    unpaired = Stage2PairDataset([pairs], mode="unpaired", resolution=(64, 96))
    paired = Stage2PairDataset([pairs], mode="paired-one-stage", resolution=(64, 96))
    assert len(two) == len(unpaired) == len(paired) == 4
    std = np.asarray(two.reference_image(0))
    assert (std[0, 0] == 255).all()  # the standardized reference is on white
    # paired-one-stage: the other image of the same identity (sample 1's target), not sample 0 itself
    from serialgen.dataset.pairs import iter_pairs

    samples = list(iter_pairs(pairs))
    alt = np.asarray(paired.reference_image(0)).astype(int)
    assert np.abs(alt - np.asarray(samples[1].image("target")).astype(int)).mean() < 3
    assert alt.shape != np.asarray(samples[0].image("target")).shape
    # unpaired: an augmented copy of the target itself, deterministic per (seed, epoch, index)
    a, b = unpaired.reference_image(0), unpaired.reference_image(0)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    unpaired.set_epoch(1)  # a new epoch draws a new augmentation
    c = unpaired.reference_image(0)
    assert a.size != c.size or not np.array_equal(np.asarray(a), np.asarray(c))
    item = two[0]
    assert item["pixel_values"].shape == (3, 96, 64) and item["ref_pixel_values"].shape == (3, 224, 224)
    ids = sdxl_time_ids(item["original_size"][None], item["crop_top_left"][None], (768, 512))
    assert ids.shape == (1, 6) and ids[0, 4:].tolist() == [768.0, 512.0]
    assert ids[0, :2].tolist() == list(map(float, item["original_size"]))


@pytest.mark.slow
def test_generate_and_evaluate_a_series(tiny_run, tmp_path):
    from transformers import CLIPConfig, CLIPModel

    from serialgen.cli import main
    from serialgen.training.common.tiny_models import tiny_clip_text_config, tiny_clip_vision_config, write_tiny_clip_tokenizer

    ref = tmp_path / "alice.png"
    Image.new("RGB", (60, 90), (30, 160, 60)).save(ref)
    out = tmp_path / "series" / "alice"
    rc = main(["generate", "--standardizer", "identity", "--adapter", str(tiny_run), "--ref", str(ref),
               "--prompt", "a person walking", "--prompt", "a person sitting", "--num-seeds", "2", "--out", str(out),
               "--steps", "2", "--guidance", "1", "--no-progress"])  # size: the adapter's training resolution
    assert rc == 0
    record = json.loads((out / "series.json").read_text())
    assert record["version"] == 2 and record["settings"]["resolution"] == "64x96"
    assert record["settings"]["ip_adapter_scale"] == 1.0 and record["model"]["tiny"] is True
    assert [(e["prompt_index"], e["seed"]) for e in record["images"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    grid = Image.open(out / "grid.png")
    assert grid.size == (3 * 64 + 4 * 2, 2 * 96 + 3 * 2)  # 2 prompt rows x (standardized + 2 seeds)
    assert Image.open(out / "standardized.png").size == (512, 768)

    with torch.random.fork_rng():
        torch.manual_seed(0)
        clip = CLIPModel(CLIPConfig(text_config=tiny_clip_text_config(), vision_config=tiny_clip_vision_config(),
                                    projection_dim=32))
    clip.save_pretrained(tmp_path / "clip")
    write_tiny_clip_tokenizer(tmp_path / "tok").save_pretrained(tmp_path / "clip")
    report = tmp_path / "metrics.json"
    assert main(["eval", "personalization", "--outputs", str(tmp_path / "series"), "--clip", str(tmp_path / "clip"),
                 "--out", str(report), "--json"]) == 0
    result = json.loads(report.read_text())
    (s,) = result["series"]
    assert s["images"] == 4 and s["reference"] == str(ref)
    assert -100 <= s["clip_i"] <= 100 and 0 <= s["clip_t"] <= 100 and -100 <= s["ap_clip_i"] <= 100
    assert result["mean"]["clip_i"] == pytest.approx(s["clip_i"])
    assert result["mean"]["face_sim"] is None


@pytest.mark.slow
def test_the_papers_paired_one_stage_pairs_come_from_the_two_stage_model(tiny_run, tmp_path, capsys):
    """Table 2's paired one-stage baseline as the paper builds it: each pair's target is generated by the
    trained two-stage model from the standardized reference, and its reference is the original image."""
    from serialgen.cli import main
    from serialgen.dataset.pairs import iter_pairs, read_index, verify_pairs

    source = tiny_run / "synthetic-pairs"
    originals = list(iter_pairs(source))
    out = tmp_path / "one-stage"
    argv = ["pairs", "one-stage", "--pairs", str(source), "--adapter", str(tiny_run), "--out", str(out),
            "--steps", "1", "--limit", "5", "--json", "--device", "cpu"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["pairs"] == 5 and summary["built_now"] == 5 and summary["shards"] == 2  # 4 per source shard
    assert verify_pairs(out)["ok"]
    index = read_index(out)
    assert index["construction"].startswith("paper: target generated by the two-stage model")
    built = list(iter_pairs(out))
    captions = [p.caption for p in originals]
    for pair, original in zip(built, originals):
        assert pair.key == original.key
        assert pair.alt_ref == original.target  # the reference: the original image, byte for byte
        assert pair.std_ref == original.std_ref
        assert pair.image("target").size == (64, 96)  # generated at the adapter's training size
        assert pair.caption in captions and pair.meta["source_pair"] == original.key
    # the prompts are other pairs' captions (a permutation without fixed points)
    assert all(p.meta["prompt_source"] != f"caption of pair {i}" for i, p in enumerate(built))
    # a re-run keeps what is done; other settings into the same folder are refused
    assert main(argv) == 0 and json.loads(capsys.readouterr().out)["built_now"] == 0
    assert main([*argv, "--prompts", "own"]) == 2
    assert "holds pairs built from another source, adapter or settings" in capsys.readouterr().err
    # and the baseline trains on it as it is
    summary = _train(tmp_path / "baseline", 1, "mode=paired-one-stage", f"data.pairs=[{out}]", "data.synthetic=0",
                     "validation.every=0")
    assert summary["pairs"] == 5 and summary["steps"] == 1


@pytest.mark.slow
def test_generate_standardizes_with_a_stage1_checkpoint(tiny_run, tmp_path):
    """`generate --standardizer CK`: the reference prepared as `standardize` prepares a picture (alpha
    is the mask; --mask/--pose otherwise), standardized by the checkpoint, then the series."""
    from test_training_fixes import _tiny_stage1_checkpoint

    from serialgen.cli import main

    ckpt = _tiny_stage1_checkpoint(tmp_path / "stage1")
    ref = tmp_path / "bob.png"
    rgba = np.zeros((90, 60, 4), np.uint8)
    rgba[20:80, 20:40] = (40, 60, 200, 255)
    Image.fromarray(rgba).save(ref)
    out = tmp_path / "series"
    assert main(["generate", "--standardizer", str(ckpt), "--adapter", str(tiny_run), "--ref", str(ref),
                 "--prompt", "a person walking", "--num-seeds", "1", "--out", str(out), "--steps", "1",
                 "--guidance", "1", "--no-progress", "--mask", "threshold", "--pose", "blank"]) == 0
    record = json.loads((out / "series.json").read_text())
    assert record["standardizer"] == f"stage1:{ckpt.resolve()}"
    assert Image.open(out / "standardized.png").size == (32, 48)  # the Stage I model's size
    assert len(record["images"]) == 1


def test_face_sim_needs_both_onnx_files(tmp_path):
    from serialgen.training.stage2.evaluate import ArcFaceOnnx

    with pytest.raises(UserInputError, match="--face-det: .*det_10g.onnx"):
        ArcFaceOnnx(tmp_path / "det_10g.onnx", tmp_path / "w600k_r50.onnx")


def test_reference_pictures_flatten_transparency_onto_white(tmp_path):
    """Generation and validation open references the same way: transparent pixels become white
    (the background of the CLIP padding and the standard images), never black."""
    from PIL import Image

    from serialgen.errors import UserInputError
    from serialgen.training.stage2.ip_adapter import open_reference

    rgba = Image.new("RGBA", (8, 12), (0, 0, 0, 0))
    rgba.putpixel((4, 6), (200, 10, 10, 255))
    rgba.save(tmp_path / "ref.png")
    rgb = open_reference(tmp_path / "ref.png", "--ref")
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((4, 6)) == (200, 10, 10)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    for name, text in (("bad.png", "not a readable image"), ("missing.png", "not found")):
        try:
            open_reference(tmp_path / name, "validation.references")
        except UserInputError as exc:
            assert str(exc).startswith("validation.references:") and text in str(exc)
        else:
            raise AssertionError(f"{name}: no error")

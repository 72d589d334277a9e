"""Stage I model on tiny random networks: FBDM, RPIM, the writer/reader link, checkpointing, CFG.

Forward-only checks on one tiny model are the fast tier; those that run backward passes or several
models are `slow`.
"""

from __future__ import annotations

import copy

import pytest
import torch

from serialgen.errors import UserInputError
from serialgen.training.common.checkpointing import check_model_config, load_trainable_weights, save_checkpoint
from serialgen.training.stage1.fbdm_rpim import FBDM, module_key
from serialgen.training.stage1.model import StandardizationModel, reference_unused_parameters
from serialgen.training.stage1.reference_attention import ReferenceContext, layer_hw, resize_map, self_attention_layers
from serialgen.training.common.tiny_models import build_tiny_unet

torch.set_num_threads(2)

B, H, W = 2, 96, 64  # image size; latents 12 x 8


def make_model(seed: int = 0, **kwargs) -> StandardizationModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(100 + seed)
        return StandardizationModel(build_tiny_unet(seed), build_tiny_unet(seed), vae_scale_factor=8, **kwargs)


def make_inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        noisy_latents=torch.randn(B, 4, H // 8, W // 8, generator=g),
        timesteps=torch.tensor([50, 700]),
        ref_latents=torch.randn(B, 4, H // 8, W // 8, generator=g),
        image_embeds=torch.randn(B, 1, 32, generator=g),
        std_pose=torch.rand(B, 3, H, W, generator=g),
        ref_pose=torch.rand(B, 3, H, W, generator=g),
        ref_mask=(torch.rand(B, 1, H, W, generator=g) > 0.5).float(),
    )


def randomize_trainable(model: torch.nn.Module, seed: int = 1) -> None:
    """Give every trainable weight (zero-initialised ones included) a non-trivial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_fbdm_matches_the_formula_on_a_hand_made_mask():
    fbdm = FBDM({"layer.a": 4})
    with torch.no_grad():
        fbdm.v_f[module_key("layer.a")].copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        fbdm.v_b[module_key("layer.a")].copy_(torch.tensor([-10.0, -20.0, -30.0, -40.0]))
    f = torch.arange(24, dtype=torch.float32).view(1, 6, 4)
    m = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.25, 1.0]).view(1, 6, 1)
    out = fbdm(f, m, "layer.a")
    v_f, v_b = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([-10.0, -20.0, -30.0, -40.0])
    assert torch.equal(out[0, 0], f[0, 0] + v_b)  # background token
    assert torch.equal(out[0, 1], f[0, 1] + v_f)  # foreground token
    assert torch.allclose(out[0, 4], (f[0, 4] + v_b) * 0.25 + (f[0, 4] + v_f) * 0.75)


def test_writer_applies_fbdm_with_the_mask_resized_to_each_layer():
    model = make_model()
    inputs = make_inputs()
    with torch.no_grad():
        for key in model.fbdm.v_f:
            model.fbdm.v_f[key].fill_(0.5)
            model.fbdm.v_b[key].fill_(-2.0)
    mask = torch.zeros(B, 1, H, W)
    mask[:, :, :, : W // 2] = 1.0  # left half background
    mask[1, :, : H // 4] = 1.0  # and the top quarter of sample 1
    with torch.no_grad():
        bank = model.encode_reference(inputs["ref_latents"], inputs["image_embeds"], inputs["ref_pose"], mask)
        no_fbdm = copy.deepcopy(model)
        no_fbdm.fbdm = None
        no_fbdm._install_processors()
        plain = no_fbdm.encode_reference(inputs["ref_latents"], inputs["image_embeds"], inputs["ref_pose"], mask)
    for name, feat in bank.items():
        hw = layer_hw(feat.shape[1], (H // 8, W // 8))
        m = resize_map(mask, hw).flatten(2).transpose(1, 2)
        # the first writer sees identical inputs, later ones see inputs changed by earlier FBDM
        if name == self_attention_layers(model.reference_unet)[0]:
            expected = (plain[name] - 2.0) * m + (plain[name] + 0.5) * (1 - m)
            assert torch.allclose(feat, expected, atol=1e-5)
        assert m.min() == 0 and m.max() == 1


def test_rpim_at_initialisation_leaves_outputs_unchanged():
    inputs = make_inputs()
    with_rpim, without = make_model(use_rpim=True), make_model(use_rpim=False)
    with torch.no_grad():
        out_a = with_rpim(**inputs)
        out_b = without(**inputs)
        assert torch.equal(out_a, out_b)
        for proj in with_rpim.rpim.proj.values():  # the test can fail: a non-zero projection changes the output
            proj.weight.normal_(0, 0.1)
        assert not torch.allclose(with_rpim(**inputs), out_b, atol=1e-4)


def test_reader_sees_exactly_the_writer_layers_by_name():
    model = make_model()
    inputs = make_inputs()
    writers = self_attention_layers(model.reference_unet)
    assert writers == self_attention_layers(model.denoising_unet) and len(writers) == 7
    trace: list = []
    with torch.no_grad():
        bank = model.encode_reference(inputs["ref_latents"], inputs["image_embeds"], inputs["ref_pose"], inputs["ref_mask"])
        model.denoise(inputs["noisy_latents"], inputs["timesteps"], bank, inputs["image_embeds"],
                      model.pose_embedding(inputs["std_pose"]), trace=trace)
    assert sorted(bank) == sorted(writers)
    assert sorted(name for name, _ in trace) == sorted(writers)  # each layer read once, by its own name
    for name, tensor in trace:
        assert tensor is bank[name]
        assert tensor.shape[2] == model.denoising_unet.get_submodule(name).to_q.in_features


def _grads(model, inputs):
    model.zero_grad(set_to_none=True)
    model(**inputs).square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
def test_gradient_checkpointing_runs_and_matches_plain_gradients():
    inputs = make_inputs()
    model = make_model()
    randomize_trainable(model)
    model.train()
    plain = _grads(model, inputs)
    model.enable_gradient_checkpointing()
    assert model.denoising_unet.down_blocks[0].attentions[0].gradient_checkpointing
    checkpointed = _grads(model, inputs)
    assert plain.keys() == checkpointed.keys() and len(plain) > 100
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], rtol=1e-4, atol=1e-6), name
    # gradients reach both UNets and the new modules
    for prefix in ("reference_unet.", "denoising_unet.", "fbdm.", "rpim.", "pose_guider."):
        assert any(n.startswith(prefix) and g.abs().sum() > 0 for n, g in plain.items()), prefix


@pytest.mark.slow
def test_gradient_accumulation_uses_no_stale_reference_features():
    model = make_model()
    randomize_trainable(model)
    a, b = make_inputs(seed=1), make_inputs(seed=2)
    fresh = copy.deepcopy(model)
    # micro-step 1 on batch a (forward + backward, no optimizer step), then micro-step 2 on batch b
    model(**a).square().mean().backward()
    out_b = model(**b)
    with torch.no_grad():
        assert torch.equal(out_b, fresh(**b))  # identical to a model that never saw batch a
        assert not torch.allclose(fresh(**a), out_b)
        # a stale bank (batch a's features) would change the output for batch b
        stale = fresh.encode_reference(a["ref_latents"], a["image_embeds"], a["ref_pose"], a["ref_mask"])
        wrong = fresh.denoise(b["noisy_latents"], b["timesteps"], stale, b["image_embeds"], fresh.pose_embedding(b["std_pose"]))
        assert not torch.allclose(wrong, out_b, atol=1e-4)


def test_dropped_reference_equals_plain_self_attention():
    """use_reference=False (reference dropout / CFG unconditional half) == a denoiser with no bank."""
    model = make_model()
    randomize_trainable(model)
    x = make_inputs()
    with torch.no_grad():
        bank = model.encode_reference(x["ref_latents"], x["image_embeds"], x["ref_pose"], x["ref_mask"])
        pose = model.pose_embedding(x["std_pose"])
        mixed = model.denoise(x["noisy_latents"], x["timesteps"], bank, x["image_embeds"], pose,
                              use_reference=torch.tensor([False, True]))
        no_ref = model.denoise(x["noisy_latents"], x["timesteps"], {}, torch.zeros_like(x["image_embeds"]), pose)
        full = model.denoise(x["noisy_latents"], x["timesteps"], bank, x["image_embeds"], pose)
    assert torch.allclose(mixed[0], no_ref[0], atol=1e-5)
    assert torch.allclose(mixed[1], full[1], atol=1e-5)
    assert not torch.allclose(mixed[0], full[0], atol=1e-3)


@pytest.mark.slow
def test_unused_reference_tail_is_frozen_and_matches_a_gradient_probe():
    for blocks in [{}, dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                           up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))]:
        model = StandardizationModel(build_tiny_unet(0, **blocks), build_tiny_unet(0, **blocks), vae_scale_factor=8)
        dead = set(reference_unused_parameters(model.reference_unet))
        assert dead == {n for n, p in model.reference_unet.named_parameters() if not p.requires_grad}
        model.reference_unet.requires_grad_(True)
        model(**make_inputs()).square().mean().backward()
        no_grad = {n for n, p in model.reference_unet.named_parameters() if p.grad is None}
        assert no_grad == dead and "conv_out.weight" in dead


@pytest.mark.slow
def test_save_then_load_gives_identical_outputs(tmp_path):
    model = make_model()
    randomize_trainable(model)
    inputs = make_inputs()
    with torch.no_grad():
        expected = model(**inputs)
    path = save_checkpoint(tmp_path, 7, model, train_state={"data": {}}, config={"note": "test"},
                           model_config=model.model_config())
    restored = make_model()
    with torch.no_grad():
        assert not torch.allclose(restored(**inputs), expected, atol=1e-4)
        names = load_trainable_weights(restored, path)
        assert torch.equal(restored(**inputs), expected)
    assert len(names) == sum(1 for p in model.parameters() if p.requires_grad)
    assert not any(n.startswith("reference_unet.conv_out") for n in names)  # frozen tail not saved
    # the model's own config sits beside its weights; an ablation that does not match is one line
    check_model_config(path, restored.model_config())
    with pytest.raises(UserInputError, match=r"model_config.json: the weights belong to a model with use_fbdm=True, "
                                             r"this config builds use_fbdm=False"):
        check_model_config(path, make_model(use_fbdm=False).model_config())


def test_layer_geometry_rounds_odd_sizes_up():
    assert layer_hw(96, (12, 8)) == (12, 8)
    assert layer_hw(24, (12, 8)) == (6, 4)
    assert layer_hw(3 * 2, (5, 3)) == (3, 2)
    with pytest.raises(RuntimeError):
        layer_hw(7, (12, 8))


def test_min_snr_loss_is_finite_with_zero_terminal_snr():
    from serialgen.training.common.tiny_models import build_tiny_scheduler
    from serialgen.training.stage1.train import diffusion_loss

    pred, target = torch.randn(3, 4, 6, 4), torch.randn(3, 4, 6, 4)
    t = torch.tensor([0, 500, 999])
    for prediction_type in ("epsilon", "v_prediction"):
        sched = build_tiny_scheduler(rescale_betas_zero_snr=True, prediction_type=prediction_type)
        assert sched.alphas_cumprod[-1] == 0  # SNR 0 at t = 999
        weighted = diffusion_loss(pred, target, t, sched, 5.0)
        assert torch.isfinite(weighted) and weighted != diffusion_loss(pred, target, t, sched, None)

"""Stage I inputs: reference padding/masks, DWPose keypoint mapping, and training on real loader shards."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from serialgen.errors import UserInputError
from serialgen.training.stage1.config import load_stage1_config
from serialgen.training.stage1.dwpose import DWPoseOnnx, wholebody_to_canonical
from serialgen.training.stage1.reference_inputs import load_reference

torch.set_num_threads(2)


def test_reference_is_padded_white_and_masked_from_alpha(tmp_path):
    rgba = np.zeros((40, 60, 4), np.uint8)  # wide picture: padded above and below to 2:3
    rgba[10:30, 20:40] = (10, 200, 10, 255)
    Image.fromarray(rgba).save(tmp_path / "wide.png")
    out = load_reference(tmp_path / "wide.png", (64, 96))
    assert out["ref"].shape == (3, 96, 64) and out["ref_mask"].shape == (1, 96, 64)
    assert torch.allclose(out["ref"][:, 0, 0], torch.ones(3))  # padding is white ...
    assert out["ref_mask"][0, 0, 0] == 1 and out["ref_mask"][0, 48, 32] == 0  # ... and background; figure is not
    assert out["ref_mask"].mean() > 0.8 and torch.equal(out["ref_pose"], torch.zeros(3, 96, 64))
    rgb = np.where(rgba[..., 3:] == 0, 255, rgba[..., :3]).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "white.png")
    out_rgb = load_reference(tmp_path / "white.png", (64, 96))  # no alpha: near-white pixels are background
    assert ((out_rgb["ref_mask"] - out["ref_mask"]).abs() < 0.5).float().mean() > 0.97
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(UserInputError, match="bad.png: cannot read image"):
        load_reference(tmp_path / "bad.png", (64, 96))


def test_dwpose_wholebody_keypoints_map_onto_the_canonical_order():
    kps = np.stack([np.arange(133, dtype=np.float32), np.arange(133, dtype=np.float32) + 0.5], 1)
    scores = np.full(133, 0.9, np.float32)
    scores[10] = 0.1  # COCO right wrist below threshold
    pose = wholebody_to_canonical(kps, scores, (200, 200))
    assert pose.xy[0, 0] == 0  # nose
    assert np.allclose(pose.xy[1], kps[[5, 6]].mean(0)) and pose.visible[1]  # neck = shoulders' mean
    assert pose.xy[2, 0] == 6 and pose.xy[5, 0] == 5  # r_shoulder = COCO 6, l_shoulder = COCO 5
    assert not pose.visible[4]  # r_wrist (COCO 10) under the score threshold
    assert pose.xy[14, 0] == 2 and pose.xy[17, 0] == 3  # r_eye, l_ear
    assert pose.xy[18, 0] == 17 and pose.xy[23, 0] == 22  # feet
    assert pose.xy[24, 0] == 91 and pose.xy[45, 0] == 112 and pose.xy[65, 0] == 132  # left hand root, right hand
    assert pose.face.shape == (68, 2)


def test_dwpose_missing_file_is_a_one_line_error(tmp_path):
    with pytest.raises(UserInputError, match="--dwpose-det .*yolox_l.onnx not found: expected the DWPose ONNX file"):
        DWPoseOnnx(tmp_path / "yolox_l.onnx", tmp_path / "dw.onnx")


def test_reference_letterbox_matches_the_hand_written_one_it_replaced():
    """load_reference letterboxes through serialgen.imaging (LANCZOS on a transparent canvas, then
    flatten on white); the pixels equal the former hand-written resize + paste + alpha_composite."""
    rng = np.random.default_rng(0)
    for h, w in [(40, 60), (77, 130), (200, 100)]:
        rgba = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
        s = min(64 / w, 96 / h)
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        canvas = Image.new("RGBA", (64, 96), (255, 255, 255, 0))
        canvas.paste(rgba.resize((nw, nh), Image.Resampling.LANCZOS), ((64 - nw) // 2, (96 - nh) // 2))
        expected = np.asarray(Image.alpha_composite(Image.new("RGBA", (64, 96), (255, 255, 255, 255)), canvas).convert("RGB"))
        out = load_reference(rgba, (64, 96))
        got = ((out["ref"].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
        assert np.array_equal(got, expected)
        assert np.allclose(1 - out["ref_mask"][0].numpy(), np.asarray(canvas)[..., 3] / 255.0, atol=1e-6)


def test_training_samples_get_their_own_standard_pose_or_the_checkpoints_canonical_one(tmp_path):
    """Training and eval read each character's own standard pose map (the one that agrees with its
    standard image), uint8 out of the loader and converted on the device; a `data.canonical_share` of
    samples get the canonical map instead, exactly the map a checkpoint stores for pictures."""
    from test_loader_synth import write_synthetic_shards

    from serialgen.training.stage1.data import batch_to_device, canonical_pose_map, collate_stage1, open_stage1_dataset

    shards = tmp_path / "shards"
    write_synthetic_shards(shards, n_shards=1, per_shard=3, split="train", size=(32, 48))
    canonical = canonical_pose_map((32, 48))
    assert canonical.shape == (3, 48, 32) and canonical.max() == 1.0 and canonical.mean() > 0.02

    def batch(share: float) -> dict:
        data = open_stage1_dataset(str(shards), resolution=(32, 48), seed=0, canonical_share=share)
        samples = list(data)
        assert samples[0]["ref"].dtype == torch.uint8 and samples[0]["std_pose"].dtype == torch.uint8
        return batch_to_device(collate_stage1(samples), "cpu")

    own, always = batch(0.0), batch(1.0)
    assert own["ref"].dtype == torch.float32 and -1 <= own["ref"].min() and own["ref"].max() <= 1
    assert own["ref_mask"].dtype == torch.float32 and set(own["ref_mask"].unique().tolist()) <= {0.0, 1.0}
    for i in range(3):
        assert torch.allclose(always["std_pose"][i], canonical, atol=1e-6)  # the canonical share: the checkpoint's map
        assert not torch.allclose(own["std_pose"][i], canonical, atol=0.1)  # this figure's own map differs
    assert torch.equal(own["std"], always["std"])  # the standard image is the character's either way


@pytest.mark.slow
def test_training_on_loader_shards_resumes_exactly(tmp_path):
    """Real shards through dataset/loader.py (an IterableDataset: resume replays and skips batches), with
    real backgrounds, a canonical share and mask/pose dropout: every random draw resumes exactly."""
    from test_loader_synth import synth_background, write_synthetic_shards

    from serialgen.training.stage1.train import train_stage1

    shards = tmp_path / "shards"
    write_synthetic_shards(shards, n_shards=2, per_shard=4, split="train", size=(32, 48))
    write_synthetic_shards(shards, n_shards=1, per_shard=3, split="test", size=(32, 48), first_character=50)
    backgrounds = tmp_path / "backgrounds"
    backgrounds.mkdir()
    for i in range(3):
        synth_background(backgrounds / f"bg{i}.png", seed=i, size=(80, 60))
    config = lambda: load_stage1_config("stage1-tiny", [  # noqa: E731
        f"data.train_shards={shards}", f"data.val_shards={shards}", "data.epoch_length=6", "train.max_steps=4",
        "data.resolution=32x48", f"data.backgrounds={backgrounds}", "data.procedural_backgrounds=false",
        "data.canonical_share=0.5", "train.mask_dropout=0.3", "train.pose_dropout=0.3",
        "train.checkpoint_every=2", "validation.every=100", "inference.num_inference_steps=2"])
    full = train_stage1(config(), output_dir=tmp_path / "full", resume="never")
    train_stage1(config(), output_dir=tmp_path / "cut", resume="never", stop_after=3)  # checkpoint at 2, dies at 3
    resumed = train_stage1(config(), output_dir=tmp_path / "cut", resume=str(tmp_path / "cut/checkpoints/step-00000002"))
    assert resumed.first_step == 3
    for step in (3, 4):
        assert resumed.losses[step] == pytest.approx(full.losses[step], rel=1e-6)
    state = json.loads((tmp_path / "cut/checkpoints/step-00000004/train_state.json").read_text())
    assert state["data"] == {"epoch": 1, "batch_in_epoch": 1}  # 6 samples per epoch = 3 batches of 2

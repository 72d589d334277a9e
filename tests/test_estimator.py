"""The person estimator's pure parts (no MediaPipe needed): the landmark mapping onto our keypoint
order, the worker's framing, the estimate's summary (people, box, confidence), where the estimator
venv is looked for, the reference preparer's mask/pose sources, and the annotation set's join and
placement in the loader. The real MediaPipe runs in tests/test_estimator_real.py (slow)."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from serialgen.assets_manifest.skeleton import KEYPOINT_NAMES
from serialgen.dataset import annotations, tarset
from serialgen.dataset.mediapipe_worker import read_frame, write_frame
from serialgen.dataset.person_estimate import (
    BLAZEPOSE_OF_CANONICAL,
    EstimatorUnavailable,
    MediaPipeEstimator,
    PersonEstimate,
    _estimate_from_response,
    estimator_python,
    landmarks_to_pose,
    mask_iou,
    pck,
)
from serialgen.dataset.posemap import Pose
from serialgen.training.stage1.reference_inputs import ReferencePreparer

K = {n: i for i, n in enumerate(KEYPOINT_NAMES)}


def _landmarks(visibility: float = 0.9) -> list:
    """33 BlazePose landmarks at distinct places: landmark i at (10 + i, 20 + 2 i)."""
    return [[10.0 + i, 20.0 + 2 * i, 0.0, visibility, 1.0] for i in range(33)]


def test_blazepose_landmarks_map_onto_the_canonical_order():
    pose, scores = landmarks_to_pose(_landmarks(), None, None, (200, 200))
    at = lambda i: [10.0 + i, 20.0 + 2 * i]  # noqa: E731
    assert pose.xy[K["nose"]].tolist() == at(0)
    assert pose.xy[K["neck"]].tolist() == np.mean([at(11), at(12)], 0).tolist()  # mean of the shoulders
    assert pose.xy[K["r_shoulder"]].tolist() == at(12) and pose.xy[K["l_shoulder"]].tolist() == at(11)
    assert pose.xy[K["r_wrist"]].tolist() == at(16) and pose.xy[K["l_ankle"]].tolist() == at(27)
    assert pose.xy[K["r_eye"]].tolist() == at(5) and pose.xy[K["l_ear"]].tolist() == at(7)
    assert pose.xy[K["l_big_toe"]].tolist() == at(31) and pose.xy[K["r_heel"]].tolist() == at(30)
    # BlazePose has no small toe and, without hand landmarks, no hand points: invisible
    assert not pose.visible[K["l_small_toe"]] and not pose.visible[K["r_small_toe"]]
    assert not pose.visible[K["l_hand_root"]:].any()
    assert pose.visible[:18].all() and len(BLAZEPOSE_OF_CANONICAL) == 22
    assert pose.face.shape == (0, 2)  # the training maps draw no face mesh


def test_hands_visibility_and_frame():
    left = [[100.0 + j, 50.0, 0.0] for j in range(21)]
    right = [[150.0 + j, 60.0, 0.0] for j in range(21)]
    lm = _landmarks()
    lm[16][3] = 0.2  # right wrist barely visible
    lm[0][0] = -5.0  # nose left of the picture
    pose, scores = landmarks_to_pose(lm, left, right, (160, 200), visibility=0.5)
    assert pose.xy[K["l_hand_root"]].tolist() == [100.0, 50.0] and pose.xy[K["l_pinky_4"]].tolist() == [120.0, 50.0]
    assert pose.xy[K["r_hand_root"]].tolist() == [150.0, 60.0] and scores[K["r_thumb_1"]] == 1.0
    assert not pose.visible[K["r_hand_root"] + 10:].any()  # x >= 160: outside the picture
    assert not pose.visible[K["r_wrist"]] and scores[K["r_wrist"]] == pytest.approx(0.2)
    assert not pose.visible[K["nose"]]
    lm[11][3] = 0.1  # one shoulder unseen: the neck (their mean) is unseen too
    pose, scores = landmarks_to_pose(lm, None, None, (160, 200))
    assert not pose.visible[K["neck"]] and scores[K["neck"]] == pytest.approx(0.1)


def test_frames_round_trip_and_refuse_a_stream_out_of_step():
    buf = io.BytesIO()
    write_frame(buf, {"width": 2, "height": 1}, b"\x01\x02\x03\x04\x05\x06")
    write_frame(buf, {"ok": True})
    buf.seek(0)
    assert read_frame(buf) == ({"width": 2, "height": 1, "nbytes": 6}, b"\x01\x02\x03\x04\x05\x06")
    assert read_frame(buf) == ({"ok": True, "nbytes": 0}, b"")
    assert read_frame(buf) is None
    with pytest.raises(ValueError, match="out of step"):
        read_frame(io.BytesIO(b"\xff\xff\xff\xff{}"))
    with pytest.raises(EOFError, match="stream ended after 2 of 10 bytes"):
        read_frame(io.BytesIO(b"\x00\x00\x00\x0a{}"))


def test_estimate_summary_people_box_and_confidence():
    w, h = 100, 200
    prob = np.zeros((h, w), np.uint8)
    prob[40:180, 30:70] = 255
    lm = _landmarks(0.8)
    for row in lm[23:]:
        row[1] = 500.0  # legs below the picture (a waist-up photo): not a doubt about the person
        row[3] = 0.1
    faces = [[40, 40, 60, 70, 0.9], [80, 10, 95, 38, 0.8], [0, 0, 3, 4, 0.7]]  # the tiny one is scenery
    header = {"pose": lm, "left_hand": None, "right_hand": None, "faces": faces}
    est = _estimate_from_response(header, prob.tobytes(), (w, h), visibility=0.5, face_ratio=0.5)
    assert est.person and est.people == 2
    assert est.box == (10.0, 20.0, 70.0, 180.0)  # mask rows 40..179, cols 30..69, and the visible points
    assert est.height_fraction() == pytest.approx(0.8)
    assert est.confidence == pytest.approx(0.8)  # the legs outside are not counted
    assert est.background_mask()[100, 50] == 0 and est.background_mask()[10, 10] == 1
    record = est.pose_record("test")
    assert record["names"] == KEYPOINT_NAMES and record["person"] and record["people"] == 2 and record["source"] == "test"
    nobody = _estimate_from_response({"pose": None, "faces": []}, b"", (w, h), 0.5, 0.5)
    assert not nobody.person and nobody.people == 0 and nobody.box is None and nobody.foreground().sum() == 0


def test_where_the_estimator_venv_is_looked_for(tmp_path, monkeypatch):
    monkeypatch.delenv("SERIALGEN_ESTIMATOR_PYTHON", raising=False)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    monkeypatch.setenv("SERIALGEN_ESTIMATOR_VENV", str(venv))
    assert estimator_python() is None  # no stamp: the setup did not finish
    (venv / ".serialgen-estimator").write_text("an older requirements list\n")
    assert estimator_python() is None
    from serialgen.dataset import person_estimate

    (venv / ".serialgen-estimator").write_text(person_estimate._REQUIREMENTS_DIGEST + "\n")
    assert estimator_python() == venv / "bin" / "python"
    monkeypatch.setenv("SERIALGEN_ESTIMATOR_PYTHON", "/opt/other/python")
    assert str(estimator_python()) == "/opt/other/python"
    monkeypatch.delenv("SERIALGEN_ESTIMATOR_PYTHON")
    monkeypatch.setenv("SERIALGEN_ESTIMATOR_VENV", str(tmp_path / "none"))
    with pytest.raises(EstimatorUnavailable, match=r"^person estimator not set up \(.*none has no ready environment\): "
                                                   "run `serialgen estimator setup` once"):
        MediaPipeEstimator()


def test_iou_and_pck():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2], b[1:3] = True, True
    assert mask_iou(a, b) == pytest.approx(4 / 12) and mask_iou(b & False, a & False) == 1.0
    truth = Pose(np.array([[0, 0], [10, 0], [20, 0]], np.float32), np.array([True, True, False]), (100, 100),
                 np.zeros((0, 2), np.float32))
    guess = Pose(np.array([[3, 4], [10, 0], [20, 0]], np.float32), np.array([True, False, True]), (100, 100),
                 np.zeros((0, 2), np.float32))
    correct, counted, per = pck(guess, truth, 5.0)  # 5 px: the first is right; the second is unreported
    assert (correct, counted, per.tolist()) == (1, 2, [True, False, False])
    assert pck(guess, truth, 4.9)[0] == 0


class _StandIn:
    """A fixed estimate, to test what the preparer does with one (the real estimator: test_estimator_real.py)."""

    name = "stand-in"

    def __init__(self, person: bool):
        self.person, self.calls = person, 0

    def __call__(self, image):
        self.calls += 1
        h, w = image.shape[:2]
        prob = np.zeros((h, w), np.uint8)
        prob[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 255
        pose, scores = landmarks_to_pose(_landmarks(), None, None, (w, h))
        return PersonEstimate((w, h), self.person, prob if self.person else None, pose, scores,
                              0.9 if self.person else 0.0, int(self.person), (0, 0, w, h) if self.person else None)


def test_reference_preparer_records_where_mask_and_pose_came_from(tmp_path, monkeypatch):
    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (60, 80), (120, 130, 140)).save(photo)
    ref = ReferencePreparer(estimator=_StandIn(person=True))(photo, (64, 96))
    assert (ref["mask_source"], ref["pose_source"]) == ("estimator", "estimator") and ref["estimate"].person
    assert isinstance(ref["ref"], torch.Tensor) and ref["ref"].shape == (3, 96, 64)
    mask = ref["ref_mask"][0].numpy()
    assert mask[48, 32] == 0 and mask[2, 2] == 1 and ref["ref_pose"].shape == (3, 96, 64) and ref["ref_pose"].max() > 0
    nobody = ReferencePreparer(estimator=_StandIn(person=False))(photo, (64, 96))
    # no person: exactly Stage I's dropout inputs (train.mask_dropout / pose_dropout), said so
    assert (nobody["mask_source"], nobody["pose_source"]) == ("none", "none")
    assert nobody["ref_mask"].abs().sum() == 0 and nobody["ref_pose"].abs().sum() == 0
    rgba = Image.new("RGBA", (60, 80), (0, 0, 0, 0))
    rgba.paste((200, 0, 0, 255), (10, 10, 50, 70))
    alpha = ReferencePreparer(estimator=_StandIn(person=True))(rgba, (64, 96))
    assert alpha["mask_source"] == "alpha" and alpha["pose_source"] == "estimator"
    threshold = ReferencePreparer(mask="threshold", pose="blank")(photo, (64, 96))
    assert (threshold["mask_source"], threshold["pose_source"], threshold["estimate"]) == ("threshold", "blank", None)

    monkeypatch.delenv("SERIALGEN_ESTIMATOR_PYTHON", raising=False)
    monkeypatch.setenv("SERIALGEN_ESTIMATOR_VENV", str(tmp_path / "none"))
    warned = []
    auto = ReferencePreparer(warn=warned.append)  # auto without the estimator: the old inputs, said once
    assert (auto.mask_mode, auto.pose_mode) == ("threshold", "blank")
    assert len(warned) == 1 and "not set up" in warned[0] and "--mask threshold --pose blank" in warned[0]
    with pytest.raises(EstimatorUnavailable, match="--mask/--pose estimator: the person estimator is not set up"):
        ReferencePreparer(mask="estimator")


def _annotation_set(root, key="k1", person=True, size=(40, 60)):
    w, h = size
    fg = np.zeros((h, w), bool)
    fg[10:50, 5:25] = True
    pose = Pose(np.zeros((66, 2), np.float32), np.zeros(66, bool), size, np.zeros((0, 2), np.float32))
    pose.xy[0], pose.visible[0] = (15.0, 12.0), True
    est = PersonEstimate(size, person, fg.astype(np.uint8) * 255 if person else None, pose, np.zeros(66, np.float32),
                         0.9, 1, (5, 10, 25, 50))
    with tarset.TarWriter(root / "train" / "shard-a.tar", annotations.SCHEMA) as w_:
        w_.write(key, {"est_mask.png": annotations._encode_mask(est.foreground()),
                       "est_pose.json": annotations.tarset_json(est.pose_record("t"))})
        summary = w_.close()
    tarset.write_index(root, annotations.SCHEMA, {"shards": [{"path": "train/shard-a.tar", "split": "train",
                                                               "samples": 1, "bytes": summary.bytes,
                                                               "sha256": summary.sha256}]})
    return fg


def test_annotations_join_by_key_and_follow_the_render_placement(tmp_path):
    fg = _annotation_set(tmp_path)
    reader = annotations.AnnotationReader(tmp_path)
    mask, pose, person = reader.lookup("/data/shards/train/shard-a.tar", "k1")
    assert person and (mask == fg).all() and pose.visible[0] and pose.xy[0].tolist() == [15.0, 12.0]
    assert reader.lookup("/data/shards/train/shard-a.tar", "other") is None
    assert reader.lookup("/data/shards/test/shard-b.tar", "k1") is None  # not annotated: the exact inputs stay

    # placed as the loader places the render (x' = 2 x + 10, y' = 2 y - 4) on an 100 x 120 canvas
    transform = (2.0, 2.0, 10.0, -4.0)
    placed = annotations.warp_mask(fg, transform, (100, 120))
    assert placed[2 * 30 - 4, 2 * 15 + 10] == 0 and placed[2 * 5 - 4, 2 * 3 + 10] == 1  # inside / outside the person
    assert placed[:, 95:].all()  # beyond the render's frame: background
    ys, xs = np.nonzero(placed == 0)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (20, 59, 16, 95)

    class Placed:
        pass

    p = Placed()
    p.transform = transform
    mixer = annotations.EstimateMixer(tmp_path, 1.0, (100, 120))
    got = mixer.apply("/x/train/shard-a.tar", "k1", p, random.Random(0))
    assert got is not None and (got[0] == placed).all() and got[1].shape == (120, 100, 3) and got[1].any()
    assert mixer.apply("/x/train/shard-a.tar", "missing", p, random.Random(0)) is None and mixer.missing == 1
    never = annotations.EstimateMixer(tmp_path, 0.0, (100, 120))
    rng = random.Random(0)
    state = rng.getstate()
    assert never.apply("/x/train/shard-a.tar", "k1", p, rng) is None and rng.getstate() == state  # no draw at 0


def test_no_person_annotation_gives_the_no_estimate_inputs(tmp_path):
    _annotation_set(tmp_path, person=False)

    class Placed:
        transform = (1.0, 1.0, 0.0, 0.0)

    mask, pose_map = annotations.EstimateMixer(tmp_path, 1.0, (40, 60)).apply("/s/train/shard-a.tar", "k1", Placed(),
                                                                              random.Random(1))
    assert mask.shape == (60, 40) and not mask.any() and not pose_map.any()
    record = json.loads(tarset.read_member(tmp_path / "train" / "shard-a.tar",
                                           *dict(tarset.scan_shard(tmp_path / "train" / "shard-a.tar"))["k1"]["est_pose.json"]))
    assert record["person"] is False


def test_loader_mixes_in_the_estimates_placed_like_the_render(tmp_path):
    """LoaderConfig.estimated_share: 0 yields exactly what it yielded before (no extra draw); 1 gives
    every annotated sample the estimator's mask and pose, on the composite's own placement."""
    from test_loader_synth import write_synthetic_shards

    from serialgen.dataset.loader import LoaderConfig, RenderPairDataset
    from serialgen.errors import UserInputError

    size = (64, 96)
    (shard,) = write_synthetic_shards(tmp_path, n_shards=1, per_shard=3, size=size)
    keys = [k for k, _ in tarset.iter_samples(shard)]
    out = tmp_path / annotations.ANNOTATION_DIR
    fg = np.zeros((96, 64), bool)
    fg[20:80, 16:48] = True  # the "estimated" person: a box
    pose = Pose(np.zeros((66, 2), np.float32), np.zeros(66, bool), size, np.zeros((0, 2), np.float32))
    pose.xy[0], pose.visible[0] = (32.0, 30.0), True
    with tarset.TarWriter(out / "train" / shard.name, annotations.SCHEMA) as w:
        for i, key in enumerate(keys):
            est = PersonEstimate(size, i != 1, fg.astype(np.uint8) * 255 if i != 1 else None, pose,
                                 np.zeros(66, np.float32), 0.9, 1, (16, 20, 48, 80))
            w.write(key, {"est_mask.png": annotations._encode_mask(est.foreground()),
                          "est_pose.json": annotations.tarset_json(est.pose_record("t"))})
        summary = w.close()
    tarset.write_index(out, annotations.SCHEMA, {"shards": [{"path": f"train/{shard.name}", "split": "train",
                                                              "samples": 3, "bytes": summary.bytes,
                                                              "sha256": summary.sha256}]})

    def samples(**kw):
        cfg = LoaderConfig(resolution=size, shuffle_buffer=0, seed=5, dtype="uint8", **kw)
        return {s["__key__"]: s for s in RenderPairDataset(tmp_path, None, cfg)}

    exact, before, mixed = samples(), samples(estimated_share=0.0), samples(estimated_share=1.0)
    for key in keys:
        for k in ("ref", "ref_mask", "ref_pose"):
            assert torch.equal(exact[key][k], before[key][k])
    # the first sample's composite and exact keypoints are untouched (later ones differ: one more draw each)
    assert torch.equal(exact[keys[0]]["ref"], mixed[keys[0]]["ref"])
    assert torch.equal(exact[keys[0]]["ref_keypoints"], mixed[keys[0]]["ref_keypoints"])
    batch = next(iter(RenderPairDataset(tmp_path, None, LoaderConfig(resolution=size, shuffle_buffer=0, seed=5,
                                                                     estimated_share=1.0, batch_size=3))))
    assert torch.equal(batch["ref_mask"], torch.stack([mixed[k]["ref_mask"] for k in batch["__key__"]]))
    found, nobody = mixed[keys[0]], mixed[keys[1]]
    assert not torch.equal(found["ref_mask"], exact[keys[0]]["ref_mask"])
    assert found["ref_mask"].float().mean() > 0.3 and (found["ref_mask"] == 0).any()
    assert nobody["ref_mask"].sum() == 0 and nobody["ref_pose"].sum() == 0  # the "no estimate" inputs
    with pytest.raises(UserInputError, match=r"estimated_share=2: expected a probability in \[0, 1\]"):
        LoaderConfig(estimated_share=2)
    with pytest.raises(tarset.TarSetError, match="elsewhere/index.json: not found; expected an annotation set"):
        RenderPairDataset(tmp_path, None, LoaderConfig(resolution=size, estimated_share=0.5,
                                                       annotations=str(tmp_path / "elsewhere")))

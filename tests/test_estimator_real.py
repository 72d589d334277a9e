"""The real person estimator (MediaPipe 0.10.21 in its venv; ``slow``): created once per machine by the
first test that needs it (``setup_estimator_venv``, about a minute from PyPI; later runs find it ready),
then run on real photographs (scikit-image's astronaut and coffee), through an annotation shard, and
through a pair build whose skip policy must name every reason."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def estimator_python():
    from serialgen.dataset.person_estimate import setup_estimator_venv

    return setup_estimator_venv()


@pytest.fixture(scope="module")
def estimator(estimator_python):
    from serialgen.dataset.person_estimate import MediaPipeEstimator

    with MediaPipeEstimator(estimator_python) as est:
        yield est


def _photo(name: str) -> np.ndarray:
    import skimage.data

    image = getattr(skimage.data, name)()
    return np.ascontiguousarray(image if image.ndim == 3 else np.repeat(image[..., None], 3, 2))


def test_a_person_is_found_with_mask_and_keypoints(estimator):
    est = estimator(_photo("astronaut"))
    assert est.person and est.people == 1 and est.confidence > 0.6
    names = ["nose", "neck", "r_shoulder", "l_shoulder", "r_eye", "l_eye"]
    from serialgen.assets_manifest.skeleton import KEYPOINT_NAMES

    assert all(est.pose.visible[KEYPOINT_NAMES.index(n)] for n in names)
    # the astronaut's left shoulder is on the picture's right
    assert est.pose.xy[KEYPOINT_NAMES.index("l_shoulder"), 0] > est.pose.xy[KEYPOINT_NAMES.index("r_shoulder"), 0]
    fg = est.foreground()
    assert 0.3 < fg.mean() < 0.8 and fg[300, 250] and not fg[20, 500]  # the suit, not the flag's corner
    assert est.height_fraction() > 0.8
    nobody = estimator(_photo("coffee"))
    assert not nobody.person and nobody.probability is None and nobody.confidence == 0.0


def test_a_worker_that_died_is_restarted(estimator):
    estimator._proc.kill()
    estimator._proc.wait()
    assert estimator(_photo("astronaut")).person


def test_annotation_shard_of_real_photos(estimator, tmp_path):
    """Two 'renders' cut from photos (the astronaut's own estimated mask as alpha; a coffee cup): the
    annotation tar holds both keys, the no-person one says so, and the quality counts them."""
    from serialgen.dataset import annotations
    from serialgen.dataset.posemap import parse_pose

    astronaut = _photo("astronaut")
    alpha = estimator(astronaut).foreground().astype(np.uint8) * 255
    coffee = np.asarray(Image.fromarray(_photo("coffee")).resize((512, 512)))
    shard = tmp_path / "train" / "s.tar"
    shard.parent.mkdir()
    pose = {"width": 512, "height": 512, "names": ["nose"], "keypoints": [[0, 0, 0]]}
    with tarfile.open(shard, "w") as tar:
        for key, rgb, a, character in (("a1", astronaut, alpha, "astro"), ("c1", coffee, np.full((512, 512), 255, np.uint8), "cup")):
            buf = io.BytesIO()
            Image.fromarray(np.dstack([rgb, a])).save(buf, format="PNG")
            for name, data in (("ref.png", buf.getvalue()), ("ref_pose.json", json.dumps(pose).encode()),
                               ("meta.json", json.dumps({"character": character, "view": {"framing": "upper_body"}}).encode())):
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    record = annotations.annotate_shard(shard, tmp_path / "ann" / "train" / "s.tar", estimator, [])
    assert record["tar"]["samples"] == 2 and json.loads((tmp_path / "ann" / "train" / "s.json").read_text()) == record
    assert record["quality"]["astro"]["upper_body"]["iou_sum"] > 0.8  # its own mask, on another background
    assert record["quality"]["cup"]["upper_body"]["no_person"] == 1
    members = dict(annotations.tarset.scan_shard(tmp_path / "ann" / "train" / "s.tar"))
    got = json.loads(annotations.tarset.read_member(tmp_path / "ann" / "train" / "s.tar", *members["c1"]["est_pose.json"]))
    assert got["person"] is False and parse_pose(got).visible.sum() == 0


@pytest.mark.ray
def test_pairs_build_on_real_photos_skips_with_reasons(estimator_python, tmp_path):
    from serialgen.dataset.pairs import iter_pairs
    from serialgen.training.stage2.build_pairs import SkipPolicy, build_pairs

    corpus = tmp_path / "photos"
    corpus.mkdir()
    astronaut = Image.fromarray(_photo("astronaut"))
    astronaut.save(corpus / "astronaut.jpg", quality=92)
    Image.fromarray(_photo("coffee")).save(corpus / "coffee.jpg", quality=92)
    two = Image.new("RGB", (1024, 512))
    two.paste(astronaut, (0, 0))
    two.paste(astronaut.transpose(Image.Transpose.FLIP_LEFT_RIGHT), (512, 0))
    two.save(corpus / "two_astronauts.jpg", quality=92)
    # On the 512x768 canvas the astronaut is 0.65 of the height, the cameraman 0.58.
    Image.fromarray(_photo("camera")).save(corpus / "camera.png")
    report = build_pairs(corpus, tmp_path / "pairs", standardizer="identity", samples_per_shard=10, progress=False,
                         policy=SkipPolicy(min_height=0.62))
    assert report["pairs"] == 1 and report["skipped"] == 3 and report["skip_rate"] == 0.75
    assert report["skip_reasons"] == {"no person found": 1, "person too small": 1, "several people": 1}
    (pair,) = iter_pairs(tmp_path / "pairs")
    assert pair.meta["source"] == "astronaut.jpg"
    assert (pair.meta["mask_source"], pair.meta["pose_source"]) == ("estimator", "estimator")
    assert pair.meta["estimate"]["person"] and pair.meta["estimate"]["people"] == 1
    assert pair.meta["estimate"]["confidence"] > 0.6 and "mediapipe-0.10.21" in pair.meta["estimate"]["estimator"]


def test_standardize_a_photo_uses_the_estimator_by_default(estimator_python, tmp_path, capsys):
    """`serialgen standardize` on a photo without alpha: the estimator's mask and pose (no warning);
    the issue's measurement: a figure on grey had a background fraction of 0.11 from the threshold."""
    from serialgen.cli import main
    from serialgen.training.common.config import override
    from serialgen.training.stage1.config import load_stage1_config
    from serialgen.training.stage1.reference_inputs import ReferencePreparer
    from serialgen.training.stage1.train import train_stage1

    photo = tmp_path / "astronaut.jpg"
    Image.fromarray(_photo("astronaut")).save(photo, quality=92)
    with_estimator = ReferencePreparer()(photo, (64, 96))
    threshold = ReferencePreparer(mask="threshold", pose="blank")(photo, (64, 96))
    assert (with_estimator["mask_source"], with_estimator["pose_source"]) == ("estimator", "estimator")
    # letterboxed 64x64 in 64x96: the white bands are background either way; the person is not
    assert 0.45 < with_estimator["ref_mask"].mean() < 0.75 and threshold["ref_mask"].mean() < 0.4
    assert with_estimator["ref_pose"].sum() > 0 and threshold["ref_pose"].sum() == 0

    config = override(load_stage1_config("stage1-tiny"), {
        "data.train_shards": "synthetic:2", "data.resolution": "32x48", "train.max_steps": 1,
        "train.checkpoint_every": 0, "validation.every": 0, "inference.num_inference_steps": 2})
    checkpoint = train_stage1(config, output_dir=tmp_path / "run", resume="never").last_checkpoint
    capsys.readouterr()
    assert main(["standardize", "--checkpoint", str(checkpoint), "--input", str(photo), "--out",
                 str(tmp_path / "std.png")]) == 0
    assert "not set up" not in capsys.readouterr().err
    assert Image.open(tmp_path / "std.png").size == (32, 48)


@pytest.mark.ray
def test_shards_annotate_in_process_and_on_ray_write_the_same_bytes(estimator_python, tmp_path, capsys):
    from test_loader_synth import write_synthetic_shards

    from serialgen.cli import main
    from serialgen.dataset import annotations

    write_synthetic_shards(tmp_path / "set", n_shards=2, per_shard=2, size=(64, 96))
    assert main(["shards", "annotate", str(tmp_path / "set"), "--out", str(tmp_path / "a"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["shards_annotated_now"] == 2 and report["samples_annotated_now"] == 4
    assert report["quality"]["total"]["samples"] == 4 and report["backgrounds"] == "procedural"
    on_ray = annotations.annotate_shards(tmp_path / "set", tmp_path / "b", workers=2, progress=False)
    assert on_ray["shards_annotated_now"] == 2
    tars = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.tar"))
    assert tars and all((tmp_path / "a" / t).read_bytes() == (tmp_path / "b" / t).read_bytes() for t in tars)
    again = annotations.annotate_shards(tmp_path / "set", tmp_path / "a", progress=False)
    assert again["shards_annotated_now"] == 0 and again["shards_kept"] == 2  # resumable: nothing to redo
    assert annotations.AnnotationReader(tmp_path / "a").lookup(str(tmp_path / "set" / tars[0]), "c0000_p00000") is not None

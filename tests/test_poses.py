"""Pose library: limits, exactly N unique poses, determinism, every motion set contributes, file format."""

import numpy as np
import pytest

from serialgen.assets_manifest import motions as mo
from serialgen.assets_manifest import poses as pm
from serialgen.assets_manifest import skeleton as sk
from serialgen.errors import UserInputError

N = 600


@pytest.fixture(scope="module")
def lib():
    return pm.build_pose_library(N, seed=3)


def test_eighteen_motion_sets_each_contribute(lib):
    assert len(mo.MOTION_SETS) == 18 and len(set(mo.MOTION_NAMES)) == 18
    counts = lib.counts()
    assert list(counts) == mo.MOTION_NAMES
    # Round-robin acceptance shares the library: every set gets a real share, none dominates.
    assert min(counts.values()) >= N / 18 / 3 and max(counts.values()) <= N / 18 * 2


def test_exactly_n_unique_poses_inside_limits(lib):
    assert len(lib) == N and lib.angles.shape == (N, len(sk.JOINT_NAMES), 3)
    assert sk.within_limits(lib.angles).all()
    assert pm.pairwise_min_distance(lib.angles) >= pm.DEFAULT_MIN_DISTANCE - 1e-3
    assert np.isfinite(lib.root_translation).all() and ((lib.phase >= 0) & (lib.phase <= 1)).all()


def test_every_motion_set_stays_inside_limits_before_clamping_matters():
    rng = np.random.default_rng(0)
    for m in mo.MOTION_SETS:
        phase, u = rng.random(200), rng.random((200, m.n_params))
        angles, root = mo.sample_motion(m, phase, u, rng.random(200) < 0.5)
        assert sk.within_limits(angles).all(), m.name
        assert np.isfinite(angles).all() and root.shape == (200, 3)
        # A motion set really moves: its poses are not all the same.
        assert pm.pose_distance(angles[:100], angles[100:]).mean() > 5.0, m.name


def test_pose_distance_matches_the_documented_formula():
    a = np.zeros((1, len(sk.JOINT_NAMES), 3))
    b = a.copy()
    b[0, sk.JOINT_INDEX["l_lower_leg"], 0] = 60.0  # one body joint differs by 60 degrees
    expected = np.degrees(2 * np.arcsin(np.sin(np.radians(30)) / np.sqrt(len(pm.BODY_JOINTS))))
    assert pm.pose_distance(a, b)[0] == pytest.approx(expected, abs=1e-6)
    c = a.copy()
    c[0, [sk.JOINT_INDEX[n] for n in pm.BODY_JOINTS], 0] = 20.0  # every body joint by 20 (same axis)
    assert pm.pose_distance(a, c)[0] == pytest.approx(20.0, abs=1e-6)
    f = a.copy()
    f[0, sk.JOINT_INDEX["l_index1"], 0] = 80.0  # fingers do not count
    assert pm.pose_distance(a, f)[0] == pytest.approx(0.0, abs=1e-6)


def test_deterministic_file_bytes(tmp_path, lib):
    again = pm.build_pose_library(N, seed=3)
    p1 = pm.save_pose_library(lib, tmp_path / "a.npz")
    p2 = pm.save_pose_library(again, tmp_path / "b.npz")
    assert p1.read_bytes() == p2.read_bytes()
    other = pm.build_pose_library(N, seed=4)
    assert not np.array_equal(other.angles, lib.angles)


def test_round_trip_and_bad_files(tmp_path, lib):
    path = pm.save_pose_library(lib, tmp_path / "poses.npz")
    back = pm.load_pose_library(tmp_path)  # a folder resolves to folder/poses.npz
    np.testing.assert_array_equal(back.angles, lib.angles)
    np.testing.assert_array_equal(back.motion_index, lib.motion_index)
    assert back.motion_names == lib.motion_names and back.schema_version == pm.POSES_SCHEMA_VERSION
    assert back.angles.dtype == np.float32 and back.root_translation.dtype == np.float32
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(UserInputError, match="bad.npz"):
        pm.load_pose_library(tmp_path / "bad.npz")
    z = dict(np.load(path))
    z["schema_version"] = np.array(99)
    np.savez(tmp_path / "future.npz", **z)
    with pytest.raises(UserInputError, match="version 99"):
        pm.load_pose_library(tmp_path / "future.npz")


def test_ground_contact_and_batch_fk_agree_with_skeleton(lib):
    heads, tails, _ = pm.batch_forward_kinematics(lib.angles[:5].astype(np.float64), lib.root_translation[:5])
    for k in range(5):
        ref = sk.forward_kinematics(lib.angles[k].astype(np.float64), lib.root_translation[k])
        np.testing.assert_allclose(heads[k], ref.heads, atol=1e-5)
        np.testing.assert_allclose(tails[k], ref.tails, atol=1e-5)
    # Non-jumping poses keep the feet on the floor: the lowest point stays at its rest height.
    walk = lib.motion_names.index("walk")
    sel = np.flatnonzero(lib.motion_index == walk)[:20]
    h, t, _ = pm.batch_forward_kinematics(lib.angles[sel], lib.root_translation[sel])
    low = np.minimum(h[:, :, 2], t[:, :, 2]).min(axis=1)
    # Nothing goes under the floor (rest toe tip at 1 cm), and a foot bone end is near it (the
    # heel point, 4 cm under the ankle, may be the contact instead).
    assert low.min() >= 0.01 - 1e-6 and low.max() < 0.09


def test_motions_look_like_their_names(lib):
    """A few anatomical facts per motion, checked on the reference figure."""
    idx = sk.JOINT_INDEX

    def fk(name):
        sel = lib.motion_index == lib.motion_names.index(name)
        return pm.batch_forward_kinematics(lib.angles[sel], lib.root_translation[sel]), lib.phase[sel]

    (h, t, _), _ = fk("squat")
    assert (h[:, idx["pelvis"], 2]).min() < 0.6  # deep squats bring the hips down
    (h, t, _), _ = fk("wave")
    wrist = np.maximum(h[:, idx["l_hand"], 2], h[:, idx["r_hand"], 2])
    assert np.median(wrist) > 1.45  # a waving hand is above the shoulder
    (h, t, _), _ = fk("recline")
    assert np.median(t[:, idx["head"], 2]) < 0.9  # lying or reclining: the head is low
    (h, t, _), ph = fk("jump")
    assert lib.root_translation[lib.motion_index == lib.motion_names.index("jump"), 2].max() > 0.1  # flight


def test_extra_motions_are_merged_and_deduplicated():
    J = len(sk.JOINT_NAMES)
    clip = np.zeros((40, J, 3))
    clip[:, sk.JOINT_INDEX["l_upper_leg"], 0] = np.linspace(-30, 130, 40)
    clip[:5] = 0.0  # repeated frames: duplicates of each other
    lib = pm.build_pose_library(300, seed=1, extra_motions=[{"name": "legswing", "angles": clip}])
    assert lib.motion_names[-1] == "legswing"
    n_clip = lib.counts()["legswing"]
    assert 2 <= n_clip <= 36  # merged, repeated rest frames collapse
    assert pm.pairwise_min_distance(lib.angles) >= pm.DEFAULT_MIN_DISTANCE - 1e-3
    with pytest.raises(UserInputError, match="shape"):
        pm.build_pose_library(10, extra_motions=[("bad", np.zeros((3, 4, 3)))])


def test_impossible_request_is_a_clear_error():
    with pytest.raises(UserInputError, match="--poses"):
        pm.build_pose_library(0)
    with pytest.raises(UserInputError, match="minimum distance"):
        pm.build_pose_library(50, min_distance=80.0, max_rounds=2)


def test_preview_sheet(tmp_path, lib):
    from PIL import Image

    out = pm.render_pose_sheet(lib, tmp_path / "sheet.png", per_motion=3, cell=60)
    im = Image.open(out)
    assert im.size[1] == 18 * 60
    px = np.asarray(im.convert("L"))
    assert (px < 128).mean() > 0.005  # figures were drawn

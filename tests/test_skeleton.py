import numpy as np
import pytest

from serialgen.assets_manifest import skeleton as sk


def _zeros():
    return np.zeros((len(sk.JOINTS), 3))


def test_rest_pose_is_the_a_pose_and_keypoints_resolve():
    posed = sk.forward_kinematics(_zeros())
    np.testing.assert_allclose(posed.heads, [j.head for j in sk.JOINTS], atol=1e-9)
    kp, mask = sk.compute_keypoints(posed)
    assert len(sk.KEYPOINT_NAMES) == 18 + 6 + 42 and mask.all()
    name = sk.KEYPOINT_NAMES.index
    # Upper arms 45 degrees below horizontal, left arm on +X (the character faces -Y).
    sh, el = kp[name("l_shoulder")], kp[name("l_elbow")]
    d = (el - sh) / np.linalg.norm(el - sh)
    assert d[0] > 0 and np.degrees(np.arcsin(-d[2])) == pytest.approx(45, abs=1e-6)
    # Face points are in front of (-Y) and above the neck; eyes mirror each other.
    assert kp[name("nose"), 1] < -0.05 and kp[name("nose"), 2] > kp[name("neck"), 2]
    np.testing.assert_allclose(kp[name("l_eye")] * [-1, 1, 1], kp[name("r_eye")], atol=1e-9)


def test_anatomical_signs_mean_what_the_docs_say():
    idx = sk.JOINT_INDEX
    a = _zeros()
    a[idx["l_upper_arm"], 1] = 45  # abduct 45 from the A-pose: a T-pose arm
    a[idx["r_upper_arm"], 1] = 45
    a[idx["l_upper_leg"], 0] = 90  # hip flexion: thigh forward (-Y)
    posed = sk.forward_kinematics(a)
    for side, sign in (("l", 1), ("r", -1)):
        j = idx[f"{side}_upper_arm"]
        d = posed.tails[j] - posed.heads[j]
        np.testing.assert_allclose(d / np.linalg.norm(d), [sign, 0, 0], atol=1e-9)
    knee = posed.heads[idx["l_lower_leg"]]
    assert knee[1] < -0.4 and abs(knee[2] - 0.93) < 1e-6


def test_angle_decomposition_round_trips():
    rng = np.random.default_rng(0)
    for joint in ("l_upper_arm", "r_upper_leg", "neck", "r_foot", "pelvis"):
        angles = rng.uniform(-60, 60, 3)
        rot = sk.local_rotations(np.tile(angles, (len(sk.JOINTS), 1)))[sk.JOINT_INDEX[joint]]
        np.testing.assert_allclose(sk.angles_from_rotation(joint, rot), angles, atol=1e-6)


def test_limits_clamp_and_check():
    a = _zeros()
    assert sk.within_limits(a)
    a[sk.JOINT_INDEX["l_lower_leg"], 0] = -30  # knees do not bend forward
    assert not sk.within_limits(a)
    assert sk.within_limits(sk.clamp_to_limits(a))

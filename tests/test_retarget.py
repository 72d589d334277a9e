"""BVH reading and retargeting onto the canonical skeleton (Blender-free), on real captures."""

from __future__ import annotations

import tempfile

import numpy as np
import pytest

from serialgen.assets_manifest import motion_worker
from serialgen.assets_manifest import skeleton as sk
from serialgen.assets_manifest.bvh import BvhError, parse_bvh, read_bvh
from serialgen.assets_manifest.motions_scan import retarget_bvh, scan_motions
from serialgen.assets_manifest.probe import ProbeFailure
from serialgen.assets_manifest.retarget import decompose_joint

K = {n: i for i, n in enumerate(sk.KEYPOINT_NAMES)}


class _BvhOnly:
    """Reads BVH files in this process with the worker's own code (``motion_worker.run``): the
    scanner's decisions without a subprocess per file (tests/hostile/test_assets_inputs.py runs the
    real worker). BVH never needs Blender: a Blender-file call would be a bug."""

    def retarget_bvh(self, path, max_fps, max_bytes=None):
        with tempfile.TemporaryDirectory() as tmp:
            res = motion_worker.run(str(path), f"{tmp}/m.npz", max_fps, max_bytes)
            if not res["ok"]:
                return ProbeFailure(res["reason"], res["detail"])
            return motion_worker.load_motion(f"{tmp}/m.npz"), res["up"]

    def sample_motions(self, path, max_fps, max_bytes=None):
        raise AssertionError(f"the probe was asked for {path}")


BVH_ONLY = _BvhOnly()


def _keypoints(angles, trans=None):
    out = []
    for k in range(len(angles)):
        kp, _ = sk.compute_keypoints(sk.forward_kinematics(angles[k], (0, 0, 0) if trans is None else trans[k]))
        out.append(kp)
    return np.stack(out)


def _elevation(kp, side):
    d = kp[K[f"{side}_elbow"]] - kp[K[f"{side}_shoulder"]]
    return float(np.degrees(np.arcsin(d[2] / np.linalg.norm(d))))


def test_tpose_bvh_puts_upper_arms_horizontal(shared_assets):
    motion, up = retarget_bvh(shared_assets / "motions/makehuman/tpose.bvh")
    assert up == "z"  # MakeHuman writes Z-up files; the reader found it
    kp = _keypoints(motion.angles)[0]
    for side in ("l", "r"):
        assert abs(_elevation(kp, side)) < 10.0
    # and the rest of the body stands: pelvis upright, legs down
    assert np.abs(motion.angles[0, sk.JOINT_INDEX["pelvis"]]).max() < 5.0
    assert kp[K["l_ankle"], 2] < kp[K["l_knee"], 2] < kp[K["l_hip"], 2]


@pytest.mark.parametrize("rel", ["motions/makehuman/walk1.bvh", "motions/cmu/12_03.bvh"])
def test_walk_clips_alternate_feet_without_flips(shared_assets, rel):
    motion, _ = retarget_bvh(shared_assets / rel)
    assert np.isfinite(motion.angles).all() and sk.within_limits(motion.angles).all()
    kp = _keypoints(motion.angles)  # root-relative: no translation
    if rel.endswith("12_03.bvh"):
        kp = kp[1:]  # CMU conversions start with a T-pose calibration frame
    forward = kp[:, K["l_ankle"], 1] - kp[:, K["r_ankle"], 1]
    assert forward.min() < -0.15 and forward.max() > 0.15  # each foot leads in turn
    # No flips: between consecutive frames no body keypoint jumps further than a fast limb moves.
    dt = 1.0 / motion.fps
    body = [K[n] for n in sk.BODY18_NAMES if not n.endswith(("eye", "ear", "nose"))]
    step = np.linalg.norm(np.diff(kp[:, body], axis=0), axis=-1)
    assert step.max() / dt < 8.0, f"a keypoint moved {step.max():.2f} m in one frame"
    # Bone directions never reverse between frames (an Euler flip would).
    for a, b in (("l_shoulder", "l_elbow"), ("r_hip", "r_knee"), ("l_knee", "l_ankle")):
        d = kp[:, K[b]] - kp[:, K[a]]
        d /= np.linalg.norm(d, axis=-1, keepdims=True)
        cos = np.einsum("fi,fi->f", d[1:], d[:-1])
        assert cos.min() > 0.5


def test_arm_above_the_shoulder_does_not_flip():
    # Upper arm raised 120 degrees sideways from the A-pose: the second Euler solution is the one inside limits.
    j = "l_upper_arm"
    ang = np.array([10.0, 120.0, 5.0])
    axes = sk.JOINTS[sk.JOINT_INDEX[j]].axes
    rot = (sk.axis_angle_matrix(axes[:, 0], ang[0]) @ sk.axis_angle_matrix(axes[:, 1], ang[1])
           @ sk.axis_angle_matrix(axes[:, 2], ang[2]))
    assert np.allclose(decompose_joint(j, rot), ang, atol=1e-6)


def test_bvh_errors_name_the_file(tmp_path):
    with pytest.raises(BvhError, match="not a BVH"):
        parse_bvh("hello", "x.bvh")
    good = "HIERARCHY ROOT Hips { OFFSET 0 0 0 CHANNELS 3 Zrotation Xrotation Yrotation End Site { OFFSET 0 1 0 } }"
    with pytest.raises(BvhError, match="no MOTION"):
        parse_bvh(good, "y.bvh")
    m = parse_bvh(good + " MOTION Frames: 2 Frame Time: 0.1 0 0 90 0", "z.bvh")  # 1.3 frames: keep 1
    assert m.n_frames == 1 and np.allclose(m.offsets[0], 0) and np.allclose(m.end_offsets[0], [0, 0, 1])
    with pytest.raises(BvhError, match="cannot read"):
        read_bvh(tmp_path / "missing.bvh")


def test_scan_motions_is_incremental_and_rejects_with_reasons(shared_assets, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for rel in ("motions/makehuman/walk1.bvh", "motions/makehuman/tpose.bvh"):
        (src / rel.split("/")[-1]).write_bytes((shared_assets / rel).read_bytes())
    (src / "broken.bvh").write_text("HIERARCHY ROOT Hips {")
    (src / "snake.bvh").write_text(
        "HIERARCHY ROOT A { OFFSET 0 0 0 CHANNELS 6 Xposition Yposition Zposition Zrotation Xrotation Yrotation "
        "JOINT B { OFFSET 0 0 1 CHANNELS 3 Zrotation Xrotation Yrotation End Site { OFFSET 0 0 1 } } } "
        "MOTION Frames: 1 Frame Time: 0.04 0 0 0 0 0 0 0 0 0")
    recs, extra = scan_motions([src], tmp_path / "out", probe=BVH_ONLY)
    by = {r["path"].split("/")[-1]: r for r in recs}
    assert by["walk1.bvh"]["status"] == "accepted" and by["tpose.bvh"]["status"] == "accepted"
    assert by["broken.bvh"]["reason"] == "import_failed" and "broken.bvh" in by["broken.bvh"]["detail"]
    assert by["snake.bvh"]["reason"] == "not_humanoid"
    assert sorted(e["name"] for e in extra) == ["tpose", "walk1"]
    assert all(e["angles"].shape[1:] == (len(sk.JOINTS), 3) for e in extra)
    # Re-scan: nothing re-imported (the records are the very same), same clips from the cache.
    recs2, extra2 = scan_motions([src], tmp_path / "out", recs, probe=BVH_ONLY)
    assert [r["id"] for r in recs2] == [r["id"] for r in recs]
    assert all(r2 is r1 for r1, r2 in zip(recs, recs2))
    assert [e["name"] for e in extra2] == [e["name"] for e in extra]
    assert np.array_equal(extra2[0]["angles"], extra[0]["angles"])

"""Pose maps follow the OpenPose / DWPose drawing: colours at keypoints and limbs, scaling, visibility."""

import json

import numpy as np
import pytest

from serialgen.assets_manifest.skeleton import KEYPOINT_NAMES
from serialgen.dataset import posemap as pm

N = {n: i for i, n in enumerate(KEYPOINT_NAMES)}


def _pose(size=(512, 768)):
    """The canonical figure in the rest A-pose, front view, fitted into 80 % of the canvas.

    (Not the canonical standard pose, ``geometry.standard_form.reference_standard_keypoints``: the
    standard camera's framing may cut the hands; these tests need every point on the canvas.)
    """
    from serialgen.assets_manifest import skeleton as sk

    kp3, defined = sk.compute_keypoints(sk.forward_kinematics(np.zeros((len(sk.JOINTS), 3))))
    xy = np.stack([kp3[:, 0], -kp3[:, 2]], axis=1)
    lo, hi = xy[defined].min(axis=0), xy[defined].max(axis=0)
    w, h = size
    s = 0.8 * min(w / (hi[0] - lo[0]), h / (hi[1] - lo[1]))
    xy = (xy - (lo + hi) / 2) * s + [w / 2, h / 2]
    return pm.Pose(np.where(defined[:, None], xy, 0).astype(np.float32), defined.copy(), tuple(size),
                   np.zeros((0, 2), np.float32))


def _body_only(pose):
    vis = pose.visible.copy()
    vis[18:] = False
    return pm.Pose(pose.xy, vis, pose.size, pose.face)


def _px(img, xy):
    return tuple(int(v) for v in img[int(xy[1]), int(xy[0])])


def test_joint_and_limb_colours_are_openpose():
    pose = _body_only(_pose())
    img = pm.draw_pose_map(pose)
    assert img.shape == (768, 512, 3) and img.dtype == np.uint8
    for i in range(18):
        assert _px(img, pose.xy[i]) == pm.BODY_COLOURS[i], KEYPOINT_NAMES[i]
    # Limbs: 60 % of the limb's colour at the middle of the limb (DWPose's canvas * 0.6).
    for j, (a, b) in enumerate(pm.BODY_LIMBS[:12]):  # trunk and limbs (the face links are too short)
        mid = (pose.xy[a] + pose.xy[b]) / 2
        expected = tuple(int(c * pm.LIMB_DIM) for c in pm.BODY_COLOURS[j])
        assert _px(img, mid) == expected, (KEYPOINT_NAMES[a], KEYPOINT_NAMES[b])
    assert _px(img, (5, 5)) == (0, 0, 0)


def test_feet_and_hands_colours():
    pose = _pose()
    img = pm.draw_pose_map(pose)
    for name in ("l_big_toe", "l_small_toe", "l_heel"):
        assert _px(img, pose.xy[N[name]]) == (0, 0, 255)
    for name in ("r_big_toe", "r_small_toe", "r_heel"):
        assert _px(img, pose.xy[N[name]]) == (0, 255, 255)
    for side in "lr":  # hand points are drawn last, all blue
        for f in ("thumb_4", "index_4", "pinky_4"):
            assert _px(img, pose.xy[N[f"{side}_{f}"]]) == pm.HAND_POINT_COLOUR
    # The thumb's first edge uses hue 0 (red); a point between its joints shows it (the joints
    # placed 30 px apart, so the two discs do not cover the line).
    xy = pose.xy.copy()
    xy[N["l_thumb_1"]] = xy[N["l_hand_root"]] + [0, 30]
    a, b = xy[N["l_hand_root"]], xy[N["l_thumb_1"]]
    edge = pm.draw_pose_map(pm.Pose(xy, np.isin(np.arange(66), [N["l_hand_root"], N["l_thumb_1"]]), pose.size,
                                    pose.face))
    colours = {tuple(c) for c in edge.reshape(-1, 3)} - {(0, 0, 0), pm.HAND_POINT_COLOUR}
    assert pm.HAND_EDGE_COLOURS[0] in colours and np.linalg.norm(a - b) > 8


def test_widths_scale_with_resolution_and_invisible_points_are_not_drawn():
    small = _body_only(_pose((512, 768)))
    big = _body_only(_pose((1024, 1536)))
    n_small = (pm.draw_pose_map(small).sum(axis=2) > 0).sum()
    n_big = (pm.draw_pose_map(big).sum(axis=2) > 0).sum()
    assert 3.4 < n_big / n_small < 4.6  # widths and lengths both double: area x4
    vis = small.visible.copy()
    vis[N["l_elbow"]] = False
    img = pm.draw_pose_map(pm.Pose(small.xy, vis, small.size, small.face))
    colours = {tuple(c) for c in img.reshape(-1, 3)}
    limb = pm.BODY_LIMBS.index((5, 6))  # l_shoulder - l_elbow
    assert tuple(int(c * pm.LIMB_DIM) for c in pm.BODY_COLOURS[limb]) not in colours
    assert pm.BODY_COLOURS[N["l_elbow"]] not in colours


def test_region_drawing_equals_full_canvas_drawing():
    pose = _pose()
    region = pm.draw_pose_region(pose)
    full = region.full()
    assert region.region.shape[0] < 768 and region.region.shape[1] < 512  # only the drawn box
    ref = np.asarray(pm.draw_pose_image(pose))
    np.testing.assert_array_equal(full, ref)
    assert full.any()


def test_parse_pose_matches_names_keeps_face_and_rejects_bad_files():
    names = list(reversed(KEYPOINT_NAMES)) + ["face_0", "face_1"]
    kps = [[float(i), float(2 * i), 1] for i in range(len(names))]
    pose = pm.parse_pose(json.dumps({"width": 64, "height": 96, "names": names, "keypoints": kps}))
    assert pose.size == (64, 96) and pose.visible.all() and pose.face.shape == (2, 2)
    i_nose = names.index("nose")
    np.testing.assert_allclose(pose.xy[N["nose"]], [i_nose, 2 * i_nose])
    img = pm.draw_pose_map(pm.Pose(np.zeros((66, 2), np.float32), np.zeros(66, bool), (64, 96),
                                   np.array([[30.5, 40.5]], np.float32)))
    assert tuple(img[40, 30]) == pm.FACE_POINT_COLOUR
    for bad in ('{"width": 4}', '{"width": 4, "height": 4, "names": ["nose"], "keypoints": []}', "not json"):
        with pytest.raises(ValueError):
            pm.parse_pose(bad)

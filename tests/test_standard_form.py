"""The standard form fixes the face (issue 13): the face box from eyes and mouth, the standard camera
that places it, face landmarks from what the rig and mesh say (eye bones, eye/mouth materials and
shape keys, the skull under hair and hats), measured against ground truth, and hair and hats that
change neither the face box nor the body's scale.

Pure-numpy tests run in the fast tier; the Blender ones build procedural characters (and read the
public characters of ../shared/assets, skipping where absent) and are marked blender + slow.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from serialgen.assets_manifest import skeleton as sk
from serialgen.assets_manifest.geometry import face as fc
from serialgen.assets_manifest.geometry import standard_form as sf
from serialgen.assets_manifest.geometry.camera import CameraSpec, look_rotation

W, H = 512, 768  # errors are reported at the paper's resolution

# Hand-labelled eye, nose and mouth pixels of the public characters with faces, in a front close-up
# (512x768, 85 mm, looking +Y from ``camera``; A-pose as loaded from ../shared/assets). The
# featureless heads (CesiumMan's logo disc, RiggedFigure's cube, the cryptovoxels and KayKit
# mannequins) have nothing to label. RobotExpressive's eyes are its two black lenses.
LABELS = {
    "kaykit/Knight.glb": {"camera": (-0.00014, -9.29332, 1.82076),
                          "r_eye": (217, 427.5), "l_eye": (296, 427.5), "nose": (256, 448), "mouth": (248, 465)},
    "kaykit/Mage.glb": {"camera": (0.00035, -11.99425, 1.87018),
                        "r_eye": (225, 425), "l_eye": (286.25, 425), "nose": (255.75, 437.5), "mouth": (256, 454)},
    "quaternius/Female_Dress.fbx": {"camera": (-0.00078, -2.02659, 1.63376),
                                    "r_eye": (214.5, 364.5), "l_eye": (297.5, 364.5), "nose": (256, 404),
                                    "mouth": (256, 437)},
    "quaternius/Male_Casual.fbx": {"camera": (-0.00076, -1.70004, 1.66124),
                                   "r_eye": (210, 391.25), "l_eye": (302, 391.25), "nose": (255, 435),
                                   "mouth": (256, 466)},
    "quaternius/RobotExpressive.glb": {"camera": (-0.00162, -8.69359, 1.60944),
                                       "r_eye": (175, 390), "l_eye": (337.3, 390.3)},
}


# -- pure geometry (fast) ---------------------------------------------------------------------------


def test_face_box_is_the_ffhq_square():
    """Centre = eye midpoint + 0.1 (mouth - eye midpoint); side = 2 max(2 eye distance, 1.8 eye-to-mouth)."""
    box = fc.face_box({"l_eye": np.array([130.0, 100.0]), "r_eye": np.array([90.0, 100.0]),
                       "mouth": np.array([110.0, 150.0])})
    assert box["center"] == pytest.approx([110.0, 105.0])
    assert box["side"] == pytest.approx(2 * max(2 * 40.0, 1.8 * 50.0))  # the mouth decides: 180
    wide = fc.face_box({"l_eye": np.array([160.0, 100.0]), "r_eye": np.array([60.0, 100.0]),
                        "mouth": np.array([110.0, 130.0])})
    assert wide["side"] == pytest.approx(400.0)  # a chibi's wide-set eyes decide


@pytest.mark.parametrize("scale", [1.0, 0.62, 1.2])
def test_standard_camera_puts_the_face_box_in_place(scale):
    """For the reference figure, a child-sized one and a tall one: the projected face box has its
    centre and side exactly at the standard values; the reference figure's head and feet fit."""
    skel = sk.forward_kinematics(np.zeros((len(sk.JOINTS), 3)))
    skel = sk.PosedSkeleton(skel.names, skel.heads * scale, skel.tails * scale, skel.world_rot)
    cam = sf.standard_camera(skel, W, H)
    box = sf.standard_face_box(cam, sf.face_points(skel))
    assert box["center"] == pytest.approx([sf.STANDARD_FACE_CENTER[0] * W, sf.STANDARD_FACE_CENTER[1] * H], abs=0.01)
    assert box["side"] == pytest.approx(sf.STANDARD_FACE_SIDE * H, abs=0.01)
    kp, _ = sk.compute_keypoints(skel)
    uv, _ = cam.project(kp)
    toes = uv[sk.KEYPOINT_NAMES.index("l_big_toe"), 1]
    assert 0.8 * H < toes < 0.9 * H  # the same body at every scale: the face fixes it
    crown, _ = cam.project(skel.tails[skel.joint("head")][None])
    assert 0.05 * H < crown[0, 1] < 0.12 * H


def test_standard_camera_ignores_the_head_box():
    """The camera takes the face landmarks only: a head measured with a tall hat cannot move it,
    and landmarks of a bigger face (wide-set eyes) make the body smaller."""
    skel = sk.forward_kinematics(np.zeros((len(sk.JOINTS), 3)))
    base = sf.standard_camera(skel, W, H)
    wide = dict(sk.FACE_LANDMARK_DEFAULTS, l_eye=(0.36, -0.47, 0.5), r_eye=(-0.36, -0.47, 0.5))
    chibi = sf.standard_camera(skel, W, H, wide)
    assert chibi.location[1] < base.location[1] - 0.5  # twice the eye distance: farther away
    ankle = skel.heads[skel.joint("l_foot")][None]
    assert chibi.project(ankle)[0][0, 1] < base.project(ankle)[0][0, 1] - 100


def test_standard_fit_reports_cut_figures():
    cam = CameraSpec(np.array([0.0, -5.0, 1.0]), look_rotation(np.array([0.0, 1.0, 0.0])), 50.0, W, H)
    body = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    fit = sf.standard_fit(cam, body[1:], body)
    assert fit["head_inside"] and fit["body_inside"] and 0.5 < fit["fill"] < 1.0
    tall = np.array([[0.0, 0.0, -3.0], [0.0, 0.0, 5.0]])
    fit = sf.standard_fit(cam, tall[1:], tall)
    assert not fit["head_inside"] and not fit["body_inside"] and fit["fill"] == pytest.approx(1.0)


@pytest.mark.parametrize("name, tag", [
    ("Eyes", "eye"), ("proc-000001_iris", "eye"), ("F00_000_00_EyeIris_00_EYE", "eye"), ("EyeWhite", "eye"),
    ("eye.L", "eye"), ("F00_000_00_FaceBrow_00_FACE", "none"), ("Eyelashes", "none"), ("eyebrow_mat", "none"),
    ("Knight_Helmet", "cover"), ("Knight_HelmetVisor", "cover"), ("Mage_Hat", "cover"), ("Hair", "cover"),
    ("F00_000_00_HairBack_00_HAIR", "cover"), ("proc-000001_hair", "cover"), ("Teeth", "mouth"),
    ("F00_000_00_FaceMouth_00_FACE", "mouth"), ("proc-000001_lips", "lips"), ("Knight_Head", "none"),
    ("Skin", "none"), ("Body.baked", "none"),
])
def test_name_tags(name, tag):
    assert fc.name_tag(name) == tag


@pytest.mark.parametrize("name, tag", [
    ("eyeBlinkLeft", "eye"), ("Fcl_EYE_Close", "eye"), ("expr_blink", "eye"), ("Blink_R", "eye"),
    ("jawOpen", "mouth"), ("mouthSmileLeft", "mouth"), ("expr_open_mouth", "mouth"), ("vrc.v_aa", "mouth"),
    ("A", "mouth"), ("browDownLeft", "none"), ("eyeSquintLeft", "none"), ("cheekPuff", "none"),
    ("Angry", "none"), ("Basis", "none"),
])
def test_shape_key_tags(name, tag):
    assert fc.shape_key_tag(name) == tag


def _sphere(centre, radius, n_u=24, n_v=48):
    u, v = np.meshgrid(np.linspace(0, np.pi, n_u + 1), np.linspace(0, 2 * np.pi, n_v, endpoint=False), indexing="ij")
    pts = np.stack([np.sin(u) * np.sin(v), -np.sin(u) * np.cos(v), np.cos(u)], -1).reshape(-1, 3)
    pts = pts * np.asarray(radius) + np.asarray(centre)
    tris = [(i * n_v + j, (i + 1) * n_v + j, (i + 1) * n_v + (j + 1) % n_v) for i in range(n_u) for j in range(n_v)]
    tris += [(i * n_v + j, (i + 1) * n_v + (j + 1) % n_v, i * n_v + (j + 1) % n_v) for i in range(n_u) for j in range(n_v)]
    return pts, np.array(tris)


def _hatted_head():
    """A 0.2 m skull (centre 0.1 m above the head joint) under a hat whose front (an animal snout)
    sticks out 0.12 m in front of the face at eye height: (points, triangles, tags)."""
    skull, skull_t = _sphere([0.0, 0.0, 0.1], [0.075, 0.09, 0.1])
    hat, hat_t = _sphere([0.0, -0.06, 0.2], [0.11, 0.15, 0.1])
    pts = np.concatenate([skull, hat])
    tris = np.concatenate([skull_t, hat_t + len(skull)])
    tags = np.concatenate([np.zeros(len(skull), np.int8), np.full(len(hat), fc.TAGS["cover"], np.int8)])
    return pts, tris, tags


def test_landmarks_skip_the_hat():
    """With the hat's vertices tagged as cover (its mesh or material is named hat/helmet/hair), the
    nose and eyes land on the skull's front (y ~ -0.09), not on the snout (y ~ -0.21); without the
    tags (what names cannot tell) they land on the hat."""
    from serialgen.assets_manifest.geometry.head import measure_head

    pts, tris, tags = _hatted_head()
    length = 0.12
    geo = measure_head(pts, np.ones(len(pts), bool), np.ones(len(pts)), length, tris, tags=tags)
    marks = {k: np.array(v) * length for k, v in geo.landmarks.items()}
    assert geo.landmark_sources["nose"] == "skull_surface"
    for k in ("nose", "l_eye", "r_eye"):
        assert -0.1 < marks[k][1] < -0.05, (k, marks[k])
        assert marks[k][2] < 0.2, (k, marks[k])
    assert marks["l_eye"][0] > 0.01 > -0.01 > marks["r_eye"][0]
    assert marks["mouth"][2] < marks["nose"][2] < marks["l_eye"][2]
    # The hat counts for the head box (close-ups, "does it fit"): it is the top of the head.
    assert geo.center[2] + 0.5 * geo.size[2] == pytest.approx(0.3, abs=0.01)
    untagged = measure_head(pts, np.ones(len(pts), bool), np.ones(len(pts)), length, tris)
    assert untagged.landmarks["nose"][1] * length < -0.15  # on the snout: what tags prevent


def test_landmarks_from_eye_material_and_shape_keys():
    """Eye-material vertices (two small discs on the face) fix the eyes; without them, the vertices
    a blink key moves do; mouth-material vertices fix the mouth. Each landmark records its source."""
    from serialgen.assets_manifest.geometry.head import measure_head

    skull, tris = _sphere([0.0, 0.0, 0.1], [0.075, 0.09, 0.1])
    discs = []
    for x in (0.035, -0.035):
        a = np.linspace(0, 2 * np.pi, 8, endpoint=False)
        discs.append(np.stack([x + 0.012 * np.cos(a), np.full(8, -0.085), 0.12 + 0.012 * np.sin(a)], 1))
    mouth = np.stack([np.linspace(-0.02, 0.02, 6), np.full(6, -0.082), np.full(6, 0.05)], 1)
    pts = np.concatenate([skull, *discs, mouth])
    tags = np.concatenate([np.zeros(len(skull), np.int8), np.full(16, fc.TAGS["eye"], np.int8),
                           np.full(6, fc.TAGS["mouth"], np.int8)])
    one = np.ones(len(pts), bool)
    geo = measure_head(pts, one, np.ones(len(pts)), 0.12, tris, tags=tags)
    marks = {k: np.array(v) * 0.12 for k, v in geo.landmarks.items()}
    assert geo.landmark_sources["l_eye"] == "eye_material" and geo.landmark_sources["mouth"] == "mouth_material"
    assert marks["l_eye"] == pytest.approx([0.035, -0.085, 0.12], abs=2e-3)
    assert marks["r_eye"] == pytest.approx([-0.035, -0.085, 0.12], abs=2e-3)
    assert marks["mouth"] == pytest.approx([0.0, -0.082, 0.05], abs=2e-3)
    key_tags = np.where(tags == fc.TAGS["eye"], 1, 0).astype(np.int8)
    by_keys = measure_head(pts, one, np.ones(len(pts)), 0.12, tris, tags=np.zeros(len(pts), np.int8),
                           key_tags=key_tags, key_weights=key_tags.astype(float))
    assert by_keys.landmark_sources["l_eye"] == "eye_shape_keys"
    assert np.array(by_keys.landmarks["l_eye"])[[0, 2]] * 0.12 == pytest.approx([0.035, 0.12], abs=2e-3)
    assert by_keys.landmark_sources["mouth"] == "estimate"
    b = {k: np.array(v) * 0.12 for k, v in by_keys.landmarks.items()}
    eye_z = 0.5 * (b["l_eye"][2] + b["r_eye"][2])
    assert b["mouth"][2] == pytest.approx(eye_z - fc.MOUTH_DROP * (eye_z - b["nose"][2]), abs=1e-4)
    assert set(geo.landmark_sources.values()) | set(by_keys.landmark_sources.values()) <= set(fc.SOURCES)


# -- Blender: hair and hats, ground truth ------------------------------------------------------------


def _hat_part(mesh):
    """A tall cone hat with a brim on the head bone (skinned 100% to it): a MeshPart."""
    from serialgen.assets_manifest.procedural import REGION_NAMES, MeshPart

    b = mesh.bone_names.index(mesh.bone_map["head"])
    crown = mesh.bone_tails[b].astype(np.float64)
    n = 24
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    ring = lambda r, z: np.stack([crown[0] + r * np.cos(a), crown[1] + r * np.sin(a), np.full(n, z)], 1)  # noqa: E731
    base = crown[2] - 0.04
    verts = np.concatenate([ring(0.2, base), ring(0.11, base + 0.005), [[crown[0], crown[1], base + 0.45]],
                            [[crown[0], crown[1], base]]])
    apex, centre = 2 * n, 2 * n + 1
    faces = []
    for i in range(n):
        j = (i + 1) % n
        faces += [(centre, j, i), (i, j, n + j), (i, n + j, n + i), (n + i, n + j, apex)]
    nv = len(verts)
    idx = np.zeros((nv, 4), np.int16)
    idx[:, 0] = b
    val = np.zeros((nv, 4), np.float32)
    val[:, 0] = 1.0
    return MeshPart("hat", verts.astype(np.float32), np.array(faces, np.int32), np.zeros((nv, 2), np.float32),
                    REGION_NAMES.index("hair"), idx, val)


@pytest.fixture(scope="module")
def hair_and_hats(tmp_path_factory):
    """One procedural body three times: short hair, a long hair shell, short hair under a tall hat;
    meshes saved WITHOUT the builder's measured landmarks, so the rig locates the face itself."""
    from serialgen.assets_manifest.procedural import build_mesh_data, describe_character, save_mesh_data

    root = tmp_path_factory.mktemp("hats")
    desc = describe_character("proc-000001", 0)
    records = {}
    for variant, style in (("short", "short"), ("long", "long"), ("hat", "short")):
        d = json.loads(json.dumps(desc))
        d["hair"]["style"] = style
        d["id"] = f"proc-hair-{variant}"
        mesh = build_mesh_data(d)
        mesh.face_landmarks = {}
        if variant == "hat":
            mesh.parts.append(_hat_part(mesh))
        save_mesh_data(mesh, root / "meshes" / f"{d['id']}.npz")
        records[variant] = {"id": d["id"], "kind": "procedural", "status": "accepted",
                            "mesh_file": f"meshes/{d['id']}.npz"}
    return root, records


@pytest.mark.blender
@pytest.mark.slow
def test_hair_and_hats_change_neither_the_face_box_nor_the_body(hair_and_hats):
    """Standard images of the same body with short hair, a long hair shell and a tall hat: the face
    box is the same and the silhouettes below the chin match (IoU >= 0.95). (With the head box
    fixed, as in rendering/2, the hat alone shrank the body to ~60%.)"""
    from serialgen.render.job import BlenderWorker
    from serialgen.render.scene import RenderSettings

    assets, records = hair_and_hats
    w, h = 192, 288
    worker = BlenderWorker(RenderSettings(width=w, height=h, threads=2))
    masks, boxes = {}, {}
    try:
        for variant, record in records.items():
            loaded = worker._load_character(record, str(assets))
            worker._render_standard(loaded)
            assert loaded.rig.face_landmark_sources["l_eye"] == "eye_bones"
            boxes[variant] = loaded.std_meta["face_box"]
            masks[variant] = worker._render(worker.scene)[..., 3] > 0
            if variant == "hat":
                assert loaded.std_meta["head_box"]["height"] > 1.8 * boxes[variant]["side"]
            worker.unload()
    finally:
        worker.unload()
    chin = int(np.ceil(boxes["short"]["center"][1] + 0.5 * boxes["short"]["side"]))
    for variant in ("long", "hat"):
        assert boxes[variant]["center"] == pytest.approx(boxes["short"]["center"], abs=0.05)
        assert boxes[variant]["side"] == pytest.approx(boxes["short"]["side"], abs=0.05)
        a, b = masks["short"][chin:], masks[variant][chin:]
        iou = (a & b).sum() / (a | b).sum()
        assert iou >= 0.95, (variant, iou)


def _world_landmarks(rig, names=("l_eye", "r_eye", "nose", "mouth")) -> dict[str, np.ndarray]:
    skel = rig.posed_skeleton()
    i = skel.joint("head")
    length = float(np.linalg.norm(skel.tails[i] - skel.heads[i]))
    return {k: skel.heads[i] + skel.world_rot[i] @ (np.asarray(rig.face_landmarks[k]) * length)
            for k in names if k in (rig.face_landmarks or {})}


def _errors_px(rig, truth: dict[str, np.ndarray]) -> dict[str, float]:
    """Pixel distance, in the character's 512x768 standard image, between located and true landmarks."""
    cam = sf.standard_camera(rig.posed_skeleton(), W, H, rig.face_landmarks)
    found = _world_landmarks(rig)
    return {k: float(np.linalg.norm(cam.project(found[k][None])[0][0] - cam.project(truth[k][None])[0][0]))
            for k in truth}


@pytest.mark.blender
@pytest.mark.slow
def test_procedural_landmarks_against_the_mesh(hair_and_hats):
    """Located landmarks (the builder's own measurement removed) against the mesh: eyes = the pupil
    vertices' centre (front), mouth = the lip vertices' centre, nose = the front-most
    midline vertex between them; error in pixels of the 512x768 standard image."""
    from serialgen.assets_manifest.procedural import REGION_NAMES, load_mesh_data
    from serialgen.assets_manifest.geometry.standard_form import standard_angles
    from serialgen.render.job import BlenderWorker
    from serialgen.render.scene import RenderSettings

    assets, records = hair_and_hats
    worker = BlenderWorker(RenderSettings(width=64, height=96, threads=1))
    report = {}
    try:
        for variant, record in records.items():
            mesh = load_mesh_data(assets / record["mesh_file"])
            v = mesh.vertices.astype(np.float64)

            def region(*names):
                codes = [REGION_NAMES.index(n) for n in names]
                return v[np.unique(mesh.faces[np.isin(mesh.face_region, codes)])]

            pupils = region("pupil")
            truth = {}
            for side, sel in (("l_eye", pupils[:, 0] > 0), ("r_eye", pupils[:, 0] < 0)):
                p = pupils[sel]
                truth[side] = np.array([p[:, 0].mean(), p[:, 1].min(), p[:, 2].mean()])
            lips = region("lips")
            truth["mouth"] = np.array([lips[:, 0].mean(), lips[:, 1].min(), lips[:, 2].mean()])
            eye_z = 0.5 * (truth["l_eye"][2] + truth["r_eye"][2])
            band = v[(np.abs(v[:, 0]) < 0.005) & (v[:, 2] < eye_z) & (v[:, 2] > truth["mouth"][2])]
            truth["nose"] = band[np.argmin(band[:, 1])]
            rig = worker._load_character(record, str(assets)).rig
            rig.apply_pose(standard_angles())
            report[variant] = _errors_px(rig, truth)
            worker.unload()
    finally:
        worker.unload()
    print("procedural landmark error, px at 512x768:", json.dumps(report))
    for variant, errs in report.items():
        assert errs["l_eye"] < 2.0 and errs["r_eye"] < 2.0, (variant, errs)
        assert errs["nose"] < 3.0 and errs["mouth"] < 3.0, (variant, errs)


@pytest.fixture(scope="module")
def public_characters(shared_assets, tmp_path_factory):
    from serialgen.assets_manifest.characters_scan import scan_characters
    from serialgen.render.asset_build import BlenderProbe

    files = [shared_assets / "characters" / rel for rel in LABELS]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        pytest.skip(f"public test characters not found: {missing}")
    by_name = {Path(r["path"]).name: r for r in scan_characters(files, probe=BlenderProbe())}
    return {rel: by_name[Path(rel).name] for rel in LABELS}


def _label_points(worker, cam: CameraSpec, labels: dict) -> dict[str, np.ndarray]:
    """Lift labelled pixels to 3D: the first surface the pixel's ray meets (Blender ray cast)."""
    from serialgen.render.bpy_utils import import_bpy, import_mathutils

    bpy, Vector = import_bpy(), import_mathutils().Vector
    dg = bpy.context.evaluated_depsgraph_get()
    k_inv = np.linalg.inv(cam.intrinsics())
    r = cam.world_to_camera()[:3, :3].T  # camera -> world rotation
    out = {}
    for name, (u, v) in labels.items():
        d = r @ (k_inv @ np.array([u, v, 1.0]))
        d /= np.linalg.norm(d)
        hit, loc, *_ = worker.scene.ray_cast(dg, Vector(cam.location.tolist()), Vector(d.tolist()))
        assert hit, name
        out[name] = np.array(loc)
    return out


@pytest.mark.blender
@pytest.mark.slow
def test_public_landmarks_against_labels(public_characters):
    """Located eyes, nose and mouth of the public characters against the hand-labelled table (lifted
    onto the mesh), in pixels of each character's 512x768 standard image. rendering/2 put Knight's
    eyes on its helmet brow (89 px off in the close-up, ~30 px in the standard image)."""
    from serialgen.assets_manifest.geometry.standard_form import standard_angles
    from serialgen.render.job import BlenderWorker
    from serialgen.render.scene import RenderSettings

    worker = BlenderWorker(RenderSettings(width=64, height=96, threads=1))
    report = {}
    try:
        for rel, record in public_characters.items():
            rig = worker._load_character(record, "").rig
            rig.set_expression(None)
            rig.apply_pose(standard_angles())
            labels = {k: v for k, v in LABELS[rel].items() if k != "camera"}
            cam = CameraSpec(np.array(LABELS[rel]["camera"]), look_rotation(np.array([0.0, 1.0, 0.0])), 85.0, W, H)
            truth = _label_points(worker, cam, labels)
            report[Path(rel).stem] = {k: round(v, 2) for k, v in _errors_px(rig, truth).items()}
            report[Path(rel).stem]["sources"] = dict(rig.face_landmark_sources)
            worker.unload()
    finally:
        worker.unload()
    print("public landmark error, px at 512x768:", json.dumps(report))
    limits = {"Knight": 8.0, "Mage": 8.0, "Female_Dress": 3.0, "Male_Casual": 3.0}
    for name, limit in limits.items():
        errs = report[name]
        assert max(errs["l_eye"], errs["r_eye"]) < limit, (name, errs)
        assert errs["nose"] < 4.0 and errs["mouth"] < 6.0, (name, errs)

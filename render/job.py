"""One render job inside a Blender worker process: one character, a range of its samples, one shard.

A job is ``(character, [start, stop))``: the character's samples ``start..stop-1`` (see
:func:`character_samples`) go into one shard with a deterministic name, so a retried job rewrites the
same file. The worker (:class:`BlenderWorker`, one per process: bpy is not thread-safe) keeps its
scene between jobs and the last character loaded, so consecutive jobs of one character load it once.

Per job, as in the method section of a paper:

1. load the character (or reuse it); build its face -> body-part table for occlusion;
2. render the standard image once: A-pose, neutral expression, standard camera and light, on white;
3. per sample: seed -> pose from the library, view and framing, expression, lighting -> render RGBA
   -> keypoints -> encode -> append to the shard;
4. close the shard (temporary name -> final name) and return a small summary.

After a character: remove it and purge orphan data; the driver recycles the worker past an RSS cap
or after ``max_characters`` characters (:meth:`BlenderWorker.should_recycle`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from serialgen.assets_manifest import skeleton as sk
from serialgen.assets_manifest.geometry import camera as cam_mod
from serialgen.assets_manifest.geometry import standard_form as std_mod
from serialgen.assets_manifest.geometry.head import head_geometry_of
from serialgen.dataset import shards
from serialgen.dataset.render_stats import Histograms, sample_row
from serialgen.imaging import flatten_on_white
from serialgen.render import lighting as light_mod
from serialgen.render import scene as scene_mod
from serialgen.render.bpy_utils import import_bpy, purge_orphans
from serialgen.render.camera import apply_camera
from serialgen.render.characters import load_character
from serialgen.render.keypoints import PartLookup, keypoints_2d, pose_record
from serialgen.render.rig import Rig
from serialgen.render.scene import RenderSettings

__all__ = [
    "RENDERING_VERSION",
    "SAMPLE_STAGES",
    "RenderJob",
    "derive_seed",
    "character_samples",
    "BlenderWorker",
]

#: Version of the rendering conventions (``docs/rendering.md``): the standard form, view sampling,
#: lighting, keypoint visibility. A change to any documented number changes the data: bump it (the
#: farm records it in run.json and refuses to mix versions in one folder).
#: 3: the standard camera fixes the face box (eyes, mouth) instead of the head box; face landmarks
#: from eye bones, eye/mouth materials and shape keys, the skull under hair and hats; an exposure
#: floor on the character; 1x render with numpy anti-aliasing read without a file.
RENDERING_VERSION = 3

SAMPLE_STAGES = ("pose", "render", "keypoints", "encode", "write")
_UPPER_BODY = ("nose", "neck", "r_shoulder", "r_elbow", "l_shoulder", "l_elbow", "r_hip", "l_hip",
               "r_eye", "l_eye", "r_ear", "l_ear")
_KP = {n: i for i, n in enumerate(sk.KEYPOINT_NAMES)}


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts (stable across machines and Python runs, unlike ``hash``)."""
    text = "/".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def character_samples(character: str, n_poses: int, per_character: int, run_seed: int) -> list[tuple[int, int]]:
    """The (pose id, view index) of each of a character's ``per_character`` samples.

    Poses are a seeded permutation of the library, so each character gets different poses; past
    ``n_poses`` samples the permutation repeats with the next view index.
    """
    perm = np.random.default_rng(derive_seed(run_seed, character, "poses")).permutation(n_poses)
    return [(int(perm[k % n_poses]), k // n_poses) for k in range(per_character)]


@dataclass(frozen=True)
class RenderJob:
    """One unit of work (picklable, small). ``shard`` is relative to ``out_dir``."""

    character: dict
    assets_dir: str
    out_dir: str
    shard: str
    split: str
    start: int
    stop: int
    per_character: int
    run_seed: int
    poses_path: str

    @property
    def name(self) -> str:
        return self.shard


@dataclass
class _Loaded:
    char_id: str
    rig: Rig
    parts: PartLookup
    std_png: bytes = b""
    std_pose: dict = field(default_factory=dict)  # the std_pose.json record
    std_pose_json: bytes = b""  # ... and its bytes
    std_meta: dict = field(default_factory=dict)


@dataclass
class _Rendered:
    """One sample after its render: pixels, records and row, before its members are encoded."""

    key: str
    rgba: np.ndarray
    ref_pose: dict
    std_pose_json: bytes
    meta: dict
    timings: dict
    row: dict


def _finished(fn, arg) -> Future:
    """``fn(arg)`` run now, as a finished Future (the in-line path of ``run``)."""
    done: Future = Future()
    try:
        done.set_result(fn(arg))
    except Exception as exc:
        done.set_exception(exc)
    return done


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


@contextlib.contextmanager
def _stage(timings: dict, name: str):
    t = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + (time.perf_counter() - t)


class BlenderWorker:
    """A Blender session that renders jobs (use one per process)."""

    def __init__(self, settings: RenderSettings, max_characters: int = 50, rss_cap_mb: float = 6000.0,
                 record_timings: bool = False, encode_ahead: bool = False):
        if settings.threads:
            # Mesa's software GL (workbench/eevee without a GPU) reads this when the context is made;
            # 0 rasterises in the calling thread (1 would hand each frame to a second thread and wait).
            os.environ.setdefault("LP_NUM_THREADS", str(settings.threads if settings.threads > 1 else 0))
        self.settings = settings
        self.max_characters = max_characters
        self.rss_cap_mb = rss_cap_mb
        self.record_timings = record_timings
        self.scene = scene_mod.new_scene()
        scene_mod.configure_render(self.scene, settings)
        self._loaded: _Loaded | None = None
        self._pose_libs: dict[str, object] = {}
        self.characters_done = 0
        self.pose_library_override = None  # tests: an object with the PoseLibrary fields
        # The farm's per-sample hook (render/farm/pool.py): ``after_sample(job, key, written)`` runs
        # after each sample is appended to the shard; it logs progress and, in fault-injection tests
        # only, crashes or hangs the worker mid-job. An exception from it fails the job.
        self.after_sample = None
        # Encode each sample in a background thread while the next one renders (``run``). Worth it
        # where the render leaves the CPU free (a GPU renders) or a core is spare; a CPU worker on
        # its own share of cores encodes in line (a second busy thread would take another worker's
        # core: docs/rendering.md, "Speed"). The farm turns it on for GPU workers.
        self.encode_ahead = encode_ahead

    # -- lifecycle ----------------------------------------------------------------------------------

    def should_recycle(self) -> bool:
        """True once this process rendered ``max_characters`` characters or passed the RSS cap."""
        return self.characters_done >= self.max_characters or _rss_mb() > self.rss_cap_mb

    def rss_mb(self) -> float:
        return _rss_mb()

    def unload(self) -> None:
        """Remove the current character and purge orphan data (meshes, images, materials)."""
        if self._loaded is not None:
            self._loaded.rig.remove()
            self._loaded = None
            self.characters_done += 1
        purge_orphans()

    def _pose_library(self, path: str):
        if self.pose_library_override is not None:
            return self.pose_library_override
        if path not in self._pose_libs:
            from serialgen.assets_manifest.poses import load_pose_library

            self._pose_libs[path] = load_pose_library(Path(path))
        return self._pose_libs[path]

    def _load_character(self, record: dict, assets_dir: str) -> _Loaded:
        if self._loaded is not None and self._loaded.char_id == record["id"]:
            return self._loaded
        self.unload()
        rig = load_character(record, Path(assets_dir))
        self._loaded = _Loaded(record["id"], rig, PartLookup(rig))
        return self._loaded

    # -- rendering ----------------------------------------------------------------------------------

    def _render(self, scene, standard: bool = False) -> np.ndarray:
        """Render ``scene`` as uint8 RGBA at the output size: the standard image supersampled, the
        others at 1x with the numpy anti-aliasing (``scene.render_rgba``; eevee/cycles sample themselves)."""
        k = scene_mod.set_render_scale(scene, self.settings, standard)
        return scene_mod.render_rgba(scene, k, antialiased=self.settings.engine != "workbench")

    def _keypoints(self, loaded: _Loaded, camera, skel):
        depsgraph = import_bpy().context.evaluated_depsgraph_get()
        height = float(loaded.std_meta.get("character_height_m", 1.7))
        return keypoints_2d(self.scene, depsgraph, loaded.rig, camera, loaded.parts,
                            surface_tolerance=0.015 * height, skel=skel)

    def _render_standard(self, loaded: _Loaded) -> None:
        """Render the standard image of the loaded character once (cached on ``loaded``)."""
        if loaded.std_png:
            return
        s = self.settings
        rig = loaded.rig
        timings: dict[str, float] = {}
        with _stage(timings, "pose"):
            rig.set_expression(std_mod.STANDARD_EXPRESSION)
            rig.apply_pose(std_mod.standard_angles())
            skel = rig.posed_skeleton()
            mesh_points = rig.evaluated_vertices()
            lo, hi = mesh_points.min(0), mesh_points.max(0)
            head = head_geometry_of(rig, skel)
            camera = std_mod.standard_camera(skel, s.width, s.height, rig.face_landmarks)
            apply_camera(self.scene.camera, camera)
            light_mod.apply_lighting(self.scene, light_mod.STANDARD_LIGHTING, s.engine)
        loaded.std_meta["character_height_m"] = float(hi[2] - lo[2])
        with _stage(timings, "render"):
            rgba = self._render(self.scene, standard=True)
        with _stage(timings, "keypoints"):
            kps, defined = self._keypoints(loaded, camera, skel)
        with _stage(timings, "encode"):
            loaded.std_png = shards.encode_png(flatten_on_white(rgba))
            loaded.std_pose = pose_record(kps, defined, s.width, s.height)
            loaded.std_pose_json = shards.json_bytes(loaded.std_pose)
        box = std_mod.standard_face_box(camera, std_mod.face_points(skel, rig.face_landmarks))
        sources = rig.face_landmark_sources
        loaded.std_meta.update({
            "camera": camera.to_json(),
            "face_box": {"center": [round(float(x), 3) for x in box["center"]], "side": round(float(box["side"]), 3),
                         "eye_distance": round(float(box["eye_distance"]), 3),
                         "eye_to_mouth": round(float(box["eye_to_mouth"]), 3)},
            "face_landmarks_source": {k: sources.get(k, "defaults")
                                      for k in ("l_eye", "r_eye", "nose", "mouth", "l_ear", "r_ear")},
            "head_box": std_mod.head_box(skel, camera, head),
            "fit": std_mod.standard_fit(camera, head.world_points(skel), mesh_points),
            "lighting": light_mod.STANDARD_LIGHTING.to_json(),
            "timings_s": timings,
        })

    def view_camera(self, rig: Rig, view, skel=None):
        """The camera of a drawn ``view`` for the rig's current pose: frame the view's points
        (:meth:`_framing_points`), never inside the character (outside its evaluated mesh bounds
        by ``camera.clearance_for``)."""
        s = self.settings
        skel = skel if skel is not None else rig.posed_skeleton()
        kps3d, defined = sk.compute_keypoints(skel, rig.face_landmarks)
        mesh_points = rig.evaluated_vertices()
        points = self._framing_points(view.framing, rig, skel, kps3d, defined, mesh_points)
        return cam_mod.fit_camera(view, points, s.width, s.height,
                                  bounds=(mesh_points.min(0), mesh_points.max(0)))

    def _framing_points(self, framing: str, rig: Rig, skel, kps3d: np.ndarray, defined: np.ndarray,
                        mesh_points: np.ndarray | None = None) -> np.ndarray:
        """World points (N, 3) that the camera must frame for ``framing``: head = the measured head's
        points (rigid with the head joint, ``head_geometry``), upper body = those plus the
        shoulder/elbow/hip/face keypoints, full body = every evaluated mesh vertex."""
        head = head_geometry_of(rig, skel).world_points(skel)
        if framing == "head":
            return head
        if framing == "upper_body":
            idx = [_KP[n] for n in _UPPER_BODY if defined[_KP[n]]]
            return np.concatenate([head, kps3d[idx]])
        return mesh_points if mesh_points is not None else rig.evaluated_vertices()

    def _exposed_render(self, seed: int, lighting: light_mod.LightingSpec):
        """Render a non-standard image under ``lighting`` with the exposure floor (``lighting.py``):
        a frame darker than ``REDRAW_BELOW`` is rendered again under a light drawn from
        ``(seed, "relight", n)``; one under ``EXPOSURE_FLOOR`` gets the exposure gain. Workbench has
        no lamps, so the light's intensity and colour temperature are a gain on its frame; both gains
        go through one lookup table. Returns (RGBA, the light used, the ``exposure`` meta record)."""
        s = self.settings
        redraws = 0
        while True:
            rgba = self._render(self.scene)
            gain = light_mod.rgb_gain(lighting) if s.engine == "workbench" else np.ones(3)
            lum = light_mod.fg_luminance(rgba, gain)
            if lum is None or lum >= light_mod.REDRAW_BELOW or redraws == light_mod.MAX_REDRAWS:
                break
            redraws += 1
            lighting = light_mod.sample_lighting(np.random.default_rng(derive_seed(seed, "relight", redraws)))
            light_mod.apply_lighting(self.scene, lighting, s.engine)
        extra = light_mod.exposure_gain(lum)
        if extra != 1.0:  # the exact median after both gains (the same lookup tables)
            lum = light_mod.fg_luminance(rgba, gain * extra)
        if extra != 1.0 or s.engine == "workbench":
            rgba = light_mod.apply_gain(rgba, gain * extra)
        final = lum
        record = {"gain": round(float(extra), 4), "redraws": redraws,
                  "fg_luminance": None if final is None else round(final, 4)}
        return rgba, lighting, record

    def _render_sample(self, job: RenderJob, loaded: _Loaded, library, pose_id: int, view_index: int):
        """Render one pair up to its pixels, keypoints and meta (the bpy part); ``_encode_sample``
        makes its shard members (which needs no bpy: it may run in another thread)."""
        s = self.settings
        rig = loaded.rig
        key = shards.sample_key(loaded.char_id, pose_id, view_index)
        seed = derive_seed(job.run_seed, loaded.char_id, pose_id, view_index)
        rng = np.random.default_rng(seed)
        timings: dict[str, float] = {}
        with _stage(timings, "pose"):
            view = cam_mod.sample_view(rng)
            lighting = light_mod.sample_lighting(rng)
            names = sorted(n for n in (rig.expressions or {}) if n != "neutral")
            options = ["neutral"] + names
            expression = options[int(rng.integers(len(options)))]
            rig.set_expression(expression)
            rig.apply_pose(np.asarray(library.angles[pose_id], dtype=np.float64),
                           np.asarray(library.root_translation[pose_id], dtype=np.float64))
            skel = rig.posed_skeleton()
            camera = self.view_camera(rig, view, skel)
            apply_camera(self.scene.camera, camera)
            light_mod.apply_lighting(self.scene, lighting, s.engine)
        with _stage(timings, "render"):
            rgba, lighting, exposure = self._exposed_render(seed, lighting)
        with _stage(timings, "keypoints"):
            kps, defined = self._keypoints(loaded, camera, skel)
        with _stage(timings, "encode"):  # the records; the PNG and JSON bytes in _encode_sample
            motion_index = int(library.motion_index[pose_id])
            meta = {
                "schema": shards.SAMPLE_SCHEMA,
                "key": key,
                "character": loaded.char_id,
                "character_kind": job.character.get("kind"),
                "split": job.split,
                "pose_id": pose_id,
                "motion": library.motion_names[motion_index],
                "motion_index": motion_index,
                "phase": round(float(library.phase[pose_id]), 6),
                "view_index": view_index,
                "expression": expression,
                "framing": view.framing,
                "view": cam_mod.view_to_json(view),
                "camera": camera.to_json(),
                "lighting": lighting.to_json(),
                "exposure": exposure,
                "fg_luminance": exposure["fg_luminance"],
                "std": {k: v for k, v in loaded.std_meta.items() if k != "timings_s"},
                "seed": seed,
                "run_seed": job.run_seed,
                "engine": s.engine,
                "resolution": [s.width, s.height],
                "timings_s": None,
            }
            ref_pose = pose_record(kps, defined, s.width, s.height)
        return _Rendered(key, rgba, ref_pose, loaded.std_pose_json, meta, timings, sample_row(meta, ref_pose))

    def _encode_sample(self, rendered: "_Rendered") -> dict[str, bytes]:
        """The shard members of a rendered sample (shard format 3: the standard image lives in the
        character's standard tar). Pure Python/numpy/libdeflate, no bpy: ``run`` calls it in a
        background thread while the next sample renders."""
        with _stage(rendered.timings, "encode"):
            members = {
                "ref.png": shards.encode_png(rendered.rgba),
                "ref_pose.json": shards.json_bytes(rendered.ref_pose),
                "std_pose.json": rendered.std_pose_json,
            }
        if self.record_timings:
            rendered.meta["timings_s"] = {k: round(v, 6) for k, v in rendered.timings.items()}
        members["meta.json"] = shards.json_bytes(rendered.meta)
        return members

    def _write_standard(self, job: RenderJob, loaded: _Loaded) -> dict:
        """Write the character's standard tar (``<split>/standard/<key>.tar``, shard format 3) and
        return its summary. Deterministic, so a retried job rewrites the same bytes."""
        s = self.settings
        meta = {k: v for k, v in loaded.std_meta.items() if k != "timings_s"}
        meta.update({"character_kind": job.character.get("kind"), "engine": s.engine,
                     "resolution": [s.width, s.height], "rendering_version": RENDERING_VERSION,
                     "timings_s": ({k: round(v, 6) for k, v in loaded.std_meta["timings_s"].items()}
                                   if self.record_timings else None)})
        done = shards.write_standard(job.out_dir, job.split, loaded.char_id, loaded.std_png, loaded.std_pose, meta)
        return done.to_json()

    def run(self, job: RenderJob) -> dict:
        """Render ``job`` into its shard. Never raises: failures come back in the summary.

        Returns a small dict: job, status ("ok" | "failed"), shard summary (or None), failures
        (one per failed sample or the whole character), summed per-stage timings in seconds, pairs,
        rss_mb, ``standard_pose``: the character's std_pose.json record (None when the job failed
        before its standard image was rendered), ``standard``: the summary of the standard tar the
        job wrote (only the job whose range starts at 0 writes it; else None), and ``stats``: the
        shard's ``render_stats.Histograms`` as JSON (what the report shows, merged by the farm).
        """
        t0 = time.perf_counter()
        totals = {k: 0.0 for k in ("load", "standard", *SAMPLE_STAGES)}
        failures: list[dict] = []
        result = {"job": job.name, "character": job.character.get("id"), "status": "ok", "shard": None,
                  "failures": failures, "timings_s": totals, "pairs": 0, "standard_pose": None,
                  "standard": None, "stats": None}
        writer = None
        try:
            with _stage(totals, "load"):
                loaded = self._load_character(job.character, job.assets_dir)
                library = self._pose_library(job.poses_path)
            with _stage(totals, "standard"):
                self._render_standard(loaded)
                if job.start == 0:
                    result["standard"] = self._write_standard(job, loaded)
            result["standard_pose"] = loaded.std_pose
            stats = Histograms()
            plan = character_samples(loaded.char_id, len(library.angles), job.per_character, job.run_seed)
            writer = shards.ShardWriter(job.out_dir, job.shard, job.split)

            def append(rendered: _Rendered, encoded) -> None:
                try:
                    members = encoded.result()
                except Exception as exc:  # one bad sample is counted, the character goes on
                    failures.append({"character": loaded.char_id, "key": rendered.key,
                                     "error": f"{type(exc).__name__}: {exc}"})
                    return
                with _stage(rendered.timings, "write"):
                    writer.write(rendered.key, members)
                for k, v in rendered.timings.items():
                    totals[k] += v
                stats.add(rendered.row)
                result["pairs"] += 1
                if self.after_sample is not None:
                    self.after_sample(job, rendered.key, result["pairs"])

            # With ``encode_ahead``, sample i is encoded (PNG, JSON) in a background thread while
            # sample i + 1 renders, then appended in order: the same bytes and order as encoding in
            # line, and a render call releases the GIL, so on a core that would otherwise wait (a
            # GPU render, a spare core) the encode costs no wall time. CPU time is the same.
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="serialgen-encode") as encoder:
                pending = None
                for pose_id, view_index in plan[job.start:job.stop]:
                    try:
                        rendered = self._render_sample(job, loaded, library, pose_id, view_index)
                    except Exception as exc:  # one bad sample is counted, the character goes on
                        failures.append({"character": loaded.char_id,
                                         "key": shards.sample_key(loaded.char_id, pose_id, view_index),
                                         "error": f"{type(exc).__name__}: {exc}"})
                        continue
                    if not self.encode_ahead:
                        append(rendered, _finished(self._encode_sample, rendered))
                        continue
                    encoded = encoder.submit(self._encode_sample, rendered)
                    if pending is not None:
                        append(*pending)  # encoded while this sample rendered
                    pending = (rendered, encoded)
                if pending is not None:
                    append(*pending)
            summary = writer.close()
            writer = None
            result["shard"] = summary.to_json(with_keys=True)
            result["stats"] = stats.to_json()
        except Exception as exc:  # the whole character failed: record it, the run goes on
            if writer is not None:
                writer.abort()
            self.unload()
            result["status"] = "failed"
            result["error"] = f"{type(exc).__name__}: {exc}"
            result["traceback"] = traceback.format_exc(limit=6)
            failures.append({"character": job.character.get("id"), "key": None, "error": result["error"]})
        totals["job"] = time.perf_counter() - t0
        result["rss_mb"] = round(_rss_mb(), 1)
        return result

"""What the asset build reads in isolation, as an interface the scanners are given.

The scanners here decide what to accept and what to record; reading a character or motion file, or
an OpenEXR image, needs Blender, which lives a floor above (``render/``), and every file from a
stranger (BVH text included) is read outside the build process, with a timeout, so a file that
crashes, hangs or exhausts its reader costs one asset. So the scanners take an :class:`AssetProbe`
as a parameter instead of reading those files themselves: the build is called from above
(``render/asset_build.py`` runs every probe call in its own worker process with a timeout), and
tests can hand in a fake.

A probe never raises for a bad file: a file it cannot read is a :class:`ProbeFailure` with a
machine-readable reason (``import_failed``, ``import_timeout``, ``no_armature`` ...), which the
scanner turns into a rejected record. Only :meth:`AssetProbe.read_exrs` reports failure by raising
:class:`ProbeError` (the HDRI step notes it and rejects the views).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from .retarget import RetargetedMotion

__all__ = ["AssetProbe", "ProbeFailure", "ProbeError", "MotionSamples"]


@dataclass(frozen=True)
class ProbeFailure:
    """A file the probe could not read: ``reason`` becomes the record's reason, ``detail`` its text."""

    reason: str
    detail: str


class ProbeError(RuntimeError):
    """The EXR decoder failed (no Blender, a crash, a timeout)."""


@dataclass(frozen=True)
class MotionSamples:
    """The actions of one file's main armature, sampled per frame in world space (Z up).

    ``bones``: the rest bones as ``bone_maps.map_skeleton`` takes them (dicts with ``name``,
    ``parent``, ``head``, ``tail``); ``rest_rot`` (B, 3, 3) their rest world rotations; ``clips``
    ``[{"name", "fps", "frames"}]``; per clip k, ``rot[k]`` (F, B, 3, 3) world rotations and
    ``pos[k]`` (F, B, 3) world positions of every bone.
    """

    bones: list[dict]
    rest_rot: np.ndarray
    clips: list[dict]
    rot: list[np.ndarray]
    pos: list[np.ndarray]


class AssetProbe(Protocol):
    """Reads asset files that need Blender; decides nothing. ``inspect_character`` is called from
    several threads at once (``characters_scan.scan_characters(workers=...)``)."""

    def inspect_character(self, path: Path, max_bytes: int | None = None) -> dict | ProbeFailure:
        """Import one character file and describe it: the facts ``characters_scan.record_from_facts``
        reads (armature, meshes, bone mapping, normalisation, textures, materials, shape keys,
        fingerprint ...). Fails with ``resource_outside_asset`` when the file refers to a file outside
        its own folder and ``too_large`` when it weighs more than ``max_bytes`` with its resources."""

    def sample_motions(self, path: Path, max_fps: float, max_bytes: int | None = None) -> MotionSamples | ProbeFailure:
        """Sample every action of the file's main armature, at most ``max_fps`` frames per second
        (the same resource checks as ``inspect_character``)."""

    def retarget_bvh(self, path: Path, max_fps: float,
                     max_bytes: int | None = None) -> tuple[RetargetedMotion, str] | ProbeFailure:
        """Parse a BVH file and retarget it onto the canonical skeleton
        (``motions_scan.retarget_bvh``): (motion, up axis), or a failure (``import_failed`` for a
        malformed file, ``not_humanoid``, ``too_large``, ``import_timeout``)."""

    def read_exrs(self, paths: Sequence[Path]) -> list[np.ndarray]:
        """Decode OpenEXR files to float32 (H, W, 3) linear RGB, top row first; :class:`ProbeError`
        when they cannot be decoded."""

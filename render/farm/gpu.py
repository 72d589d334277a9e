"""GPU device selection for Blender workers: enable exactly the GPU(s) Ray assigned to this worker.

Ray gives a GPU actor its GPU ids (``ray.get_runtime_context().get_accelerator_ids()["GPU"]``, the
node's GPU indices; taken here in NVML / ``nvidia-smi`` order, which is CUDA's order when the node
sets ``CUDA_DEVICE_ORDER=PCI_BUS_ID``: do so on nodes with mixed GPU models) and sets
``CUDA_VISIBLE_DEVICES``. Blender
does not always honour that variable (and its device list is not in CUDA's order), so Cycles would
render on whatever devices its preferences enable - several workers on GPU 0. We therefore select the
device explicitly:

1. map each assigned index to its PCI location with ``nvidia-smi --query-gpu=index,pci.bus_id``;
2. list Cycles' devices (``preferences.addons["cycles"].preferences.devices``, ids like
   ``CUDA_NVIDIA H100 80GB HBM3_0000:41:00`` and ``..._OptiX``), pick the best backend present
   (OptiX, CUDA, HIP, oneAPI, Metal), and enable only the devices at those PCI locations;
3. when no PCI map is available: if Blender lists exactly as many GPUs of the backend as were
   assigned, ``CUDA_VISIBLE_DEVICES`` was honoured and those are enabled; otherwise the devices are
   sorted by PCI location (= NVML order) and picked by index.

:func:`select_cycles_devices` is pure (a device list in, ids out) and unit-tested with device lists;
:func:`configure_cycles_gpus` applies it in Blender. **Not run on a GPU here** (the development box
has none): the code path is explicit and tested on lists, not on hardware.

EEVEE and Workbench draw through OpenGL/EGL; bpy offers no per-process device choice for that
context (``preferences.system.gpu_preferred_device`` needs a restart of Blender and saved
preferences). On multi-GPU nodes run EEVEE with one GPU visible per container or node
(``docs/scaling.md``); the worker writes the GPU ids it got into every job log so a mismatch shows.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass

from serialgen.render.bpy_utils import import_bpy

__all__ = ["BACKENDS", "CyclesDevice", "parse_pci", "nvidia_pci_map", "select_cycles_devices",
           "configure_cycles_gpus"]

#: Preferred Cycles GPU backends, best first.
BACKENDS = ("OPTIX", "CUDA", "HIP", "ONEAPI", "METAL")

_CYCLES_PCI = re.compile(r"_([0-9a-fA-F]{4,8}):([0-9a-fA-F]{2}):([0-9a-fA-F]{2})(?:\.[0-9a-fA-F])?(?:_|$)")


@dataclass(frozen=True)
class CyclesDevice:
    """One entry of Cycles' device list (``type`` CPU/CUDA/OPTIX/HIP/ONEAPI/METAL)."""

    type: str
    id: str
    name: str = ""


def parse_pci(text: str) -> tuple[int, int, int] | None:
    """(domain, bus, device) from a Cycles device id or an ``nvidia-smi`` bus id, else None.

    ``"CUDA_NVIDIA H100_0000:41:00"`` and ``"00000000:41:00.0"`` both give (0, 0x41, 0).
    """
    m = _CYCLES_PCI.search("_" + text.strip())
    if not m:
        return None
    return int(m.group(1), 16), int(m.group(2), 16), int(m.group(3), 16)


def nvidia_pci_map() -> dict[int, tuple[int, int, int]]:
    """{physical GPU index: PCI location} from ``nvidia-smi`` ({} when it is missing or fails)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {}
    try:
        out = subprocess.run([exe, "--query-gpu=index,pci.bus_id", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    found = {}
    for line in out.splitlines():
        index, _, bus = line.partition(",")
        pci = parse_pci(bus)
        if index.strip().isdigit() and pci is not None:
            found[int(index)] = pci
    return found


def select_cycles_devices(devices: list[CyclesDevice], gpu_ids: list[str | int],
                          pci_map: dict[int, tuple[int, int, int]] | None = None,
                          backends: tuple[str, ...] = BACKENDS) -> tuple[str, list[str]]:
    """Choose the backend and the device ids to enable for the GPUs ``gpu_ids`` Ray assigned.

    ``devices``: Cycles' device list. ``pci_map``: physical index -> PCI location (``nvidia_pci_map``).
    Returns (backend, ids). Raises ``RuntimeError`` naming what was found when nothing matches
    (a GPU worker silently rendering on the CPU would be 10-100x slower).
    """
    wanted = [int(g) for g in gpu_ids]
    if not wanted:
        raise RuntimeError("no GPU assigned to this worker (use --gpus-per-worker > 0)")
    present = {d.type for d in devices}
    backend = next((b for b in backends if b in present), None)
    if backend is None:
        raise RuntimeError(f"Cycles lists no GPU device (devices: {[d.id for d in devices] or 'none'}); "
                           "is the GPU driver visible to this process?")
    gpus = [d for d in devices if d.type == backend]
    if pci_map:
        by_pci = {parse_pci(d.id): d for d in gpus}
        chosen = [by_pci[pci_map[g]] for g in wanted if g in pci_map and pci_map[g] in by_pci]
        if len(chosen) == len(wanted):
            return backend, [d.id for d in chosen]
    if len(gpus) == len(wanted):  # CUDA_VISIBLE_DEVICES was honoured: only ours are listed
        return backend, [d.id for d in gpus]
    ordered = sorted(gpus, key=lambda d: parse_pci(d.id) or (1 << 30, 0, 0))
    if max(wanted) >= len(ordered):
        raise RuntimeError(f"GPU ids {wanted} assigned but Cycles lists {len(ordered)} {backend} devices "
                           f"({[d.id for d in ordered]})")
    return backend, [ordered[g].id for g in wanted]


def configure_cycles_gpus(scene, gpu_ids: list[str | int]) -> str:
    """Make Cycles render ``scene`` on exactly the GPUs ``gpu_ids`` (in this Blender process).

    Returns a one-line description for the job log.
    """
    prefs = import_bpy().context.preferences.addons["cycles"].preferences
    prefs.refresh_devices()
    listed = [CyclesDevice(d.type, d.id, d.name) for d in prefs.devices]
    backend, ids = select_cycles_devices(listed, gpu_ids, nvidia_pci_map())
    prefs.compute_device_type = backend
    prefs.refresh_devices()  # the list depends on the backend
    enabled = []
    for d in prefs.devices:
        d.use = d.id in ids
        if d.use:
            enabled.append(d.id)
    scene.cycles.device = "GPU"
    return (f"cycles GPU {backend}: ray gpu ids {list(gpu_ids)} -> {enabled} "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')})")

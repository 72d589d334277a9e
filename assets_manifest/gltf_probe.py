"""Read a glTF/GLB/VRM file's JSON without Blender: structural checks before an import, the VRM
humanoid table and expression groups, and decoding of ``EXT_meshopt_compression`` into a plain GLB
that Blender's importer can read (Blender's glTF importer has no meshopt decoder).

``probe_gltf(path) -> dict`` never raises on bad files: it returns ``{"ok": False, "reason",
"detail"}`` for a truncated or malformed file (reason ``import_failed``), and ``"missing_images"``
for external image files that do not exist.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from urllib.parse import unquote

import numpy as np

__all__ = ["GLB_MAGIC", "read_gltf_json", "probe_gltf", "decode_meshopt", "write_glb", "MESHOPT_EXT"]

GLB_MAGIC = b"glTF"
MESHOPT_EXT = ("EXT_meshopt_compression", "KHR_meshopt_compression")
_JSON_CHUNK, _BIN_CHUNK = 0x4E4F534A, 0x004E4942


class GltfError(ValueError):
    """A glTF file that cannot be read (message names the problem)."""


def read_gltf_json(path) -> tuple[dict, bytes | None]:
    """(JSON document, GLB binary chunk or None). Raises :class:`GltfError` for truncated/bad files."""
    p = Path(path)
    data = p.read_bytes()
    if data[:4] == GLB_MAGIC:
        if len(data) < 20:
            raise GltfError("GLB header is truncated")
        _magic, version, length = struct.unpack_from("<4sII", data, 0)
        if version != 2:
            raise GltfError(f"GLB version {version} (only 2 is supported)")
        if length > len(data):
            raise GltfError(f"GLB is truncated: header says {length} bytes, file has {len(data)}")
        off, doc, binary = 12, None, None
        while off + 8 <= length:
            clen, ctype = struct.unpack_from("<II", data, off)
            if off + 8 + clen > length:
                raise GltfError("GLB chunk runs past the end of the file (truncated)")
            chunk = data[off + 8: off + 8 + clen]
            if ctype == _JSON_CHUNK and doc is None:
                try:
                    doc = json.loads(chunk.decode("utf-8"))
                except (UnicodeDecodeError, ValueError) as e:
                    raise GltfError(f"GLB JSON chunk is not valid JSON ({e})") from e
            elif ctype == _BIN_CHUNK and binary is None:
                binary = bytes(chunk)
            off += 8 + clen + ((4 - clen % 4) % 4 if clen % 4 else 0)
        if doc is None:
            raise GltfError("GLB has no JSON chunk")
        return doc, binary
    try:
        return json.loads(data.decode("utf-8")), None
    except (UnicodeDecodeError, ValueError) as e:
        raise GltfError(f"not a glTF file (neither GLB nor JSON: {e})") from e


def _vrm(doc: dict) -> dict | None:
    ext = doc.get("extensions") or {}
    nodes = doc.get("nodes") or []

    def node_name(i):
        try:
            return nodes[int(i)].get("name") or f"node_{i}"
        except (IndexError, TypeError, ValueError):
            return None

    if "VRM" in ext:  # VRM 0.x
        v = ext["VRM"]
        human = {}
        for hb in (v.get("humanoid") or {}).get("humanBones") or []:
            n = node_name(hb.get("node"))
            if n and hb.get("bone"):
                human[hb["bone"]] = n
        groups = []
        meshes = doc.get("meshes") or []
        for g in (v.get("blendShapeMaster") or {}).get("blendShapeGroups") or []:
            binds = []
            for b in g.get("binds") or []:
                try:
                    mesh = meshes[int(b["mesh"])]
                    names = (mesh.get("extras") or {}).get("targetNames") or \
                        ((mesh.get("primitives") or [{}])[0].get("extras") or {}).get("targetNames") or []
                    key = names[int(b["index"])] if int(b["index"]) < len(names) else f"target_{b['index']}"
                    binds.append({"mesh": mesh.get("name"), "key": key, "weight": float(b.get("weight", 100)) / 100})
                except (KeyError, IndexError, TypeError, ValueError):
                    continue
            groups.append({"preset": g.get("presetName") or "", "name": g.get("name") or "", "binds": binds})
        return {"version": 0, "humanoid": human, "expressions": groups}
    if "VRMC_vrm" in ext:  # VRM 1.0
        v = ext["VRMC_vrm"]
        human = {}
        for kind, hb in ((v.get("humanoid") or {}).get("humanBones") or {}).items():
            n = node_name(hb.get("node"))
            if n:
                human[kind] = n
        groups = []
        exprs = v.get("expressions") or {}
        for preset, e in (exprs.get("preset") or {}).items():
            groups.append({"preset": preset, "name": preset, "binds": []})
        return {"version": 1, "humanoid": human, "expressions": groups}
    return None


def probe_gltf(path) -> dict:
    """Structural facts about a glTF/GLB/VRM file (see module doc)."""
    p = Path(path)
    try:
        doc, binary = read_gltf_json(p)
    except GltfError as e:
        return {"ok": False, "reason": "import_failed", "detail": f"{p.name}: {e}"}
    except OSError as e:
        return {"ok": False, "reason": "import_failed", "detail": f"{p.name}: cannot read ({e.strerror})"}
    if not isinstance(doc, dict) or "asset" not in doc:
        return {"ok": False, "reason": "import_failed", "detail": f"{p.name}: no glTF 'asset' block"}
    required = list(doc.get("extensionsRequired") or [])
    used = list(doc.get("extensionsUsed") or [])
    missing_images, images = [], []
    for k, img in enumerate(doc.get("images") or []):
        uri = img.get("uri")
        if uri and not uri.startswith("data:"):
            f = (p.parent / unquote(uri))
            images.append({"index": k, "uri": uri, "exists": f.is_file()})
            if not f.is_file():
                missing_images.append(uri)
        else:
            images.append({"index": k, "uri": None, "embedded": True})
    missing_buffers = []
    for b in doc.get("buffers") or []:
        uri = b.get("uri")
        if uri and not uri.startswith("data:") and not (p.parent / unquote(uri)).is_file():
            missing_buffers.append(uri)
    return {
        "ok": True, "extensions_required": required, "extensions_used": used,
        "meshopt": any(e in required or e in used for e in MESHOPT_EXT),
        "draco": "KHR_draco_mesh_compression" in required,
        "skins": len(doc.get("skins") or []), "meshes": len(doc.get("meshes") or []),
        "animations": [a.get("name") or f"animation_{i}" for i, a in enumerate(doc.get("animations") or [])],
        "images": images, "missing_images": missing_images, "missing_buffers": missing_buffers,
        "vrm": _vrm(doc), "has_bin": binary is not None,
    }


def write_glb(path, doc: dict, binary: bytes) -> Path:
    """Write a GLB 2.0 file from a JSON document and one binary chunk."""
    js = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    js += b" " * ((4 - len(js) % 4) % 4)
    binary = bytes(binary) + b"\0" * ((4 - len(binary) % 4) % 4)
    total = 12 + 8 + len(js) + 8 + len(binary)
    out = struct.pack("<4sII", GLB_MAGIC, 2, total) + struct.pack("<II", len(js), _JSON_CHUNK) + js
    out += struct.pack("<II", len(binary), _BIN_CHUNK) + binary
    Path(path).write_bytes(out)
    return Path(path)


def decode_meshopt(path, out_path) -> Path:
    """Rewrite a meshopt-compressed glTF/GLB as a plain GLB (all buffer views in one binary chunk).

    Needs the PyPI ``meshopt`` package; raises :class:`GltfError` when it is missing or a view
    cannot be decoded.
    """
    try:
        import meshopt  # noqa: PLC0415 - optional, only for compressed files
    except ImportError as e:
        raise GltfError("EXT_meshopt_compression needs the 'meshopt' package (pip install meshopt)") from e
    p = Path(path)
    doc, glb_bin = read_gltf_json(p)

    buffers = []
    for i, b in enumerate(doc.get("buffers") or []):
        uri = b.get("uri")
        if uri is None:
            buffers.append(glb_bin if i == 0 and glb_bin is not None else None)
        elif uri.startswith("data:"):
            import base64  # noqa: PLC0415
            buffers.append(base64.b64decode(uri.split(",", 1)[1]))
        else:
            f = p.parent / unquote(uri)
            buffers.append(f.read_bytes() if f.is_file() else None)

    out = bytearray()
    views = []
    for k, bv in enumerate(doc.get("bufferViews") or []):
        ext = None
        for name in MESHOPT_EXT:
            ext = (bv.get("extensions") or {}).get(name) or ext
        if ext is not None:
            src = buffers[ext["buffer"]]
            if src is None:
                raise GltfError(f"buffer view {k}: compressed buffer {ext['buffer']} is missing")
            raw = src[ext.get("byteOffset", 0): ext.get("byteOffset", 0) + ext["byteLength"]]
            mode = ext.get("mode", "ATTRIBUTES")
            filt = ext.get("filter", "NONE")
            try:
                dec = meshopt.decode_gltf_buffer(raw, int(ext["count"]), int(ext["byteStride"]), mode,
                                                 None if filt == "NONE" else filt)
            except (ValueError, RuntimeError) as e:
                raise GltfError(f"buffer view {k}: meshopt decode failed ({e})") from e
            data = np.ascontiguousarray(dec).view(np.uint8).tobytes()
            new = {kk: vv for kk, vv in bv.items() if kk != "extensions"}
            if mode == "ATTRIBUTES":
                new["byteStride"] = int(ext["byteStride"])
        else:
            src = buffers[bv["buffer"]]
            if src is None:
                raise GltfError(f"buffer view {k}: buffer {bv['buffer']} is missing (a meshopt fallback buffer?)")
            off = bv.get("byteOffset", 0)
            data = src[off: off + bv["byteLength"]]
            new = dict(bv)
        out += b"\0" * ((4 - len(out) % 4) % 4)
        new.update(buffer=0, byteOffset=len(out), byteLength=len(data))
        out += data
        views.append(new)
    doc = dict(doc)
    doc["bufferViews"] = views
    doc["buffers"] = [{"byteLength": len(out)}]
    for key in ("extensionsRequired", "extensionsUsed"):
        if key in doc:
            doc[key] = [e for e in doc[key] if e not in MESHOPT_EXT]
            if not doc[key]:
                del doc[key]
    # External images are embedded, so the decoded GLB can live anywhere (a temporary folder).
    for img in doc.get("images") or []:
        uri = img.get("uri")
        if uri and not uri.startswith("data:"):
            f = p.parent / unquote(uri)
            if not f.is_file():
                continue
            data = f.read_bytes()
            out += b"\0" * ((4 - len(out) % 4) % 4)
            views.append({"buffer": 0, "byteOffset": len(out), "byteLength": len(data)})
            out += data
            img.pop("uri")
            img["bufferView"] = len(views) - 1
            img.setdefault("mimeType", "image/jpeg" if f.suffix.lower() in (".jpg", ".jpeg") else "image/png")
    doc["buffers"] = [{"byteLength": len(out)}]
    return write_glb(out_path, doc, bytes(out))

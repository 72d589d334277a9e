"""Read a glTF/GLB/VRM file's JSON without Blender: structural checks before an import, where its
external resources are and how big they are, the VRM humanoid table and expression groups, and
decoding of ``EXT_meshopt_compression`` into a plain GLB that Blender's importer can read (Blender's
glTF importer has no meshopt decoder).

``probe_gltf(path, max_bytes=None) -> dict`` never raises on bad files: it returns ``{"ok": False,
"reason", "detail"}`` for

* a truncated or malformed file (reason ``import_failed``);
* an image or buffer URI that does not resolve inside the file's own folder (``resource_outside_asset``:
  an absolute path, ``../``, a symlink leading out, or any scheme but ``data:``). This is decided from
  the URI and the folder alone, before anything outside is looked at, so the answer (and its text) is
  the same whether the outside file exists or not;
* the file plus its external resources weighing more than ``max_bytes`` (``too_large``; checked from
  file sizes, before anything is read beyond the GLB's JSON chunk).

and ``"missing_images"`` for external image files inside the folder that do not exist.
"""

from __future__ import annotations

import json
import os
import re
import stat as stat_mod
import struct
from pathlib import Path
from urllib.parse import unquote

import numpy as np

from .manifest import format_bytes

__all__ = ["GLB_MAGIC", "GltfError", "read_gltf_json", "resolve_uri", "probe_gltf", "decode_meshopt", "write_glb",
           "MESHOPT_EXT"]

GLB_MAGIC = b"glTF"
MESHOPT_EXT = ("EXT_meshopt_compression", "KHR_meshopt_compression")
_JSON_CHUNK, _BIN_CHUNK = 0x4E4F534A, 0x004E4942
# A URI scheme (RFC 3986): "file:", "http:", also "C:" (a Windows drive); only "data:" stays inside.
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


class GltfError(ValueError):
    """A glTF file that cannot be read (message names the problem)."""


def read_gltf_json(path, *, binary: bool = True) -> tuple[dict, bytes | None]:
    """(JSON document, GLB binary chunk or None). ``binary=False`` reads only the GLB header and
    JSON chunk (the binary chunk, usually most of the file, is skipped over). Raises
    :class:`GltfError` for truncated/bad files."""
    p = Path(path)
    with open(p, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(12)
        if head[:4] != GLB_MAGIC:
            data = head + fh.read()
            try:
                doc = json.loads(data.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError) as e:
                raise GltfError(f"not a glTF file (neither GLB nor JSON: {str(e)[:200]})") from None
            if not isinstance(doc, dict):
                raise GltfError(f"not a glTF file (the JSON is a {type(doc).__name__}, not an object)")
            return doc, None
        if len(head) < 12 or size < 20:
            raise GltfError("GLB header is truncated")
        _magic, version, length = struct.unpack_from("<4sII", head, 0)
        if version != 2:
            raise GltfError(f"GLB version {version} (only 2 is supported)")
        if length > size:
            raise GltfError(f"GLB is truncated: header says {length} bytes, file has {size}")
        off, doc, blob = 12, None, None
        while off + 8 <= length:
            fh.seek(off)
            chunk_head = fh.read(8)
            if len(chunk_head) < 8:
                raise GltfError("GLB chunk header is truncated")
            clen, ctype = struct.unpack("<II", chunk_head)
            if off + 8 + clen > length:
                raise GltfError("GLB chunk runs past the end of the file (truncated)")
            if ctype == _JSON_CHUNK and doc is None:
                try:
                    doc = json.loads(fh.read(clen).decode("utf-8"))
                except (UnicodeDecodeError, ValueError, RecursionError) as e:
                    raise GltfError(f"GLB JSON chunk is not valid JSON ({str(e)[:200]})") from None
                if not isinstance(doc, dict):
                    raise GltfError(f"GLB JSON chunk is a {type(doc).__name__}, not an object")
            elif ctype == _BIN_CHUNK and blob is None:
                blob = fh.read(clen) if binary else b""
            off += 8 + clen + (4 - clen % 4) % 4
        if doc is None:
            raise GltfError("GLB has no JSON chunk")
        return doc, blob


def resolve_uri(folder, uri: str) -> Path | None:
    """The file an external glTF URI names, when it resolves inside ``folder`` (symlinks followed);
    None when it does not. Decided from the URI and ``folder`` alone: the answer does not depend on
    whether a file outside exists. Blender's importer reads ``join(folder, normpath(unquote(uri with
    backslashes as slashes)))``; both orders of unquoting and slash-fixing are checked."""
    if not isinstance(uri, str) or not uri or _SCHEME.match(uri):
        return None
    root = os.path.realpath(folder)
    found = None
    for rel in (unquote(uri.replace("\\", "/")), unquote(uri).replace("\\", "/")):
        if not rel or "\x00" in rel or rel.startswith("/"):
            return None
        cand = os.path.realpath(os.path.join(root, os.path.normpath(rel)))
        if os.path.commonpath([cand, root]) != root or cand == root:
            return None
        found = found or Path(cand)
    return found


def _items(doc: dict, key: str) -> list:
    """``doc[key]`` as a list of objects; a malformed glTF (not a list, an entry not an object) is a
    GltfError naming the key."""
    v = doc.get(key)
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(x, dict) for x in v):
        raise GltfError(f"'{key}' is not a list of objects")
    return v


def _strings(v) -> list[str]:
    return [x for x in v if isinstance(x, str)] if isinstance(v, list) else []


def _dict(v) -> dict:
    return v if isinstance(v, dict) else {}


def _vrm(doc: dict) -> dict | None:
    """The VRM humanoid table and expression groups; malformed parts are skipped (the extension is
    optional: the file is still a glTF)."""
    ext = _dict(doc.get("extensions"))
    nodes = doc.get("nodes") if isinstance(doc.get("nodes"), list) else []

    def node_name(i):
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(nodes) or not isinstance(nodes[i], dict):
            return None
        name = nodes[i].get("name")
        return name if isinstance(name, str) and name else f"node_{i}"

    if isinstance(ext.get("VRM"), dict):  # VRM 0.x
        v = ext["VRM"]
        human = {}
        bones = _dict(v.get("humanoid")).get("humanBones")
        for hb in bones if isinstance(bones, list) else []:
            hb = _dict(hb)
            n = node_name(hb.get("node"))
            if n and isinstance(hb.get("bone"), str) and hb["bone"]:
                human[hb["bone"]] = n
        groups = []
        meshes = doc.get("meshes") if isinstance(doc.get("meshes"), list) else []
        glist = _dict(v.get("blendShapeMaster")).get("blendShapeGroups")
        for g in glist if isinstance(glist, list) else []:
            g = _dict(g)
            binds = []
            for b in g.get("binds") if isinstance(g.get("binds"), list) else []:
                try:
                    mesh = meshes[int(b["mesh"])]
                    prims = mesh.get("primitives") or [{}]
                    names = (mesh.get("extras") or {}).get("targetNames") or (prims[0].get("extras") or {}).get(
                        "targetNames") or []
                    idx = int(b["index"])
                    key = names[idx] if 0 <= idx < len(names) else f"target_{idx}"
                    binds.append({"mesh": mesh.get("name"), "key": str(key),
                                  "weight": float(b.get("weight", 100)) / 100})
                except (KeyError, IndexError, TypeError, ValueError, AttributeError, OverflowError):
                    continue
            preset, name = g.get("presetName"), g.get("name")
            groups.append({"preset": preset if isinstance(preset, str) else "",
                           "name": name if isinstance(name, str) else "", "binds": binds})
        return {"version": 0, "humanoid": human, "expressions": groups}
    if isinstance(ext.get("VRMC_vrm"), dict):  # VRM 1.0
        v = ext["VRMC_vrm"]
        human = {}
        for kind, hb in _dict(_dict(v.get("humanoid")).get("humanBones")).items():
            n = node_name(_dict(hb).get("node"))
            if n:
                human[kind] = n
        presets = _dict(_dict(v.get("expressions")).get("preset"))
        groups = [{"preset": preset, "name": preset, "binds": []} for preset in presets]
        return {"version": 1, "humanoid": human, "expressions": groups}
    return None


def _external_resources(doc: dict) -> list[tuple[str, int, str]]:
    """(what, index, uri) of every image and buffer that names a file (not ``data:``, not embedded)."""
    out = []
    for what, key in (("image", "images"), ("buffer", "buffers")):
        for k, item in enumerate(_items(doc, key)):
            uri = item.get("uri")
            if uri is None:
                continue
            if not isinstance(uri, str):
                raise GltfError(f"{what} {k}: 'uri' is not a string")
            if not uri.startswith("data:"):
                out.append((what, k, uri))
    return out


def probe_gltf(path, max_bytes: int | None = None) -> dict:
    """Structural facts about a glTF/GLB/VRM file (see module doc). ``max_bytes``: the most the file
    and its external resources may weigh together (None: no limit)."""
    p = Path(path)

    def fail(reason, detail):
        return {"ok": False, "reason": reason, "detail": f"{p.name}: {detail}"}

    try:
        st = os.stat(p)
        if max_bytes is not None and st.st_size > max_bytes:
            return fail("too_large", f"{format_bytes(st.st_size)}, over the limit of {format_bytes(max_bytes)}")
        doc, _ = read_gltf_json(p, binary=False)
        if "asset" not in doc:
            return fail("import_failed", "no glTF 'asset' block")
        resources = _external_resources(doc)
        # Every URI is judged before any file is looked at (the outcome never depends on what exists outside).
        resolved = []
        for what, k, uri in resources:
            f = resolve_uri(p.parent, uri)
            if f is None:
                return fail("resource_outside_asset",
                            f"{what} {k} URI {uri[:200]!r} does not resolve inside the asset's folder")
            resolved.append((what, k, uri, f))
        total = st.st_size
        missing_images, missing_buffers, images = [], [], []
        for what, k, uri, f in resolved:
            try:
                fst = os.stat(f)
            except OSError:
                (missing_images if what == "image" else missing_buffers).append(uri)
                continue
            if not stat_mod.S_ISREG(fst.st_mode):
                return fail("import_failed", f"{what} {k} URI {uri[:200]!r} is not a regular file")
            total += fst.st_size
        if max_bytes is not None and total > max_bytes:
            return fail("too_large", f"{format_bytes(total)} with its {len(resolved)} external file(s), over the "
                                     f"limit of {format_bytes(max_bytes)}")
        external = {k: uri for what, k, uri in resources if what == "image"}
        for k, _img in enumerate(_items(doc, "images")):
            if k in external:
                images.append({"index": k, "uri": external[k], "exists": external[k] not in missing_images})
            else:
                images.append({"index": k, "uri": None, "embedded": True})
        required = _strings(doc.get("extensionsRequired"))
        used = _strings(doc.get("extensionsUsed"))
        animations = [a.get("name") if isinstance(a.get("name"), str) and a.get("name") else f"animation_{i}"
                      for i, a in enumerate(_items(doc, "animations"))]
        return {
            "ok": True, "extensions_required": required, "extensions_used": used,
            "meshopt": any(e in required or e in used for e in MESHOPT_EXT),
            "draco": "KHR_draco_mesh_compression" in required,
            "skins": len(_items(doc, "skins")), "meshes": len(_items(doc, "meshes")),
            "animations": animations, "images": images, "missing_images": missing_images,
            "missing_buffers": missing_buffers, "resource_bytes": total, "vrm": _vrm(doc),
            "external_files": sorted({str(f) for _w, _k, _u, f in resolved}),
            "materials": _material_colours(doc),
        }
    except GltfError as e:
        return fail("import_failed", str(e))
    except OSError as e:
        return fail("import_failed", f"cannot read ({e.strerror or e})")


def _material_colours(doc: dict) -> list[dict]:
    """Per material: its name, ``baseColorFactor`` (linear RGBA; glTF's default is white) and the
    image its base colour texture shows (an index into ``images``, or None)."""
    textures = doc.get("textures") if isinstance(doc.get("textures"), list) else []
    out = []
    for k, m in enumerate(_items(doc, "materials")):
        pbr = _dict(m.get("pbrMetallicRoughness"))
        f = pbr.get("baseColorFactor")
        ok = isinstance(f, list) and len(f) == 4 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                         and abs(x) < 1e6 for x in f)
        tex = _dict(pbr.get("baseColorTexture")).get("index")
        image = None
        if isinstance(tex, int) and not isinstance(tex, bool) and 0 <= tex < len(textures):
            src = _dict(textures[tex]).get("source")
            image = src if isinstance(src, int) and not isinstance(src, bool) else None
        name = m.get("name")
        out.append({"name": name if isinstance(name, str) else f"material_{k}",
                    "base_colour": [float(x) for x in f] if ok else [1.0, 1.0, 1.0, 1.0], "base_colour_image": image})
    return out


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
            f = resolve_uri(p.parent, uri)
            if f is None:
                raise GltfError(f"buffer {i} URI {uri[:200]!r} does not resolve inside the asset's folder")
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
            f = resolve_uri(p.parent, uri)
            if f is None:
                raise GltfError(f"image URI {uri[:200]!r} does not resolve inside the asset's folder")
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

"""Map a character's shape keys / morph targets to our expression set. Blender-free.

Our set: ``neutral`` (every key 0), ``smile``, ``open_mouth``, ``angry``, ``surprised``, ``sad``,
``blink``. A key name is read as a *concept* and a *side* (:func:`parse_key`); an expression is a
list of alternatives, each a list of concepts that must all exist on one mesh. A concept exists on
a mesh as one key without a side, or as its left and right halves (both are bound). The first
alternative that exists wins.

Reading a name (every family below is tested on keys the tests create, ``tests/test_expressions.py``):

* Unicode NFKC, Blender's ``.001`` duplicate suffix dropped; a namespace before the last ``.``,
  ``:`` or ``|`` dropped (``<group>.MouthOpen_<x>``, ``blendShape1.mouthSmileLeft``) unless what
  follows is only a side (``Blink.L``);
* the name is cut into segments at ``_``, ``-`` and spaces; segments that are a side (``L``,
  ``Left``, ``r`` ..., Japanese 左/右) set the side; of every run of consecutive segments, the
  longest that reads as a concept wins, so prefixes and suffixes (``<x>``, ``AK_44``, ``AA``) fall
  away (except for words too generic to stand inside a longer name: ``Open``, ``A``, ``AA``, ``Fun``,
  ``Mad`` match only a whole name, so ``Eye_Open_L`` is no open mouth); a side may also end the run's last segment (``MouthSmileLeft``, ``SmileL``, ``ウィンク右``)
  or start its first (``LeftBlink``, and ``LsmileOpen`` when the rest reads as a concept);
* the families: plain names (Smile, Happy, Joy, Angry, Mad, Surprised, Sad, Blink, MouthOpen, Open,
  ``SmileOpen``), ARKit blendshapes (mouthSmile, jawOpen, browDown + mouthFrown, eyeWide +
  browInnerUp (+ jawOpen), mouthFrown + browInnerUp, eyeBlink), numbered ARKit (``AK_44_MouthSmileLeft``),
  VRM presets (0.x ``joy/angry/sorrow/fun/surprised/blink/a``, 1.0 ``happy/angry/sad/relaxed/
  surprised/blink/aa``) through the file's blend-shape groups, VRoid keys (``Fcl_ALL_Joy``,
  ``Fcl_MTH_A``, ``Fcl_EYE_Close``), FACS action units with or without separators and words
  (``AU12``, ``AU_12_LipCornerPuller``, ``LipCornerPuller``: 12 smile, 26/27 jaw drop, 4 angry,
  1+2+5 surprise, 15 sad, 45/43 blink), visemes (``viseme_aa``, ``vrc.v_aa``, ``AA_VI_10_aa``), and
  the Japanese MMD morphs (まばたき, 笑い + にっこり, あ, 怒り, びっくり/驚き, 困る + 口角下げ,
  ウィンク + ウィンク右 ...).

``map_expressions(shape_keys, vrm_groups) -> {expression: [[mesh, key, weight], ...]}`` lists
``neutral`` always (empty binding) and each other expression the character can make;
``with_families=True`` also returns ``{expression: [family, ...]}`` (e.g. ``["arkit", "halves"]``):
which naming families made it, for the record's ``stats.expression_families``.
"""

from __future__ import annotations

import re
import unicodedata

__all__ = ["EXPRESSIONS", "map_expressions", "parse_key"]

EXPRESSIONS = ("neutral", "smile", "open_mouth", "angry", "surprised", "sad", "blink")

# expression -> alternatives; each alternative is a list of (concept, weight) that must all exist on
# one mesh. First matching alternative wins.
_RULES: dict[str, list[list[tuple[str, float]]]] = {
    "smile": [
        [("mouthsmile", 1.0)], [("fclalljoy", 1.0)], [("fclmthjoy", 1.0)], [("smile", 1.0), ("eyesmile", 1.0)],
        [("smile", 1.0)], [("happy", 1.0)], [("joy", 1.0)], [("au12", 1.0)], [("cornersup", 1.0)],
        [("fclallfun", 1.0)], [("fun", 1.0)], [("eyesmile", 1.0)],
    ],
    "open_mouth": [
        [("jawopen", 1.0)], [("mouthopen", 1.0)], [("fclmtha", 1.0)], [("viseme_aa", 1.0)], [("vowel_a", 1.0)],
        [("au26", 1.0)], [("au27", 1.0)], [("open", 1.0)],
    ],
    "angry": [
        [("browdown", 1.0), ("mouthfrown", 0.5)], [("browdown", 1.0)], [("fclallangry", 1.0)], [("angry", 1.0)],
        [("mad", 1.0)], [("au4", 1.0)],
    ],
    "surprised": [
        [("eyewide", 1.0), ("browinnerup", 1.0), ("jawopen", 0.4)], [("fclallsurprised", 1.0)], [("surprised", 1.0)],
        [("shocked", 1.0)], [("au1", 1.0), ("au2", 1.0), ("au5", 1.0)],
    ],
    "sad": [
        [("mouthfrown", 1.0), ("browinnerup", 1.0)], [("fclallsorrow", 1.0)], [("sad", 1.0)], [("au15", 1.0)],
        [("troubled", 1.0), ("cornersdown", 1.0)], [("troubled", 1.0)],
    ],
    "blink": [
        [("eyeblink", 1.0)], [("fcleyeclose", 1.0)], [("blink", 1.0)], [("au45", 1.0)], [("au43", 1.0)],
        [("wink", 1.0)],
    ],
}
# VRM preset names (0.x and 1.0) -> our expression.
_VRM_PRESETS = {
    "joy": "smile", "happy": "smile", "angry": "angry", "sorrow": "sad", "sad": "sad",
    "surprised": "surprised", "blink": "blink", "a": "open_mouth", "aa": "open_mouth",
}


def _table(family: str, entries: dict[str, str | tuple[str, str]]) -> dict[str, tuple[str, str, str | None]]:
    out = {}
    for text, value in entries.items():
        concept, side = (value, None) if isinstance(value, str) else value
        out[text] = (concept, family, side)
    return out


# Normalised text (lower-case letters and digits, Japanese kept) -> (concept, family, implied side).
_PHRASES = {
    **_table("plain", {
        "smile": "smile", "smileopen": "smile", "smileclosed": "smile", "smilefull": "smile", "smilebig": "smile",
        "happy": "happy", "joy": "joy", "fun": "fun", "mouthopen": "mouthopen", "openmouth": "mouthopen",
        "open": "open", "a": "vowel_a", "aa": "vowel_a", "angry": "angry", "anger": "angry", "mad": "mad",
        "surprised": "surprised", "surprise": "surprised", "shocked": "shocked", "sad": "sad", "sorrow": "sad",
        "blink": "blink", "eyesclosed": "blink", "eyeclose": "blink", "eyesclose": "blink", "eyeclosed": "blink",
    }),
    **_table("arkit", {
        "mouthsmile": "mouthsmile", "jawopen": "jawopen", "browdown": "browdown", "mouthfrown": "mouthfrown",
        "eyewide": "eyewide", "browinnerup": "browinnerup", "eyeblink": "eyeblink",
    }),
    **_table("vroid", {
        "fclalljoy": "fclalljoy", "fclmthjoy": "fclmthjoy", "fclallfun": "fclallfun", "fclmtha": "fclmtha",
        "fclallangry": "fclallangry", "fclallsurprised": "fclallsurprised", "fclallsorrow": "fclallsorrow",
        "fcleyeclose": "fcleyeclose",
    }),
    **_table("facs", {
        "lipcornerpuller": "au12", "jawdrop": "au26", "mouthstretch": "au27", "browlowerer": "au4",
        "innerbrowraiser": "au1", "outerbrowraiser": "au2", "upperlidraiser": "au5", "lipcornerdepressor": "au15",
    }),
    **_table("mmd", {
        "まばたき": "blink", "笑い": "eyesmile", "にっこり": "smile", "口角上げ": "cornersup", "あ": "vowel_a",
        "怒り": "angry", "びっくり": "surprised", "驚き": "surprised", "困る": "troubled", "悲しい": "sad",
        "悲しみ": "sad", "口角下げ": "cornersdown", "ウィンク": ("wink", "l"), "ウインク": ("wink", "l"),
    }),
}
_AU = re.compile(r"^au0*(\d{1,2})$")
_VISEME = re.compile(r"^(?:viseme|vis|vi|v)\d*(sil|pp|ff|th|dd|kk|ch|ss|nn|rr|aa|ih|oh|ou|e|i|o|u)$")
_NUMBERED_ARKIT = re.compile(r"^(?:ak|arkit)\d+(.+)$")
_NOISE_PREFIXES = ("blendshape", "shapes", "shape", "morph", "bs")
# Words too generic to be found inside a longer name: only a whole name (sides and a namespace apart).
_WHOLE_ONLY = {"open", "a", "aa", "fun", "mad"}
_SIDES = {"l": "l", "left": "l", "r": "r", "right": "r", "左": "l", "右": "r"}
_CAMEL = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+|[^\W\d_]+", re.UNICODE)


def _norm(text: str) -> str:
    return "".join(ch for ch in text.lower() if ch.isalnum())


def _concept(text: str) -> tuple[str, str, str | None] | None:
    """(concept, family, implied side) of one normalised run of a name, or None."""
    if text in _PHRASES:
        return _PHRASES[text]
    m = _AU.match(text)
    if m:
        return f"au{int(m.group(1))}", "facs", None
    m = _VISEME.match(text)
    if m:
        return f"viseme_{m.group(1)}", "viseme", None
    m = _NUMBERED_ARKIT.match(text)
    if m and m.group(1) in _PHRASES and _PHRASES[m.group(1)][1] == "arkit":
        return _PHRASES[m.group(1)][0], "arkit_numbered", None
    for pre in _NOISE_PREFIXES:  # "morphSmile", "bsMouthOpen": a glued technical prefix
        if text.startswith(pre) and len(text) > len(pre) and not text[len(pre)].isdigit():
            found = _concept(text[len(pre):])
            if found is not None:
                return found
    return None


def _run_variants(run: list[str]):
    """(normalised text, side or None) readings of a run of segments: as it is, then with a side
    ending its last segment or starting its first."""
    yield _norm("".join(run)), None
    last = _CAMEL.findall(run[-1])
    if len(last) > 1 and (last[-1].lower() in ("left", "right") or last[-1] in ("L", "R")):
        yield _norm("".join(run[:-1]) + "".join(last[:-1])), _SIDES[last[-1].lower()]
    if len(run[-1]) > 1 and run[-1][-1] in "左右":
        yield _norm("".join(run[:-1]) + run[-1][:-1]), _SIDES[run[-1][-1]]
    first = _CAMEL.findall(run[0])
    if len(first) > 1 and (first[0].lower() in ("left", "right") or first[0] in ("L", "R", "l", "r")):
        yield _norm("".join(first[1:]) + "".join(run[1:])), _SIDES[first[0].lower()]
    if re.match(r"^[LR][a-z]", run[0]):  # "LsmileOpen": a side glued to a lower-case word
        yield _norm(run[0][1:] + "".join(run[1:])), _SIDES[run[0][0].lower()]


def _parse_name(name: str) -> tuple[str, str | None, list[str]] | None:
    segs = [s for s in re.split(r"[\s_\-.:|]+", name) if s]
    side = None
    kept = []
    for s in segs:
        if s.lower() in _SIDES:
            if side not in (None, _SIDES[s.lower()]):
                return None  # both sides named: not one half
            side = _SIDES[s.lower()]
        else:
            kept.append(s)
    best = None
    for i in range(len(kept)):
        for j in range(i + 1, len(kept) + 1):
            for text, run_side in _run_variants(kept[i:j]):
                found = _concept(text) if text else None
                if found is None or (side and run_side and side != run_side):
                    continue
                if text in _WHOLE_ONLY and j - i < len(kept):
                    continue  # "Eye_Open_L" is not an open mouth
                score = (j - i, len(text), -i)
                if best is None or score > best[0]:
                    concept, family, implied = found
                    tags = [family] + (["namespaced"] if j - i < len(kept) else [])
                    best = (score, concept, side or run_side or implied, tags)
                break  # the plainest reading of this run is enough
    if best is None:
        return None
    return best[1], best[2], best[3]


def parse_key(name: str) -> tuple[str, str | None, list[str]] | None:
    """A shape key name -> (concept, side "l"/"r" or None, family tags) or None when it names none
    of our concepts. ``AK_44_MouthSmileLeft`` -> ``("mouthsmile", "l", ["arkit_numbered", ...])``."""
    text = unicodedata.normalize("NFKC", str(name)).strip()
    text = re.sub(r"\.\d{3}$", "", text)
    parts = [p for p in re.split(r"[.:|]", text) if p]
    if len(parts) > 1 and parts[-1].strip().lower() in _SIDES:
        parts[-2:] = [parts[-2] + "_" + parts[-1]]
    if not parts:
        return None
    if len(parts) > 1:
        found = _parse_name(parts[-1])
        if found is not None:
            concept, side, tags = found
            return concept, side, tags + ([] if "namespaced" in tags else ["namespaced"])
    return _parse_name("_".join(parts))


def _mesh_concepts(keys: list[str]) -> dict[str, dict]:
    """{concept: {side or None: (key, tags)}} of one mesh; the first key of a (concept, side) wins."""
    out: dict[str, dict] = {}
    for key in keys:
        parsed = parse_key(key)
        if parsed is None:
            continue
        concept, side, tags = parsed
        out.setdefault(concept, {}).setdefault(side, (key, tags))
    return out


def _bind(found: dict, concept: str, weight: float) -> tuple[list[list], list[str]] | None:
    """Binds of one concept on one mesh: its side-less key, or both halves; None without."""
    sides = found.get(concept) or {}
    if None in sides:
        key, tags = sides[None]
        return [[key, weight]], tags
    if "l" in sides and "r" in sides:
        return [[sides["l"][0], weight], [sides["r"][0], weight]], sides["l"][1] + sides["r"][1] + ["halves"]
    return None


def map_expressions(shape_keys: dict[str, list[str]], vrm_groups: list[dict] | None = None, *,
                    with_families: bool = False):
    """``shape_keys``: {mesh object name: [key names]}; ``vrm_groups``: [{"preset", "binds": [{"mesh",
    "key", "weight"}]}] from the VRM JSON (mesh = glTF mesh name). Returns {expression: [[mesh, key,
    weight], ...]} with ``neutral`` always present (empty); with ``with_families`` also
    {expression: sorted family tags}."""
    out: dict[str, list[list]] = {"neutral": []}
    families: dict[str, list[str]] = {}
    for group in vrm_groups or ():
        expr = _VRM_PRESETS.get(str(group.get("preset", "")).lower())
        if expr is None or expr in out:
            continue
        binds = []
        for b in group.get("binds") or ():
            for mesh, keys in shape_keys.items():
                if b.get("key") in keys and (b.get("mesh") in (None, mesh) or mesh.startswith(str(b.get("mesh")))):
                    binds.append([mesh, b["key"], float(b.get("weight", 1.0))])
        if binds:
            out[expr] = binds
            families[expr] = ["vrm_preset"]
    meshes = {mesh: _mesh_concepts(list(keys)) for mesh, keys in shape_keys.items()}
    for expr in EXPRESSIONS[1:]:
        if expr in out:
            continue
        for alt in _RULES[expr]:
            binds, tags = [], set()
            for mesh, found in meshes.items():
                parts = [_bind(found, concept, w) for concept, w in alt]
                if all(p is not None for p in parts):
                    for pairs, t in parts:
                        binds += [[mesh, key, w] for key, w in pairs]
                        tags.update(t)
            if binds:
                out[expr] = binds
                families[expr] = sorted(tags)
                break
    return (out, families) if with_families else out

"""Map a character's shape keys / morph targets to our expression set. Blender-free.

Our set: ``neutral`` (every key 0), ``smile``, ``open_mouth``, ``angry``, ``surprised``, ``sad``,
``blink``. Recognised naming schemes (case, separators and mesh prefixes ignored):

* plain names: Smile, Happy, Joy, Angry, Mad, Surprised, Surprise, Sad, Blink, MouthOpen, Open ...
* ARKit blendshapes: mouthSmileLeft/Right, jawOpen, browDownLeft/Right (+ mouthFrown for angry),
  eyeWideLeft/Right + browInnerUp (surprised), mouthFrownLeft/Right + browInnerUp (sad),
  eyeBlinkLeft/Right;
* VRM presets (0.x ``joy/angry/sorrow/fun/surprised/blink/a``, 1.0 ``happy/angry/sad/relaxed/
  surprised/blink/aa``) through the file's blend-shape groups, and VRoid key names
  (``Fcl_ALL_Joy``, ``Fcl_MTH_A``, ``Fcl_EYE_Close`` ...);
* FACS action units (AU12 smile, AU26/AU27 jaw drop, AU4 angry, AU1+AU2+AU5 surprise, AU15 sad, AU45
  blink) and visemes (``viseme_aa``, ``vrc.v_aa``, ``A``/``aa``) for the open mouth.

``map_expressions(shape_keys, vrm_groups) -> {expression: [[mesh, key, weight], ...]}`` lists
``neutral`` always (empty binding) and each other expression the character can make.
"""

from __future__ import annotations

import re

__all__ = ["EXPRESSIONS", "map_expressions"]

EXPRESSIONS = ("neutral", "smile", "open_mouth", "angry", "surprised", "sad", "blink")

# expression -> list of alternatives; each alternative is a list of (normalised key, weight) that must
# all exist (on the same mesh) for the alternative to apply. First matching alternative wins.
_RULES: dict[str, list[list[tuple[str, float]]]] = {
    "smile": [
        [("mouthsmileleft", 1.0), ("mouthsmileright", 1.0)], [("mouthsmile", 1.0)],
        [("fclalljoy", 1.0)], [("fclmthjoy", 1.0)], [("smile", 1.0)], [("happy", 1.0)], [("joy", 1.0)],
        [("au12", 1.0)], [("smileleft", 1.0), ("smileright", 1.0)], [("fclallfun", 1.0)], [("fun", 1.0)],
    ],
    "open_mouth": [
        [("jawopen", 1.0)], [("mouthopen", 1.0)], [("openmouth", 1.0)], [("fclmtha", 1.0)],
        [("visemeaa", 1.0)], [("vrcvaa", 1.0)], [("aa", 1.0)], [("a", 1.0)], [("au26", 1.0)], [("au27", 1.0)],
        [("open", 1.0)],
    ],
    "angry": [
        [("browdownleft", 1.0), ("browdownright", 1.0), ("mouthfrownleft", 0.5), ("mouthfrownright", 0.5)],
        [("browdownleft", 1.0), ("browdownright", 1.0)], [("fclallangry", 1.0)], [("angry", 1.0)],
        [("anger", 1.0)], [("mad", 1.0)], [("au4", 1.0)],
    ],
    "surprised": [
        [("eyewideleft", 1.0), ("eyewideright", 1.0), ("browinnerup", 1.0), ("jawopen", 0.4)],
        [("fclallsurprised", 1.0)], [("surprised", 1.0)], [("surprise", 1.0)], [("shocked", 1.0)],
        [("au1", 1.0), ("au2", 1.0), ("au5", 1.0)],
    ],
    "sad": [
        [("mouthfrownleft", 1.0), ("mouthfrownright", 1.0), ("browinnerup", 1.0)],
        [("fclallsorrow", 1.0)], [("sad", 1.0)], [("sorrow", 1.0)], [("au15", 1.0)],
    ],
    "blink": [
        [("eyeblinkleft", 1.0), ("eyeblinkright", 1.0)], [("fcleyeclose", 1.0)], [("blink", 1.0)],
        [("eyesclosed", 1.0)], [("eyeclose", 1.0)], [("au45", 1.0)],
        [("blinkleft", 1.0), ("blinkright", 1.0)],
    ],
}
# VRM preset names (0.x and 1.0) -> our expression.
_VRM_PRESETS = {
    "joy": "smile", "happy": "smile", "angry": "angry", "sorrow": "sad", "sad": "sad",
    "surprised": "surprised", "blink": "blink", "a": "open_mouth", "aa": "open_mouth",
}


def _normalise_key(name: str) -> str:
    """Lower-case alphanumerics, without a namespace (``blendShape1.``, ``Face:``) or a
    ``shapes_``/``morph_`` prefix: ``blendShape1.mouthSmileLeft`` -> ``mouthsmileleft``."""
    n = re.split(r"[.:|]", name)[-1] if re.search(r"[.:|]", name) and not name.startswith("vrc.") else name
    n = re.sub(r"[^a-z0-9]", "", n.lower())
    for pre in ("blendshape", "shapes", "shape", "morph", "bs"):
        if n.startswith(pre) and len(n) > len(pre) + 1 and not n[len(pre)].isdigit():
            n = n[len(pre):]
            break
    return n


def map_expressions(shape_keys: dict[str, list[str]], vrm_groups: list[dict] | None = None) -> dict:
    """``shape_keys``: {mesh object name: [key names]}; ``vrm_groups``: [{"preset", "binds": [{"mesh",
    "key", "weight"}]}] from the VRM JSON (mesh = glTF mesh name). Returns {expression: [[mesh, key,
    weight], ...]} with ``neutral`` always present (empty)."""
    out: dict[str, list[list]] = {"neutral": []}
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
    norm = {mesh: {_normalise_key(k): k for k in keys} for mesh, keys in shape_keys.items()}
    for expr in EXPRESSIONS[1:]:
        if expr in out:
            continue
        for alt in _RULES[expr]:
            binds = []
            for mesh, keys in norm.items():
                if all(k in keys for k, _w in alt):
                    binds += [[mesh, keys[k], w] for k, w in alt]
            if binds:
                out[expr] = binds
                break
    return out

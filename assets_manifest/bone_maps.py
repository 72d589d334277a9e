"""Map a foreign armature onto the canonical skeleton (``skeleton.JOINT_NAMES``). Blender-free.

Input: the armature's bones at rest, in a Z-up frame (any unit, any facing), as a list of
:class:`Bone` (or dicts with the same keys). Output: a :class:`MappingResult` with the bone map
(canonical joint -> bone name), whether the rig is accepted as a humanoid and why not, the yaw that
turns the character to face -Y, and rig repairs the loader must make.

Three sources, tried in this order (see ``docs/real_assets.md``):

1. A VRM humanoid table (``extensions.VRM.humanoid`` / ``VRMC_vrm.humanoid``), when the file has one.
2. Bone names. Names are split into tokens (``mixamorig:LeftUpLeg`` -> left + up leg,
   ``Bip01 L UpperArm`` -> L + upper arm, ``upperarm.l``, ``UpperArmL``, ``DEF-forearm.L``,
   ``J_Bip_L_Hand``, ``lShldr``, ``LHipJoint`` ...); the side is read from the tokens and the
   remaining stem gives a role within the arm or leg family. Ambiguous words are resolved by the
   hierarchy (Mixamo/CMU ``LeftLeg`` is the shin because ``LeftUpLeg`` is above it; VRoid/Cryptovoxels
   ``Left leg`` is the thigh because ``Left knee`` is below it), and limbs named only generically
   (``arm_joint_L_1..3``) are split by geometry.
3. A geometric matcher on hierarchy alone, for unknown names: the feet are the lowest leaves on
   either side, the hands the most lateral ones, the chest the branch point of the arms, the pelvis
   the branch point of the legs and the spine, the head the top of the chain above the chest.

The torso is always completed from the structure: chest = the bone both arms hang from, pelvis =
the lowest common ancestor of both thighs and the chest, spine = the first bone above the pelvis on
the way to the chest, neck = the first bone above the chest on the way to the head.

Acceptance (``MIN_JOINTS``): pelvis, head, and on both sides upper arm, forearm, hand, thigh, shin,
foot, all mapped to distinct bones in a plausible humanoid layout (legs below the pelvis and
descending, head above the chest, wrists above half the hip height, left and right on opposite
sides). Spine, chest, neck, clavicles, toes and fingers are optional: a rig without them is posed
with those canonical rotations folded into the nearest mapped ancestor.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from .skeleton import JOINT_NAMES

__all__ = [
    "MIN_JOINTS",
    "Bone",
    "MappingResult",
    "split_name",
    "map_skeleton",
    "facing_yaw_degrees",
    "effective_tails",
]

_SIDES = ("l", "r")
MIN_JOINTS: list[str] = ["pelvis", "head"] + [
    f"{s}_{p}" for s in _SIDES for p in ("upper_arm", "lower_arm", "hand", "upper_leg", "lower_leg", "foot")
]

_FINGERS = ("thumb", "index", "middle", "ring", "pinky")


@dataclass
class Bone:
    """One bone at rest: ``head``/``tail`` (3,) in a Z-up frame; ``parent`` a bone name or None."""

    name: str
    parent: str | None
    head: tuple[float, float, float]
    tail: tuple[float, float, float]
    deform: bool = True

    @classmethod
    def coerce(cls, b) -> "Bone":
        if isinstance(b, Bone):
            return b
        return cls(str(b["name"]), b.get("parent"), tuple(map(float, b["head"])), tuple(map(float, b["tail"])),
                   bool(b.get("deform", True)))


@dataclass
class MappingResult:
    """What :func:`map_skeleton` found.

    ``bone_map``: canonical joint -> bone name (distinct bones; absent joints are simply missing).
    ``accepted``: every joint of ``MIN_JOINTS`` mapped and the layout plausible; otherwise
    ``reason`` is ``"not_humanoid"`` and ``detail`` says what is wrong.
    ``yaw_deg``: rotation about +Z (degrees) that turns the character to face -Y (its left to +X).
    ``repairs``: {"reparent": {bone: new parent}} for IK-style rigs whose foot/hand bones do not
    hang from the shin/forearm (Quaternius), applied by the loader before posing.
    """

    bone_map: dict[str, str]
    accepted: bool
    reason: str | None
    detail: str
    method: str
    yaw_deg: float = 0.0
    repairs: dict = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"bone_map": dict(self.bone_map), "accepted": self.accepted, "reason": self.reason,
                "detail": self.detail, "method": self.method, "yaw_deg": self.yaw_deg,
                "repairs": self.repairs, "missing": list(self.missing)}


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------

# Tokens that carry no meaning for the role (rig prefixes, "joint", "bone" ...).
_NOISE = {"bip", "def", "org", "j", "jnt", "joint", "bone", "bn", "b", "skeleton", "cc", "base", "mixamorig",
          "rig", "armature", "c", "g", "sk", "bind", "deform", "ctrl_def", "valvebiped", "npc"}
# Any of these tokens marks a bone that is never mapped (leaf markers, IK/control, helpers, face, cloth).
_IGNORE = {"end", "nub", "tip", "top", "site", "pole", "target", "ik", "ctrl", "ctl", "mch", "twist", "roll",
           "helper", "socket", "slot", "handslot", "weapon", "prop", "attach", "jaw", "tongue", "eye", "eyes",
           "teeth", "lip", "lips", "brow", "ear", "breast", "bust", "hair", "skirt", "cape", "tail", "metacarpal",
           "metatarsal", "temporalis", "risorius", "oris", "levator", "oculi", "orbicularis", "special", "cheek",
           "nose", "sec", "adj", "face", "hat", "helmet", "sword", "shield", "ponytail", "cloth", "dress",
           "coat", "bag", "correct", "corrective", "jiggle", "dummy", "null", "ground", "locator", "offset"}

_SIDED_ROLES = {
    # arm family
    "clavicle": "clavicle", "collar": "clavicle", "shoulder": "clavicle", "collarbone": "clavicle",
    "upperarm": "upper_arm", "uparm": "upper_arm", "shldr": "upper_arm", "humerus": "upper_arm",
    "arm": "arm?",
    "forearm": "lower_arm", "lowerarm": "lower_arm", "loarm": "lower_arm", "elbow": "lower_arm",
    "lowarm": "lower_arm", "forarm": "lower_arm", "ulna": "lower_arm",
    "hand": "hand", "wrist": "hand", "palm": "hand",
    # leg family
    "upperleg": "upper_leg", "upleg": "upper_leg", "thigh": "upper_leg", "femur": "upper_leg",
    "leg": "leg?", "hip": "hip?", "pelvis": "hip?", "hipjoint": "hip?",
    "lowerleg": "lower_leg", "loleg": "lower_leg", "knee": "lower_leg", "shin": "lower_leg",
    "calf": "lower_leg", "crus": "lower_leg", "lowleg": "lower_leg", "tibia": "lower_leg",
    "foot": "foot", "ankle": "foot",
    "toe": "toe", "toes": "toe", "ball": "toe", "toebase": "toe",
}
_FINGER_STEMS = {
    "thumb": "thumb", "index": "index", "middle": "middle", "ring": "ring", "pinky": "pinky",
    "little": "pinky", "pinkie": "pinky",
}
_ARM_ROLES = {"clavicle", "upper_arm", "arm?", "lower_arm", "hand"}
_LEG_ROLES = {"upper_leg", "leg?", "hip?", "lower_leg", "foot", "toe"}


def _tokens(name: str) -> list[str]:
    n = name.split(":")[-1].split("|")[-1]
    n = re.sub(r"([a-z])([A-Z])", r"\1_\2", n)
    n = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", n)
    n = re.sub(r"([A-Za-z])(\d)", r"\1_\2", n)
    n = re.sub(r"(\d)([A-Za-z])", r"\1_\2", n)
    return [t for t in re.split(r"[^A-Za-z0-9]+", n.lower()) if t]


@dataclass(frozen=True)
class NameInfo:
    """A bone name read as ``side`` ("l", "r" or None), ``stem`` (joined role tokens), ``numbers``."""

    side: str | None
    stem: str
    numbers: tuple[str, ...]
    ignored: bool


def split_name(name: str) -> NameInfo:
    """Read a bone name: side, role stem and numbers; ``ignored`` for helper/leaf/IK/face bones."""
    raw = name.split(":")[-1].split("|")[-1]
    toks = _tokens(name)
    # 3ds Max Biped's root name carries a number (Bip01, Bip001) that is not part of the bone's own.
    toks = [t for k, t in enumerate(toks) if not (t.isdigit() and k > 0 and toks[k - 1] == "bip")]
    ignored = raw.startswith("__") or any(t in _IGNORE for t in toks)
    sides = {("l" if t in ("l", "left") else "r") for t in toks if t in ("l", "r", "left", "right")}
    side = sides.pop() if len(sides) == 1 else None
    rest = [t for t in toks if t not in ("l", "r", "left", "right") and t not in _NOISE]
    numbers = tuple(t for t in rest if t.isdigit())
    stem = "".join(t for t in rest if not t.isdigit())
    return NameInfo(side, stem, numbers, ignored)


def _finger_of(info: NameInfo) -> tuple[str, int | None] | None:
    """(finger, explicit segment or None) for finger bone names, else None."""
    stem = info.stem
    for prefix in ("hand", "finger"):
        if stem.startswith(prefix) and stem[len(prefix):] in _FINGER_STEMS:
            stem = stem[len(prefix):]
    for suffix in ("finger",):
        if stem.endswith(suffix) and stem[: -len(suffix)] in _FINGER_STEMS:
            stem = stem[: -len(suffix)]
    if stem in _FINGER_STEMS:
        return _FINGER_STEMS[stem], None
    if stem in ("finger", "fingers") and info.numbers:
        digits = info.numbers[-1]
        if len(digits) >= 2 and len(digits) <= 3 and digits[0] in "01234" and "-" not in digits:
            # 3ds Max Biped: Finger0 (thumb 1), Finger01 (thumb 2), Finger1 (index 1), Finger12 ...
            return _FINGERS[int(digits[0])], int(digits[1]) + 1
        if len(info.numbers) >= 2:  # MakeHuman: finger1-1 (thumb) .. finger5-3 (little)
            k = int(info.numbers[-2])
            if 1 <= k <= 5:
                return _FINGERS[k - 1], int(info.numbers[-1])
        if len(digits) == 1 and digits in "01234":
            return _FINGERS[int(digits)], 1
    return None


# ---------------------------------------------------------------------------------------------
# Tree helpers
# ---------------------------------------------------------------------------------------------


class _Tree:
    def __init__(self, bones: list[Bone]):
        self.bones = {b.name: b for b in bones}
        self.order = [b.name for b in bones]
        self.parent = {b.name: (b.parent if b.parent in self.bones else None) for b in bones}
        self.children: dict[str, list[str]] = {n: [] for n in self.order}
        for n in self.order:
            p = self.parent[n]
            if p is not None:
                self.children[p].append(n)
        self.depth: dict[str, int] = {}
        for n in self.order:
            d, p = 0, self.parent[n]
            while p is not None:
                d, p = d + 1, self.parent[p]
            self.depth[n] = d
        self.head = {n: np.asarray(self.bones[n].head, dtype=np.float64) for n in self.order}
        self.tail = {n: np.asarray(self.bones[n].tail, dtype=np.float64) for n in self.order}

    def ancestors(self, n: str) -> list[str]:
        out, p = [], self.parent[n]
        while p is not None:
            out.append(p)
            p = self.parent[p]
        return out

    def is_ancestor(self, a: str, n: str) -> bool:
        return a in self.ancestors(n)

    def lca(self, names: Iterable[str]) -> str | None:
        names = list(names)
        if not names:
            return None
        common = None
        for n in names:
            chain = [n] + self.ancestors(n)
            common = chain if common is None else [c for c in chain if c in set(common)]
        return common[0] if common else None

    def path(self, top: str, bottom: str) -> list[str]:
        """Bones from ``top`` (exclusive) down to ``bottom`` (inclusive); [] if not a descendant."""
        chain = [bottom] + self.ancestors(bottom)
        if top not in chain:
            return []
        return list(reversed(chain[: chain.index(top)]))

    def leaves(self) -> list[str]:
        return [n for n in self.order if not self.children[n]]

    def descendants(self, n: str) -> list[str]:
        out, stack = [], list(self.children[n])
        while stack:
            c = stack.pop()
            out.append(c)
            stack.extend(self.children[c])
        return out


def effective_tails(bones: list[Bone]) -> dict[str, np.ndarray]:
    """Each bone's end point: the head of its only child, else the mean of its children's heads when
    they are spread along it, else its own tail. Importers' tails are often arbitrary (glTF has no
    tails), child heads are not."""
    tree = _Tree([Bone.coerce(b) for b in bones])
    out = {}
    for n in tree.order:
        kids = [c for c in tree.children[n] if np.linalg.norm(tree.head[c] - tree.head[n]) > 1e-6]
        if len(kids) == 1:
            out[n] = tree.head[kids[0]]
        elif kids:
            # Several children (e.g. a hand with fingers): the farthest one along the bone's tail.
            d = tree.tail[n] - tree.head[n]
            far = max(kids, key=lambda c: float(np.dot(tree.head[c] - tree.head[n], d)) if np.linalg.norm(d) > 0
                      else float(np.linalg.norm(tree.head[c] - tree.head[n])))
            out[n] = tree.head[far]
        else:
            out[n] = tree.tail[n]
    return out


# ---------------------------------------------------------------------------------------------
# VRM humanoid
# ---------------------------------------------------------------------------------------------

_VRM_CENTRAL = {"hips": "pelvis", "spine": "spine", "chest": "chest", "upperChest": "chest?", "neck": "neck",
                "head": "head"}
_VRM_LIMB = {"Shoulder": "clavicle", "UpperArm": "upper_arm", "LowerArm": "lower_arm", "Hand": "hand",
             "UpperLeg": "upper_leg", "LowerLeg": "lower_leg", "Foot": "foot", "Toes": "toe"}
_VRM_FINGER = {"Thumb": "thumb", "Index": "index", "Middle": "middle", "Ring": "ring", "Little": "pinky"}
_VRM_SEG0 = {"Proximal": 1, "Intermediate": 2, "Distal": 3}  # VRM 0.x
_VRM_SEG1_THUMB = {"Metacarpal": 1, "Proximal": 2, "Distal": 3}  # VRM 1.0 thumbs


def _vrm_humanoid_to_canonical(human_bones: dict[str, str], vrm1: bool = False) -> dict[str, str]:
    """VRM humanoid bone types -> bone names (as given) into canonical joint -> bone name."""
    out: dict[str, str] = {}
    upper_chest = None
    for kind, bone in human_bones.items():
        if kind in _VRM_CENTRAL:
            role = _VRM_CENTRAL[kind]
            if role == "chest?":
                upper_chest = bone
            else:
                out[role] = bone
            continue
        for side_word, side in (("left", "l"), ("right", "r")):
            if not kind.startswith(side_word):
                continue
            part = kind[len(side_word):]
            if part in _VRM_LIMB:
                out[f"{side}_{_VRM_LIMB[part]}"] = bone
            for fw, finger in _VRM_FINGER.items():
                if part.startswith(fw):
                    seg_word = part[len(fw):]
                    table = _VRM_SEG1_THUMB if (vrm1 and finger == "thumb") else _VRM_SEG0
                    if seg_word in table:
                        out[f"{side}_{finger}{table[seg_word]}"] = bone
    if upper_chest is not None:  # arms hang from the upper chest: it plays our chest
        out["chest"] = upper_chest
    return out


# ---------------------------------------------------------------------------------------------
# Mapping
# ---------------------------------------------------------------------------------------------


def _seglen(tree: _Tree, ends: dict[str, np.ndarray], n: str) -> float:
    return float(np.linalg.norm(ends[n] - tree.head[n]))


def _assign_limb_chain(tree: _Tree, ends, chain: list[str], limb: str, midline_x: float) -> dict[str, str]:
    """Split an ordered chain of bones (torso outwards) into limb roles by geometry."""
    if not chain:
        return {}
    chain = [n for n in chain if _seglen(tree, ends, n) > 1e-9 or n == chain[-1]]
    roles: dict[str, str] = {}
    lens = [_seglen(tree, ends, n) for n in chain]
    if limb == "arm":
        if (len(chain) >= 4 and lens[0] < 0.75 * lens[1]
                and abs(tree.head[chain[0]][0] - midline_x) < 0.5 * abs(tree.head[chain[1]][0] - midline_x)):
            roles["clavicle"] = chain[0]
            chain, lens = chain[1:], lens[1:]
        names = ("upper_arm", "lower_arm", "hand")
        fractions = (0.0, 0.39, 0.75)  # canonical shoulder -> elbow -> wrist along shoulder -> fingertip
    else:
        if len(chain) >= 4 and lens[0] < 0.4 * lens[1]:
            chain, lens = chain[1:], lens[1:]  # hip connector (CMU LHipJoint, MakeHuman pelvis.L)
        names = ("upper_leg", "lower_leg", "foot", "toe")
        fractions = (0.0, 0.42, 0.83, 0.97)
    if len(chain) <= len(names):
        return dict(roles, **{names[i]: chain[i] for i in range(len(chain))})
    # More bones than roles (split/twist segments): place each joint by arc length.
    arc = np.concatenate([[0.0], np.cumsum(lens)])
    total = arc[-1] if arc[-1] > 0 else 1.0
    roles[names[0]] = chain[0]
    last = 0
    for role, frac in zip(names[1:], fractions[1:]):
        cand = range(last + 1, len(chain))
        if not cand:
            break
        k = min(cand, key=lambda i: abs(arc[i] / total - frac))
        roles[role] = chain[k]
        last = k
    return roles


def _resolve_names(tree: _Tree, infos: dict[str, NameInfo], ends) -> dict[str, str]:
    """Name-based limb/finger/head roles. Returns a partial canonical map."""
    usable = [n for n in tree.order if not infos[n].ignored]
    if any(n.startswith("DEF-") for n in usable):  # Rigify: only the deform chain
        usable = [n for n in usable if n.startswith("DEF-")]
    out: dict[str, str] = {}
    heads = [n for n in usable if infos[n].side is None and infos[n].stem == "head"]
    if heads:
        out["head"] = min(heads, key=lambda n: tree.depth[n])
    xs = [tree.head[n][0] for n in usable] or [0.0]
    midline_x = float(np.median(xs))

    def by_depth(names):
        return sorted(names, key=lambda n: (tree.depth[n], n))

    for side in _SIDES:
        cands: dict[str, list[str]] = {}
        fingers: dict[str, list[tuple[int | None, str]]] = {}
        for n in usable:
            info = infos[n]
            if info.side != side:
                continue
            f = _finger_of(info)
            if f is not None:
                fingers.setdefault(f[0], []).append((f[1], n))
                continue
            role = _SIDED_ROLES.get(info.stem)
            if role:
                cands.setdefault(role, []).append(n)
        for role in cands:
            cands[role] = by_depth(cands[role])
        for limb, family in (("arm", _ARM_ROLES), ("leg", _LEG_ROLES)):
            roles: dict[str, str] = {}
            if limb == "arm":
                up = cands.get("upper_arm", [None])[0]
                low_all = cands.get("lower_arm", [])
                amb = cands.get("arm?", [])
                if up is None and amb:
                    if low_all:
                        anc = [a for a in amb if any(tree.is_ancestor(a, lo) for lo in low_all)]
                        up = anc[-1] if anc else None
                    elif len(amb) == 1:
                        up = amb[0]
                if up is not None:
                    roles["upper_arm"] = up
                    low = [lo for lo in low_all if tree.is_ancestor(up, lo)]
                    if low:
                        roles["lower_arm"] = low[0]
                    clav = [c for c in cands.get("clavicle", []) if tree.is_ancestor(c, up)]
                    if clav:
                        roles["clavicle"] = clav[0]
                hands = cands.get("hand", [])
                anchor = roles.get("lower_arm") or roles.get("upper_arm")
                hands = [h for h in hands if anchor is None or tree.is_ancestor(anchor, h)] or hands
                if hands:
                    roles["hand"] = hands[0]
                generic = amb if not ("upper_arm" in roles and "lower_arm" in roles) else []
            else:
                up = cands.get("upper_leg", [None])[0]
                low_all = cands.get("lower_leg", [])
                amb = cands.get("leg?", [])
                hip = cands.get("hip?", [])
                if up is None:
                    for pool in (amb, hip):
                        if low_all:
                            anc = [a for a in pool if any(tree.is_ancestor(a, lo) for lo in low_all)]
                            if anc:
                                up = anc[-1]
                                break
                    if up is None and len(amb) == 1:
                        up = amb[0]
                if up is not None:
                    roles["upper_leg"] = up
                    low = [lo for lo in low_all if tree.is_ancestor(up, lo)]
                    if not low:
                        low = [a for a in amb if tree.is_ancestor(up, a)]
                    if low:
                        roles["lower_leg"] = low[0]
                feet = cands.get("foot", [])
                if feet:
                    roles["foot"] = feet[0]
                toes = [t for t in cands.get("toe", []) if "foot" in roles and tree.is_ancestor(roles["foot"], t)]
                if toes:
                    roles["toe"] = toes[0]
                generic = amb if not ("upper_leg" in roles and "lower_leg" in roles) else []
            # Generic names only (``arm_joint_L_1..3``): split the chain by geometry.
            if len(generic) >= 2:
                chain_bones = by_depth(set(generic) | {v for v in roles.values()})
                top, bottom = chain_bones[0], chain_bones[-1]
                chain = [top] + tree.path(top, bottom)
                if set(chain_bones) <= set(chain):
                    geo = _assign_limb_chain(tree, ends, chain, limb, midline_x)
                    for r, b in geo.items():
                        roles.setdefault(r, b)
            for r, b in roles.items():
                out[f"{side}_{r}"] = b
        hand = out.get(f"{side}_hand")
        for finger, items in fingers.items():
            if hand is None:
                break
            items = [(seg, n) for seg, n in items if tree.is_ancestor(hand, n)]
            if not items:
                continue
            if all(seg is not None for seg, _ in items):
                items.sort(key=lambda t: (t[0], tree.depth[t[1]]))
            else:
                items.sort(key=lambda t: (tree.depth[t[1]], t[1]))
            for k, (_, n) in enumerate(items[:3]):
                out[f"{side}_{finger}{k + 1}"] = n
    return out


def _heuristic(tree: _Tree, ends, usable: list[str]) -> dict[str, str]:
    """Geometry-only matcher: feet, hands and head from the leaves; torso and limbs from the tree."""
    leaves = [n for n in usable if not any(c in usable for c in tree.descendants(n))]
    if len(leaves) < 5:
        return {}
    allpts = np.array([tree.head[n] for n in usable] + [ends[n] for n in usable])
    zmin, zmax = float(allpts[:, 2].min()), float(allpts[:, 2].max())
    height = max(zmax - zmin, 1e-9)
    mid_x = float(np.median(allpts[:, 0]))
    endz = {n: float(min(ends[n][2], tree.head[n][2])) for n in leaves}
    low = [n for n in leaves if endz[n] < zmin + 0.15 * height]
    left_feet = [n for n in low if tree.head[n][0] > mid_x]
    right_feet = [n for n in low if tree.head[n][0] < mid_x]
    if not left_feet or not right_feet:
        return {}
    lf = min(left_feet, key=lambda n: endz[n])
    rf = min(right_feet, key=lambda n: endz[n])
    rest = [n for n in leaves if n not in (lf, rf) and tree.head[n][2] > zmin + 0.3 * height]
    if not rest:
        return {}
    lh = max([n for n in rest if ends[n][0] > mid_x] or [None], key=lambda n: -1e9 if n is None else ends[n][0])
    rh = min([n for n in rest if ends[n][0] < mid_x] or [None], key=lambda n: 1e9 if n is None else ends[n][0])
    if lh is None or rh is None:
        return {}
    chest = tree.lca([lh, rh])
    pelvis = tree.lca([lf, rf, chest]) if chest else None
    if chest is None or pelvis is None:
        return {}
    arm_sub = set()
    for h in (lh, rh):
        top = tree.path(chest, h)
        if top:
            arm_sub |= {top[0]} | set(tree.descendants(top[0]))
    up_leaves = [n for n in rest if n not in arm_sub and tree.is_ancestor(chest, n)]
    out: dict[str, str] = {"pelvis": pelvis, "chest": chest}
    if up_leaves:
        top_leaf = max(up_leaves, key=lambda n: ends[n][2])
        out["head"] = top_leaf
    for side, foot_leaf, hand_leaf in (("l", lf, lh), ("r", rf, rh)):
        leg = [n for n in tree.path(pelvis, foot_leaf) if n in usable]
        for r, b in _assign_limb_chain(tree, ends, leg, "leg", mid_x).items():
            out[f"{side}_{r}"] = b
        arm = [n for n in tree.path(chest, hand_leaf) if n in usable]
        # Fingers: cut the chain at the deepest bone that still holds three or more leaves.
        for k in range(len(arm) - 1, -1, -1):
            if sum(1 for d in tree.descendants(arm[k]) if d in leaves) >= 3:
                arm = arm[: k + 1]
                break
        for r, b in _assign_limb_chain(tree, ends, arm, "arm", mid_x).items():
            out[f"{side}_{r}"] = b
    # Toes pointing +Y mean the rig faces +Y: its left is then -X, so swap the sides.
    toe_dir = []
    for side in _SIDES:
        f = out.get(f"{side}_foot")
        if f:
            toe_dir.append(float(ends[f][1] - tree.head[f][1]))
    if toe_dir and np.mean(toe_dir) > 0:
        out = {_swap_side(k): v for k, v in out.items()}
    return out


def _swap_side(j: str) -> str:
    if j.startswith("l_"):
        return "r_" + j[2:]
    if j.startswith("r_"):
        return "l_" + j[2:]
    return j


def _complete_torso(tree: _Tree, m: dict[str, str], usable: set[str]) -> dict[str, str]:
    """Chest = branch point of the arms; pelvis = LCA of thighs and chest; spine/neck/head from the path."""
    m = dict(m)
    arm_roots = [m.get(f"{s}_clavicle") or m.get(f"{s}_upper_arm") for s in _SIDES]
    if all(arm_roots):
        chest = tree.lca(arm_roots)
        if chest is not None and chest not in arm_roots:
            m["chest"] = chest
    thighs = [m.get(f"{s}_upper_leg") for s in _SIDES]
    if all(thighs) and "chest" in m:
        pelvis = tree.lca(thighs + [m["chest"]])
        if pelvis is not None:
            m["pelvis"] = pelvis
    elif all(thighs) and "pelvis" not in m:
        m["pelvis"] = tree.lca(thighs)
    if "pelvis" in m and "chest" in m and m["pelvis"] == m["chest"]:
        del m["chest"]
    if "pelvis" in m and "chest" in m:
        between = [n for n in tree.path(m["pelvis"], m["chest"]) if n in usable]
        if len(between) >= 2:
            m["spine"] = between[0]
    top = m.get("chest") or m.get("pelvis")
    if top is not None:
        if "head" in m and not tree.is_ancestor(top, m["head"]):
            del m["head"]
        if "head" not in m:
            # The top of the central chain: follow the child that is neither arm nor leg, upwards.
            limb = {m.get(f"{s}_{p}") for s in _SIDES for p in ("clavicle", "upper_arm", "upper_leg")}
            cur, last = top, None
            while True:
                kids = [c for c in tree.children[cur] if c in usable and c not in limb
                        and tree.head[c][2] >= tree.head[top][2] - 1e-9]
                if not kids:
                    break
                cur = max(kids, key=lambda c: (len(tree.descendants(c)), tree.head[c][2]))
                last = cur
            if last is not None:
                m["head"] = last
        if "head" in m:
            between = [n for n in tree.path(top, m["head"]) if n in usable]
            if len(between) >= 2 and "chest" in m:
                m["neck"] = between[0]
    return m


def _plausibility(tree: _Tree, ends, m: dict[str, str]) -> str | None:
    """None if the mapped joints form a standing humanoid, else the problem in words."""
    missing = [j for j in MIN_JOINTS if j not in m]
    if missing:
        return "missing required joints: " + ", ".join(missing)
    used = [m[j] for j in MIN_JOINTS]
    if len(set(used)) != len(used):
        return "required joints share bones"
    h = {j: tree.head[m[j]] for j in m}
    feet_z = min(h["l_foot"][2], h["r_foot"][2], ends[m["l_foot"]][2], ends[m["r_foot"]][2])
    top = max(ends[m["head"]][2], h["head"][2])
    height = top - feet_z
    if height <= 0:
        return "head is not above the feet"
    for s in _SIDES:
        if not (h[f"{s}_upper_leg"][2] > h[f"{s}_lower_leg"][2] > h[f"{s}_foot"][2] - 0.02 * height):
            return f"{s} leg does not descend from hip to knee to ankle"
        for a, b in ((f"{s}_upper_arm", f"{s}_lower_arm"), (f"{s}_lower_arm", f"{s}_hand"),
                     (f"{s}_upper_leg", f"{s}_lower_leg"), (f"{s}_lower_leg", f"{s}_foot")):
            if not tree.is_ancestor(m[a], m[b]) and not (b.endswith("foot") or b.endswith("hand")):
                return f"{b} does not hang from {a}"
        if h[f"{s}_hand"][2] < feet_z + 0.5 * (h["pelvis"][2] - feet_z):
            return f"{s} hand is below half the hip height (not an arm)"
        if h[f"{s}_upper_arm"][2] <= h[f"{s}_upper_leg"][2]:
            return f"{s} shoulder is not above the hip"
    if h["head"][2] <= max(h["l_upper_arm"][2], h["r_upper_arm"][2]) - 0.05 * height:
        return "head is below the shoulders"
    pel = h["pelvis"][2] - feet_z
    if not (0.15 * height < pel < 0.8 * height):
        return f"pelvis at {pel / height:.2f} of the height"
    lr = (h["l_upper_leg"] + h["l_upper_arm"]) / 2 - (h["r_upper_leg"] + h["r_upper_arm"]) / 2
    if np.linalg.norm(lr[:2]) < 1e-6 * max(height, 1e-9):
        return "left and right limbs coincide"
    # Left limbs must lie on the same side of the body (the shoulders' and hips' left-right axes agree).
    la = h["l_upper_arm"] - h["r_upper_arm"]
    ll = h["l_upper_leg"] - h["r_upper_leg"]
    if float(np.dot(la[:2], ll[:2])) <= 0:
        return "left arm and left leg are on opposite sides"
    return None


def facing_yaw_degrees(heads: dict[str, np.ndarray]) -> float:
    """Yaw (degrees, about +Z) that turns the character's left (from mapped joint heads) to +X, so it
    faces -Y; snapped to the nearest multiple of 90 degrees within 15 degrees."""
    lr = np.zeros(3)
    for a, b in (("l_upper_arm", "r_upper_arm"), ("l_upper_leg", "r_upper_leg")):
        if a in heads and b in heads:
            lr += np.asarray(heads[a]) - np.asarray(heads[b])
    if np.linalg.norm(lr[:2]) < 1e-12:
        return 0.0
    yaw = -math.degrees(math.atan2(lr[1], lr[0]))
    snapped = 90.0 * round(yaw / 90.0)
    if abs(yaw - snapped) <= 15.0:
        yaw = snapped
    yaw = (yaw + 180.0) % 360.0 - 180.0
    return 180.0 if abs(yaw + 180.0) < 1e-9 else yaw


def _repairs(tree: _Tree, m: dict[str, str]) -> dict:
    rep = {}
    for s in _SIDES:
        for parent_joint, joint in ((f"{s}_lower_leg", f"{s}_foot"), (f"{s}_lower_arm", f"{s}_hand")):
            if parent_joint in m and joint in m and not tree.is_ancestor(m[parent_joint], m[joint]):
                rep[m[joint]] = m[parent_joint]
    return {"reparent": rep} if rep else {}


def map_skeleton(bones, vrm_humanoid: dict[str, str] | None = None, vrm1: bool = False) -> MappingResult:
    """Map ``bones`` (list of :class:`Bone` or dicts, rest pose, Z up) to the canonical skeleton."""
    blist = [Bone.coerce(b) for b in bones]
    if not blist:
        return MappingResult({}, False, "no_armature", "no bones", "none", missing=list(MIN_JOINTS))
    tree = _Tree(blist)
    ends = effective_tails(blist)
    infos = {n: split_name(n) for n in tree.order}
    usable = {n for n in tree.order if not infos[n].ignored}
    attempts: list[tuple[str, dict[str, str]]] = []
    if vrm_humanoid:
        vm = {j: b for j, b in _vrm_humanoid_to_canonical(vrm_humanoid, vrm1).items() if b in tree.bones}
        attempts.append(("vrm", vm))
    named = _resolve_names(tree, infos, ends)
    attempts.append(("names", _complete_torso(tree, named, usable)))
    heur = _heuristic(tree, ends, [n for n in tree.order if n in usable])
    if heur:
        attempts.append(("heuristic", _complete_torso(tree, heur, usable)))
    best = None
    for method, m in attempts:
        problem = _plausibility(tree, ends, m)
        if problem is None:
            best = (method, m, None)
            break
        if best is None:
            best = (method, m, problem)
    method, m, problem = best
    m = {j: b for j, b in m.items() if j in JOINT_NAMES}
    # Distinct bones only: a bone claimed twice keeps the joint nearest the root of the skeleton.
    seen: dict[str, str] = {}
    for j in JOINT_NAMES:
        b = m.get(j)
        if b is None:
            continue
        if b in seen:
            del m[j]
        else:
            seen[b] = j
    missing = [j for j in MIN_JOINTS if j not in m]
    heads = {j: tree.head[b] for j, b in m.items()}
    n_bones = len(blist)
    if problem is None:
        return MappingResult(m, True, None, f"{method}: {len(m)} joints mapped from {n_bones} bones", method,
                             yaw_deg=facing_yaw_degrees(heads), repairs=_repairs(tree, m), missing=missing)
    return MappingResult(m, False, "not_humanoid", f"{problem} ({n_bones} bones)", method,
                         yaw_deg=facing_yaw_degrees(heads), missing=missing)

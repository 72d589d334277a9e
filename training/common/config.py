"""One configuration system for both stages: YAML -> frozen, typed dataclasses.

A stage's config is a tree of frozen dataclasses (the sections) whose fields carry a type, a default and
the allowed values (:func:`setting`). Loading a config (:func:`load_config`):

1. read the YAML (a path, or the name of a packaged config: ``stage1``, ``stage1-tiny``, ``stage2``,
   ``stage2-tiny``);
2. translate old key names (configs written before config version 2, among them the ``config.yaml``
   inside older checkpoints and run folders) and say so in one line on stderr, naming old -> new; an
   old spelling that cannot be translated is a one-line error naming the renamed key;
3. apply ``--set a.b=value`` overrides (the value is parsed as YAML), each key checked against the schema;
4. build the dataclasses: an unknown key, a wrong type or a value outside its range is a one-line error,
   and an unknown key lists the valid keys of its section;
5. run the stage's cross-field checks (``check()`` of the top-level class).

Nothing here imports torch, so a bad config fails before any heavy import. Configs are immutable:
:func:`override` returns a new, re-validated config, and :func:`config_to_dict` gives the plain mapping
written beside every checkpoint (sizes as ``"WxH"``).
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, TypeVar

import yaml

from serialgen.errors import UserInputError
from serialgen.resolution import format_resolution, parse_resolution

__all__ = [
    "CONFIG_VERSION",
    "Renamed",
    "setting",
    "resolution_setting",
    "section",
    "packaged_config",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "override",
]

# 1: the first release (Stage I and Stage II spelled the same settings differently).
# 2: one spelling for both stages (see each stage's RENAMED table).
CONFIG_VERSION = 2

PACKAGED_DIR = Path(__file__).resolve().parents[1] / "configs"

C = TypeVar("C")


def setting(default: Any, *, choices: Iterable[Any] | None = None, min: float | None = None,
            max: float | None = None) -> Any:
    """A config field: its default and, optionally, the allowed values or an inclusive range."""
    meta = {"choices": tuple(choices) if choices is not None else None, "min": min, "max": max}
    return field(default=default, metadata=meta)


def resolution_setting(default: tuple[int, int]) -> Any:
    """A ``WIDTHxHEIGHT`` field (``512x768`` or ``[512, 768]`` in YAML; multiples of 8 for latent models)."""
    return field(default=tuple(default), metadata={"resolution": True})


def section(cls: type) -> Any:
    """A nested section, e.g. ``train: TrainConfig = section(TrainConfig)``."""
    return field(default_factory=cls)


@dataclass(frozen=True)
class Renamed:
    """An old spelling of one or more keys (dotted), and the new keys it becomes.

    ``convert(old_values, data)`` returns ``{new key: value}``; the default moves one value unchanged.
    ``hint`` is what to write instead, shown when the old spelling cannot be translated (a ``--set``
    of one half of a merged key).
    """

    old: tuple[str, ...]
    new: tuple[str, ...]
    convert: Callable[[tuple, dict], dict] | None = None
    hint: str = ""

    @property
    def plain(self) -> bool:
        return len(self.old) == 1 and len(self.new) == 1 and self.convert is None

    def describe(self) -> str:
        return f"{' + '.join(self.old)} -> {' + '.join(self.new)}"


def packaged_config(name: str) -> Path:
    """Path of a config shipped with the package (``stage1``, ``stage1-tiny``, ``stage2``, ``stage2-tiny``)."""
    return PACKAGED_DIR / f"{name}.yaml"


def _resolve_config_path(value: str | Path) -> Path:
    """A YAML path, or the name of a packaged config."""
    path = Path(value)
    if path.is_file():
        return path
    if not path.suffix and packaged_config(str(value)).is_file():
        return packaged_config(str(value))
    names = ", ".join(sorted(p.stem for p in PACKAGED_DIR.glob("*.yaml")))
    raise UserInputError(f"--config: {value} not found (a YAML file, or a packaged name: {names})")


# ------------------------------------------------------------------------------------------ schema walking

def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


def _section_class(f: dataclasses.Field) -> type | None:
    if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
        return f.default_factory  # type: ignore[return-value]
    return None


def _valid_keys(cls: type, where: str) -> str:
    label = f"valid keys of {where}" if where else "valid top-level keys"
    return f"{label}: {', '.join(_fields(cls))}"


def _schema_node(cls: type, dotted: str) -> tuple[type, dataclasses.Field] | None:
    """(section class holding the key, its field) for a dotted key, or None if the key is unknown."""
    parts = dotted.split(".")
    node = cls
    for i, part in enumerate(parts):
        fields = _fields(node)
        if part not in fields:
            return None
        if i == len(parts) - 1:
            return node, fields[part]
        sub = _section_class(fields[part])
        if sub is None:
            return None
        node = sub
    return None


def _unknown_key_error(cls: type, dotted: str, source: str) -> UserInputError:
    parts = dotted.split(".")
    node, where = cls, ""
    for part in parts:
        fields = _fields(node)
        if part not in fields:
            key = f"{where}.{part}" if where else part
            return UserInputError(f"{source}: unknown key {key} ({_valid_keys(node, where)})")
        sub = _section_class(fields[part])
        if sub is None:
            break
        node, where = sub, f"{where}.{part}" if where else part
    return UserInputError(f"{source}: {dotted} is not a section ({_valid_keys(node, where)})")


# ------------------------------------------------------------------------------------------ values

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, f: dataclasses.Field, key: str, source: str) -> Any:
    if f.metadata.get("resolution"):
        return parse_resolution(value, f"{source}: {key}", multiple_of=8)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], f, key, source)
    if value is None:
        raise UserInputError(f"{source}: {key} must not be empty")
    if tp is bool:
        if not isinstance(value, bool):
            raise UserInputError(f"{source}: {key} must be true or false, got {value!r}")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserInputError(f"{source}: {key} must be an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserInputError(f"{source}: {key} must be a number, got {value!r}")
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise UserInputError(f"{source}: {key} must be a string, got {value!r}")
    elif origin is tuple:
        item = args[0]
        if isinstance(value, str) and item is str:
            value = [value]  # one path where a list of paths is expected
        if not isinstance(value, (list, tuple)) or not all(
                isinstance(v, item) and not (item is int and isinstance(v, bool)) for v in value):
            raise UserInputError(f"{source}: {key} must be a list of {_type_name(item)}s, got {value!r}")
        value = tuple(value)
    else:  # pragma: no cover - a schema error, not a user error
        raise TypeError(f"unsupported config type {tp!r} for {key}")
    choices, lo, hi = f.metadata.get("choices"), f.metadata.get("min"), f.metadata.get("max")
    if choices and value not in choices:
        raise UserInputError(f"{source}: {key} must be one of {', '.join(map(str, choices))}, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"in [{lo}, {hi}]"
        raise UserInputError(f"{source}: {key} must be {bounds}, got {value!r}")
    return value


def _build(cls: type[C], data: Any, where: str, source: str) -> C:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise UserInputError(f"{source}: {where or 'the top level'} must be a mapping, got {type(data).__name__}")
    fields, hints = _fields(cls), _hints(cls)
    for name in data:
        if name not in fields:
            key = f"{where}.{name}" if where else name
            raise UserInputError(f"{source}: unknown key {key} ({_valid_keys(cls, where)})")
    kwargs = {}
    for name, value in data.items():
        f, key = fields[name], f"{where}.{name}" if where else name
        sub = _section_class(f)
        kwargs[name] = _build(sub, value, key, source) if sub is not None else _convert(value, hints[name], f, key, source)
    return cls(**kwargs)


def _plain(value: Any, f: dataclasses.Field | None = None) -> Any:
    if dataclasses.is_dataclass(value):
        return {sf.name: _plain(getattr(value, sf.name), sf) for sf in dataclasses.fields(value)
                if not sf.metadata.get("internal")}
    if f is not None and f.metadata.get("resolution"):
        return format_resolution(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------ old key names

def _get(data: dict, dotted: str) -> tuple[bool, Any]:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _pop(data: dict, dotted: str) -> Any:
    *parents, leaf = dotted.split(".")
    node = data
    chain = []
    for part in parents:
        chain.append((node, part))
        node = node[part]
    value = node.pop(leaf)
    for parent, part in reversed(chain):  # drop sections the move left empty (e.g. the old `models:`)
        if parent[part] == {}:
            del parent[part]
    return value


def _put(data: dict, dotted: str, value: Any, source: str) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserInputError(f"{source}: {part} must be a mapping")
    node[leaf] = value


def translate_old_keys(data: dict, renamed: Iterable[Renamed], source: str) -> tuple[dict, list[str]]:
    """A copy of ``data`` with old key names replaced by the new ones, and the renames applied."""
    data = copy.deepcopy(data)
    notes = []
    for r in renamed:
        present = [k for k in r.old if _get(data, k)[0]]
        if not present:
            continue
        missing = [k for k in r.old if k not in present]
        if missing:
            raise UserInputError(f"{source}: {present[0]} was renamed ({r.describe()}) and cannot be translated "
                                 f"without {missing[0]}: write {r.hint or ', '.join(r.new)}")
        clash = [k for k in r.new if _get(data, k)[0]]
        if clash:
            raise UserInputError(f"{source}: {clash[0]} is given together with its old name {present[0]}; keep only {clash[0]}")
        values = tuple(_pop(data, k) for k in r.old)
        new = r.convert(values, data) if r.convert is not None else {r.new[0]: values[0]}
        for key, value in new.items():
            _put(data, key, value, source)
        notes.append(r.describe())
    return data, notes


def _notice(source: str, notes: list[str]) -> None:
    if notes:
        print(f"serialgen: {source}: old config key names translated: {', '.join(notes)} "
              "(write the new names to silence this)", file=sys.stderr)


# ------------------------------------------------------------------------------------------ --set

def _parse_set(items: Iterable[str]) -> list[tuple[str, Any]]:
    """``["train.learning_rate=1e-4", ...]`` -> ``[("train.learning_rate", 0.0001), ...]`` (values as YAML)."""
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserInputError(f"--set {item!r}: expected KEY=VALUE, e.g. train.learning_rate=1e-4")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise UserInputError(f"--set {item!r}: the value is not valid YAML ({str(exc).splitlines()[0]})") from None
        out.append((key.strip(), value))
    return out


def _apply(cls: type, data: dict, pairs: Iterable[tuple[str, Any]], source: str, renamed: Iterable[Renamed]) -> dict:
    data = copy.deepcopy(data)
    renamed = list(renamed)
    notes = []
    for key, value in pairs:
        if _schema_node(cls, key) is None:
            old = next((r for r in renamed if key in r.old), None)
            if old is None:
                raise _unknown_key_error(cls, key, source)
            if not old.plain:
                raise UserInputError(f"{source} {key}: renamed ({old.describe()}); use --set {old.hint or old.new[0] + '=...'}")
            notes.append(old.describe())
            key = old.new[0]
        node = _schema_node(cls, key)
        assert node is not None
        current = _get(data, key)[1]
        if _section_class(node[1]) is not None and isinstance(value, Mapping) and isinstance(current, dict):
            value = {**current, **value}
        _put(data, key, value, source)
    _notice(source, notes)
    return data


# ------------------------------------------------------------------------------------------ entry points

def config_from_dict(cls: type[C], data: Mapping[str, Any], source: str = "<dict>") -> C:
    """Validate a config mapping (a YAML file's content, or a config saved in a checkpoint).

    Old key names are translated with a one-line notice on stderr.
    """
    if not isinstance(data, Mapping):
        raise UserInputError(f"{source}: must hold a mapping at the top level, got {type(data).__name__}")
    data, notes = translate_old_keys(dict(data), getattr(cls, "RENAMED", ()), source)
    _notice(source, notes)
    return _finish(cls, data, source)


def _finish(cls: type[C], data: dict, source: str) -> C:
    version = data.get("version", CONFIG_VERSION)
    if version not in (1, CONFIG_VERSION):
        raise UserInputError(f"{source}: config version {version!r} is not supported (this release reads 1 and {CONFIG_VERSION})")
    data = {**data, "version": CONFIG_VERSION}
    config = _build(cls, data, "", source)
    config = dataclasses.replace(config, source=source)
    config.check()
    return config


def load_config(cls: type[C], path_or_name: str | Path, overrides: Iterable[str] = ()) -> C:
    """Read a YAML config (a path or a packaged name), translate old keys, apply ``--set`` overrides, validate."""
    path = _resolve_config_path(path_or_name)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise UserInputError(f"{path.name}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserInputError(f"{path.name}: must hold a mapping at the top level")
    renamed = getattr(cls, "RENAMED", ())
    data, notes = translate_old_keys(data, renamed, path.name)
    _notice(path.name, notes)
    data = _apply(cls, data, _parse_set(overrides), "--set", renamed)
    return _finish(cls, data, path.name)


def config_to_dict(config: Any) -> dict[str, Any]:
    """The plain mapping of a config (YAML types only; sizes as ``"WxH"``), as saved beside checkpoints."""
    return _plain(config)


def override(config: C, values: Mapping[str, Any]) -> C:
    """A new config with ``{"train.max_steps": 5, ...}`` set (typed values), validated like a loaded one."""
    cls = type(config)
    data = config_to_dict(config)
    for key in values:
        if _schema_node(cls, key) is None:
            raise _unknown_key_error(cls, key, "override")
    for key, value in values.items():
        _put(data, key, value, config.source)
    return _finish(cls, data, config.source)

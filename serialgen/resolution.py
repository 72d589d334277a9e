"""Image sizes: one spelling (``WIDTHxHEIGHT``, e.g. ``512x768``) on every command and in every config.

The paper's size is 512 wide x 768 high (``DEFAULT_RESOLUTION``); sizes are always (width, height)
pairs, the order PIL and Blender use. Commands take ``--resolution WxH`` (:func:`add_resolution_argument`);
configs take ``resolution: 512x768`` (or a ``[w, h]`` list). Flags of older releases (``--size``,
``--width``/``--height``) stop with a one-line message saying what to write instead
(:func:`add_renamed_flags`).
"""

from __future__ import annotations

import argparse
import re
from typing import Any

from serialgen.errors import UserInputError

__all__ = [
    "DEFAULT_RESOLUTION",
    "MAX_SIDE",
    "parse_resolution",
    "format_resolution",
    "resolution_type",
    "add_resolution_argument",
    "add_renamed_flags",
]

DEFAULT_RESOLUTION = (512, 768)  # width, height: the paper's training and inference size
MAX_SIDE = 8192
_WXH = re.compile(r"\s*(\d+)\s*[xX]\s*(\d+)\s*")


def parse_resolution(value: Any, what: str = "--resolution", *, min_side: int = 8, multiple_of: int = 1) -> tuple[int, int]:
    """``"512x768"``, ``[512, 768]`` or ``(512, 768)`` -> ``(512, 768)``.

    Anything else, a side outside ``min_side..MAX_SIDE`` or not a multiple of ``multiple_of`` (8 for
    latent models) is a one-line ``UserInputError`` naming ``what`` (the flag or config key).
    """
    if isinstance(value, str):
        m = _WXH.fullmatch(value)
        if not m:
            raise UserInputError(f"{what}: {value!r} is not WIDTHxHEIGHT (e.g. 512x768)")
        w, h = int(m.group(1)), int(m.group(2))
    elif isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        w, h = int(value[0]), int(value[1])
    else:
        raise UserInputError(f"{what}: {value!r} is not WIDTHxHEIGHT (e.g. 512x768)")
    if not (min_side <= w <= MAX_SIDE and min_side <= h <= MAX_SIDE):
        raise UserInputError(f"{what}: {format_resolution((w, h))} out of range; each side must be in {min_side}..{MAX_SIDE}")
    if multiple_of > 1 and (w % multiple_of or h % multiple_of):
        raise UserInputError(f"{what}: {format_resolution((w, h))}: width and height must be multiples of {multiple_of}")
    return w, h


def format_resolution(size: tuple[int, int]) -> str:
    """``(512, 768)`` -> ``"512x768"``."""
    return f"{int(size[0])}x{int(size[1])}"


def resolution_type(what: str = "--resolution", **limits):
    """An argparse ``type=`` that parses WxH (argparse reports the error: one line, exit 2)."""

    def parse(text: str) -> tuple[int, int]:
        try:
            return parse_resolution(text, what, **limits)
        except UserInputError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{what}: ")) from None

    parse.__name__ = "resolution"  # argparse names the type in its messages
    return parse


def add_resolution_argument(parser: argparse.ArgumentParser, default: tuple[int, int] | None = DEFAULT_RESOLUTION,
                            help: str = "image size", **limits) -> None:
    """``--resolution WxH`` (default ``default``; None: no default, the caller picks one later and
    ``help`` says which)."""
    shown = f" (default {format_resolution(default)})" if default is not None else ""
    parser.add_argument("--resolution", type=resolution_type(**limits), default=default, metavar="WxH",
                        help=f"{help}{shown}")
    add_renamed_flags(parser, {"--size": "--resolution WxH", "--width": "--resolution WxH",
                               "--height": "--resolution WxH"})


class _Renamed(argparse.Action):
    def __init__(self, option_strings, dest, new: str = "", **kwargs):
        self.new = new
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.exit(2, f"{parser.prog}: error: {option_string} was renamed: use {self.new}\n")


def add_renamed_flags(parser: argparse.ArgumentParser, renamed: dict[str, str]) -> None:
    """Hidden flags of older releases that stop with ``--old was renamed: use --new`` (exit 2)."""
    for old, new in renamed.items():
        parser.add_argument(old, action=_Renamed, new=new, dest=f"_renamed_{old.lstrip('-').replace('-', '_')}")

"""argparse ``type=`` helpers shared by every command: a bad value is argparse's one-line error
(exit 2), named after its flag, before the command imports anything heavy."""

from __future__ import annotations

import argparse
from typing import Callable

__all__ = ["int_at_least", "positive_int", "non_negative_int"]


def int_at_least(minimum: int) -> Callable[[str], int]:
    """A ``type=`` accepting whole numbers >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"int_at_least_{minimum}"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)

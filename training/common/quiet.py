"""Library warnings that say nothing to a user of these commands, filtered once at start-up.

A tiny Stage II run printed five such lines before its progress bar, three of them the same:

* diffusers' ``There are modules in UNet2DConditionModel that should be kept in float32: []``, logged
  on every ``.to(dtype)`` of a model; with an empty list there is no module to keep, so nothing to act on;
* transformers' ``CLIPImageProcessor requires torchvision (not installed); falling back to
  CLIPImageProcessorPil``: the PIL processor is the one we want (docs/stage2.md, CLIP preprocessing).

Only these messages are dropped; any other message of those two loggers shows once per process. The
filters sit on the loggers that emit them (created by name, so neither library is imported here).
"""

from __future__ import annotations

import logging
import re

__all__ = ["filter_library_warnings"]

# logger name -> messages that carry no information for our commands
_NOISE = {
    "diffusers.models.modeling_utils": re.compile(r"^There are modules in \w+ that should be kept in float32: \[\]\."),
    "transformers.utils.import_utils": re.compile(r"^`\w+ImageProcessor` requires torchvision \(not installed\); "
                                                  r"falling back to `\w+ImageProcessorPil`"),
}


class _Filter(logging.Filter):
    """Drops the known noise of one logger, and any message this logger already showed."""

    def __init__(self, noise: re.Pattern):
        super().__init__()
        self.noise = noise
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.noise.match(message):
            return False
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def filter_library_warnings() -> None:
    """Install the filters (idempotent: a second call changes nothing)."""
    for name, noise in _NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Filter) for f in logger.filters):
            logger.addFilter(_Filter(noise))

"""The "ikport" logger, configured once at import from IKPORT_LOG.

- IKPORT_LOG unset: ikport adds only a NullHandler and leaves the level alone (NOTSET), so the
  application's own logging configuration decides what is shown (the library default of the
  logging module: warnings and errors reach stderr through the root logger's last resort).
- IKPORT_LOG=debug|info|warning|error|critical (or a number): the "ikport" logger gets that level;
  if the root logger has no handler yet (the application has not configured logging), ikport
  also adds one stderr handler, so `IKPORT_LOG=debug python app.py` shows the compile command
  lines, cache hits and the decode configuration chosen for every new shape.

An unknown IKPORT_LOG value warns (RuntimeWarning) and is ignored.
"""

from __future__ import annotations

import logging
import os
import warnings

from . import knobs

LOGGER_NAME = "ikport"
FORMAT = "ikport %(levelname)s %(asctime)s %(message)s"
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def parse_level(text: str) -> int | None:
    """IKPORT_LOG's value as a logging level, or None if it is not one."""
    value = text.strip().upper()
    if value in _LEVELS:
        return int(getattr(logging, value))
    if value == "WARN":
        return logging.WARNING
    if value.isdigit():
        return int(value)
    return None


def setup(force: bool = False) -> logging.Logger:
    """Configure the "ikport" logger once (again with `force`, e.g. after changing IKPORT_LOG)."""
    logger = logging.getLogger(LOGGER_NAME)
    if getattr(logger, "_ikport_configured", False) and not force:
        return logger
    for h in list(logger.handlers):
        if getattr(h, "_ikport_handler", False):
            logger.removeHandler(h)
    null = logging.NullHandler()
    null._ikport_handler = True  # type: ignore[attr-defined]
    logger.addHandler(null)
    if os.environ.get("IKPORT_LOG", "").strip():
        level = parse_level(knobs.log_level())
        if level is None:
            warnings.warn(
                f"IKPORT_LOG={os.environ['IKPORT_LOG']!r} is not a logging level; "
                f"use one of {', '.join(n.lower() for n in _LEVELS)}",
                RuntimeWarning,
                stacklevel=2,
            )
        else:
            logger.setLevel(level)
            if not logging.getLogger().handlers:  # the application has not configured logging
                stream = logging.StreamHandler()
                stream.setFormatter(logging.Formatter(FORMAT))
                stream._ikport_handler = True  # type: ignore[attr-defined]
                logger.addHandler(stream)
    logger._ikport_configured = True  # type: ignore[attr-defined]
    return logger

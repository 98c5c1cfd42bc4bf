"""structlog set-up: JSON to stdout, one event per line, context bound through contextvars."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

from sorter.errors import ConfigError

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
FORMATS = ("json", "console")
_format = "json"  # the format chosen last: a later call that sets only the level keeps it
_configured = False  # until the first call succeeds, a failure is reported as plain text


def configure_logging(level: str = "info", fmt: str | None = None, *, stream: TextIO | None = None) -> None:
    """Configure structlog for the process (again: a command that reads the level from its settings).

    ``json`` is what containers want (ops pipe it to ``jq``); ``console`` renders for a person, in colour
    only on a terminal. ``fmt=None`` keeps the format chosen before (``sorter --log-format console run``).
    Unknown values raise :class:`ConfigError` (one line, exit 2 from the CLI).
    """
    global _format, _configured
    numeric = _LEVELS.get(level.lower())
    if numeric is None:
        raise ConfigError(f"log level {level!r} is not one of {', '.join(_LEVELS)} (--log-level, SORTER_LOG_LEVEL)")
    fmt = _format if fmt is None else fmt.lower()
    if fmt not in FORMATS:
        raise ConfigError(f"log format {fmt!r} is not one of {', '.join(FORMATS)} (--log-format)")
    _format, _configured = fmt, True
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:  # colour codes only for a terminal: piped to a file or a log collector they are noise
        renderer = structlog.dev.ConsoleRenderer(colors=(stream or sys.stdout).isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # No stream: each logger resolves sys.stdout when it is made, so redirections (tests, CLI runners) work.
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )


def bound_context(**fields: object):
    """``with bound_context(worker_id=...):`` every line logged inside carries ``fields`` (contextvars: this
    thread, and work handed to other threads with a copy of its context)."""
    return structlog.contextvars.bound_contextvars(**fields)


def get_logger(name: str | None = None) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name) if name else structlog.get_logger()


def report_failure(message: str, stream: TextIO | None = None) -> None:
    """The one line a command ends with when it fails on purpose (a :class:`SorterError`), on stderr.

    With JSON logs it is a JSON event (``sorter.failed``) like every other line, so that ``kubectl logs``,
    which merges stdout and stderr, still parses with ``jq``; otherwise (a terminal, or logging not set up
    because its own flags were wrong) it is ``error: <message>``.
    """
    stream = stream or sys.stderr
    if _configured and _format == "json":
        processors = structlog.get_config()["processors"]
        structlog.wrap_logger(structlog.PrintLogger(stream), processors=processors).error(
            "sorter.failed", error=message
        )
    else:
        stream.write(f"error: {message}\n")
        stream.flush()

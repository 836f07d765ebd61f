"""The service's log lines: human text or JSON, with the context a record carries.

Context travels as logging's `extra`: `log.warning("gap", extra={"pod": pod, "seq": seq})`
adds `pod` and `seq` as JSON fields (or as `pod=... seq=...` after a text line).
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any, TextIO

from kvcache.config import LoggingConfig

# Attributes every LogRecord has; anything else on a record came from `extra`.
_STANDARD = frozenset(logging.LogRecord("", logging.INFO, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}
_CORE = ("ts", "level", "logger", "message")


def record_context(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a log call passed through `extra`, in the order given."""
    return {
        key: value
        for key, value in record.__dict__.items()
        if key not in _STANDARD and not key.startswith("_")
    }


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (UTC, ISO 8601), level, logger, message, then context.

    Context values that JSON cannot hold are written as their `str`; a context key that
    collides with a core field is written as `extra_<key>`.
    """

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        entry: dict[str, Any] = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record_context(record).items():
            entry[f"extra_{key}" if key in _CORE else key] = value
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """`<time> <LEVEL> <logger>: <message>`, then the context as `key=value`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = record_context(record)
        if not context:
            return line
        first, newline, rest = line.partition("\n")  # keep a traceback below the context
        pairs = " ".join(f"{key}={value}" for key, value in context.items())
        return f"{first} [{pairs}]{newline}{rest}"


class _ServiceHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler `configure_logging` installed, so a second call replaces it."""


def configure_logging(config: LoggingConfig, stream: TextIO | None = None) -> logging.Handler:
    """Route every logger (libraries' too, when they leave logging alone) to one stderr handler.

    Idempotent: calling it again replaces the handler it installed; other handlers stay.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _ServiceHandler):
            root.removeHandler(handler)
    handler = _ServiceHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if config.format == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(config.level.upper())
    logging.captureWarnings(True)  # warnings.warn from libraries become log records too
    return handler

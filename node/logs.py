"""The node's logging: one format for every role (plain text or JSON), never patient data.

Log lines carry UIDs and reason codes. What could carry patient data is kept out at the
source: exceptions raised while parsing received datasets are described by
:func:`describe_error` (their type and the tags they name, not their message, which may
quote a value such as a patient's name), and pydicom's warnings, which quote the values
they warn about, are logged by category and place only (:class:`PydicomWarningFilter`).
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime
from enum import StrEnum

_TAG = re.compile(r"\(([0-9A-Fa-f]{4}),\s*([0-9A-Fa-f]{4})\)")


class LogFormat(StrEnum):
    """How log records are written."""

    TEXT = "text"
    """``time role pid LEVEL logger: message``."""
    JSON = "json"
    """One JSON object per line (time, level, role, pid, logger, message, exception)."""


def describe_error(exc: BaseException) -> str:
    """The type of ``exc`` and the DICOM tags its message names, never the message itself.

    pydicom's messages quote the offending value (``... received b'Doe^John' ...``); the
    type and the tag say what went wrong without it.
    """
    tags = sorted({f"({a.upper()},{b.upper()})" for a, b in _TAG.findall(str(exc))})
    return type(exc).__name__ + (f" at {', '.join(tags)}" if tags else "")


class PydicomWarningFilter(logging.Filter):
    """Rewrites warnings raised inside pydicom to their category and origin only."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "pydicom" in text.split(":", 1)[0] or "/pydicom/" in text.split(" ", 1)[0]:
            category = re.search(r": (\w+Warning): ", text)
            record.msg = "pydicom %s while reading malformed input (values not logged)"
            record.args = (category.group(1) if category else "warning",)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "role": self.role,
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        return json.dumps(body, ensure_ascii=False)


def configure(role: str, *, level: str, fmt: LogFormat = LogFormat.TEXT) -> None:
    """Set up the root logger of a role's process (call once, first thing)."""
    handler = logging.StreamHandler()
    if fmt is LogFormat.JSON:
        handler.setFormatter(JsonFormatter(role))
    else:
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s {role} %(process)d %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Python's warnings go through logging, where pydicom's lose their quoted values.
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").addFilter(PydicomWarningFilter())

"""Logging for the service: one line per record (text or JSON), named loggers, no PHI (callers log
UIDs only), and third-party INFO chatter held at WARNING."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from types import TracebackType

from db.sanitise import escape_control

_ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]

#: Libraries whose INFO lines are noise to an admin (highdicom narrates every SR it builds,
#: pynetdicom every PDU and logs whole datasets at DEBUG, which may hold PHI).
QUIET_LIBRARIES = ("highdicom", "pynetdicom", "alembic", "apscheduler", "PIL", "urllib3")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class OneLine(logging.Filter):
    r"""Every record's message becomes one line: control characters escaped (``\n``, ``\x1b``).
    A peer controls some of what is logged (an AE title, a library's error about its request):
    it must not forge log lines or send terminal escapes. Tracebacks keep their lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        escaped = escape_control(message)
        if escaped != message:
            record.msg, record.args = escaped, None
        return True


class TextFormatter(logging.Formatter):
    """``TEXT_FORMAT``, with every line of a traceback indented: a line that starts at the left
    margin is always a new record."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatException(self, ei: _ExcInfo) -> str:  # noqa: N802 - the logging API's name
        return "\n".join("    " + line for line in super().formatException(ei).splitlines())

    def formatStack(self, stack_info: str) -> str:  # noqa: N802 - the logging API's name
        return "\n".join("    " + line for line in stack_info.splitlines())


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers: ``time`` (UTC, ISO 8601), ``level``,
    ``logger``, ``message``, ``thread``, and ``exception`` when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "thread": record.threadName,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure(level: str = "INFO", fmt: str = "text") -> None:
    """Set up the root logger once per process (later calls only change the level and format).

    ``fmt``: ``text`` (one readable line per record) or ``json`` (one JSON object per line)."""
    root = logging.getLogger()
    handler: logging.Handler | None = getattr(root, "_cxr_handler", None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.addFilter(OneLine())
        root.addHandler(handler)
        root._cxr_handler = handler  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.setLevel(level)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)

"""Logging for the service: one line per record, named loggers, no PHI (callers log UIDs only)."""

from __future__ import annotations

import logging
import sys


def configure(level: str = "INFO") -> None:
    root = logging.getLogger()
    if getattr(root, "_cxr_configured", False):
        root.setLevel(level)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    # pynetdicom is chatty at INFO and logs whole datasets at DEBUG (PHI): keep it at WARNING
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    root._cxr_configured = True  # type: ignore[attr-defined]

"""Log records as an admin's log shipper sees them: one line each, control characters escaped,
tracebacks indented under their record, JSON when asked."""

from __future__ import annotations

import io
import json
import logging

from worker.logging_setup import JsonFormatter, OneLine, TextFormatter


def _emit(formatter: logging.Formatter) -> list[str]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(OneLine())
    handler.setFormatter(formatter)
    log = logging.getLogger("test.logging_setup")
    log.propagate = False
    log.addHandler(handler)
    try:
        log.warning("calling AE %r rejected", "EVIL\n2026-01-01 00:00:00 ERROR forged\x1b[2J")
        try:
            raise ValueError("bad value 'X\nFORGED'")
        except ValueError:
            log.exception("C-STORE failed")
    finally:
        log.removeHandler(handler)
    return out.getvalue().splitlines()


def test_text_lines_cannot_be_forged() -> None:
    lines = _emit(TextFormatter())
    records = [line for line in lines if not line.startswith(" ")]
    assert len(records) == 2, lines
    assert "calling AE 'EVIL\\n2026-01-01 00:00:00 ERROR forged\\x1b[2J' rejected" in records[0]
    assert records[1].endswith("ERROR test.logging_setup: C-STORE failed")
    tb = lines[lines.index(records[1]) + 1 :]
    assert tb and all(line.startswith("    ") for line in tb)  # the traceback, indented
    assert any("FORGED'" in line for line in tb)


def test_json_lines_parse_one_per_record() -> None:
    lines = _emit(JsonFormatter())
    entries = [json.loads(line) for line in lines]
    assert len(entries) == 2
    assert entries[0]["level"] == "WARNING" and "EVIL\\n2026" in entries[0]["message"]
    assert entries[1]["message"] == "C-STORE failed"
    assert "ValueError: bad value" in entries[1]["exception"]

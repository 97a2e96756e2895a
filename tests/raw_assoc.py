"""Send an A-ASSOCIATE-RQ built by hand, for peers pynetdicom refuses to be (an AE title holding a
newline or an escape sequence: pynetdicom's own requestor validates titles before sending)."""

from __future__ import annotations

import socket
import struct


def _item(kind: int, data: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(data)) + data


def associate_rq(called: bytes, calling: bytes) -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing Verification in Implicit VR Little Endian."""
    app = _item(0x10, b"1.2.840.10008.3.1.1.1")
    pc = _item(
        0x20,
        bytes([1, 0, 0, 0]) + _item(0x30, b"1.2.840.10008.1.1") + _item(0x40, b"1.2.840.10008.1.2"),
    )
    user = _item(0x50, _item(0x51, struct.pack(">I", 16384)) + _item(0x52, b"1.2.826.0.1.3"))
    body = (
        struct.pack(">HH", 1, 0)
        + called.ljust(16, b" ")[:16]
        + calling.ljust(16, b" ")[:16]
        + b"\0" * 32
        + app
        + pc
        + user
    )
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def raw_associate(port: int, *, called: bytes, calling: bytes, timeout_s: float = 10.0) -> int:
    """Send the request to 127.0.0.1:``port``; return the answer's PDU type (2 accepted, 3
    rejected, 7 aborted) or 0 when the connection closed without one."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
        s.sendall(associate_rq(called, calling))
        try:
            head = s.recv(6)
        except ConnectionResetError:
            return 0
        return head[0] if head else 0

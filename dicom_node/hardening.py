"""The storage SCP's association server, hardened against idle, slow and hostile peers.

pynetdicom's stock server counts a TCP connection that never sends an A-ASSOCIATE-RQ as an
association (20 idle sockets locked every sender out for 29 s), trusts the PDU length a peer
announces (0xFFFFFFFF: the reactor waits for 4 GiB that never come) and does the TLS handshake
in its accept loop (one silent TLS client blocks every other). Here:

* a connection still waiting for its A-ASSOCIATE-RQ does not take an association slot
  (``dicom.max_associations`` counts associations, not sockets); it is closed after
  ``dicom.acse_timeout_s`` (the ARTIM timer) like any other;
* ``dicom.max_connections_per_peer`` caps the open connections of one peer address (idle ones
  included): past it the connection is closed at once, before any thread work;
* a PDU longer than the largest this SCP accepts (``maximum_pdu_size`` plus room for an
  A-ASSOCIATE-RQ) closes the connection at once instead of waiting for the bytes;
* with TLS, the handshake runs in the connection's own thread under ``acse_timeout_s``.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from typing import Any, cast

from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

log = logging.getLogger(__name__)

#: Room for the biggest A-ASSOCIATE-RQ a PACS sends (hundreds of presentation contexts).
_ASSOCIATE_RQ_ROOM = 1024 * 1024
#: The DUL state of an acceptor whose peer has not sent its A-ASSOCIATE-RQ yet.
_AWAITING_RQ = "Sta2"


class PDUTooLong(OSError):
    """The peer announced a PDU longer than this SCP accepts."""


class BoundedSocket(AssociationSocket):
    """An :class:`AssociationSocket` that refuses to read a PDU longer than ``limit`` bytes:
    pynetdicom's reactor then closes the connection (Evt17) instead of waiting for the bytes."""

    limit = 2 * _ASSOCIATE_RQ_ROOM

    def recv(self, nr_bytes: int) -> bytearray:
        if nr_bytes > self.limit:
            log.warning(
                "peer announced a %d-byte PDU (limit %d): connection closed", nr_bytes, self.limit
            )
            raise PDUTooLong(f"PDU of {nr_bytes} bytes exceeds the limit of {self.limit}")
        return super().recv(nr_bytes)


class GuardedHandler(RequestHandler):
    """Creates the acceptor with a :class:`BoundedSocket`."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        server = self.server
        sock = assoc.dul.socket
        if type(sock) is AssociationSocket:
            # same object, one more check on recv (a second socket would queue a second Evt5)
            sock.__class__ = BoundedSocket
            cast(BoundedSocket, sock).limit = getattr(server, "pdu_limit", BoundedSocket.limit)
        return assoc


class GuardedServer(ThreadedAssociationServer):
    """A threaded association server with a per-peer connection cap and a TLS handshake that
    cannot block the accept loop. Built by :meth:`GuardedAE.serve`."""

    max_per_peer = 8
    handshake_timeout_s = 10.0
    pdu_limit = BoundedSocket.limit

    refused_connections = 0

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(
                client, server_side=True, do_handshake_on_connect=False
            )
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        # Counted from the live association threads (one per open connection, idle ones
        # included), so nothing can drift: a closed connection's thread is gone.
        host = str(client_address[0])
        ae = self.ae
        live = ae.all_associations() if isinstance(ae, GuardedAE) else ae.active_associations
        open_now = sum(1 for a in live if a.is_acceptor and a.requestor.address == host)
        if open_now >= self.max_per_peer:
            self.refused_connections += 1
            log.warning(
                "connection from %s refused: it already has %d open connection(s) "
                "(dicom.max_connections_per_peer)",
                host,
                open_now,
            )
            return False
        return True

    def finish_request(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            try:
                request.settimeout(self.handshake_timeout_s)
                request.do_handshake()
                request.settimeout(None)
            except (OSError, ssl.SSLError) as exc:
                log.warning(
                    "TLS handshake with %s failed: %s", client_address[0], type(exc).__name__
                )
                try:
                    request.close()
                except OSError:
                    pass
                return
        super().finish_request(request, client_address)


class GuardedAE(AE):
    """An AE whose association limit counts associations, not sockets waiting for their
    A-ASSOCIATE-RQ (see the module docstring)."""

    @property
    def active_associations(self) -> list[Association]:
        return [
            a
            for a in self.all_associations()
            if not (a.is_acceptor and a.dul.state_machine.current_state == _AWAITING_RQ)
        ]

    def all_associations(self) -> list[Association]:
        """Every association thread of this AE, idle connections included."""
        return [t for t in threading.enumerate() if isinstance(t, Association) and t.ae is self]

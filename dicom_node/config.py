"""Configuration section owned by the DICOM node (``dicom:`` and ``destinations:``)."""

from __future__ import annotations

import ipaddress
import re
import socket
from pathlib import Path
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # default character repertoire, no backslash


def validate_ae_title(value: str) -> str:
    """Return the AE title stripped of padding, or raise ``ValueError`` saying why it is invalid."""
    stripped = value.strip()
    if not stripped or not _AE_RE.match(stripped):
        raise ValueError(
            f"{value!r} is not a valid AE title (1-16 printable ASCII characters, no backslash)"
        )
    return stripped


def validate_port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError(f"{value} is not a valid TCP port (1-65535)")
    return value


def validate_host(value: str) -> str:
    """An IP address, or a host name this machine resolves now; ``ValueError`` otherwise.
    (Whether the address belongs to this machine is checked when the port is bound, and by
    ``cxr-worker check-config``.)"""
    host = value.strip()
    if not host:
        raise ValueError("an empty host is not valid: give an IP address or a host name")
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    if re.fullmatch(r"[0-9.]+", host):
        raise ValueError(f"{host!r} is not a valid IPv4 address")
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ValueError(
            f"{host!r} is neither an IP address nor a name this machine can resolve ({exc}); "
            "use an address of this machine, 127.0.0.1, or 0.0.0.0 for all"
        ) from None
    return host


#: An AE title, stripped of padding and checked by :func:`validate_ae_title`.
AETitle = Annotated[str, AfterValidator(validate_ae_title)]
#: A TCP port, checked by :func:`validate_port`.
Port = Annotated[int, AfterValidator(validate_port)]
#: An IP address or resolvable host name, checked by :func:`validate_host`.
Host = Annotated[str, AfterValidator(validate_host)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TLSServerConfig(_Strict):
    """DICOM TLS for the storage SCP: its certificate and key (PEM), and optionally the CA that
    signs client certificates (required when ``require_client_cert``)."""

    cert_file: Path
    key_file: Path
    ca_file: Path | None = Field(None, description="CA bundle that client certificates chain to")
    require_client_cert: bool = Field(
        False, description="Refuse peers without a certificate signed by ca_file"
    )

    @model_validator(mode="after")
    def _ca_needed(self) -> TLSServerConfig:
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("require_client_cert: true needs ca_file (the CA of the clients)")
        return self


class TLSClientConfig(_Strict):
    """DICOM TLS for a destination: the CA that signs its certificate, and optionally our own
    certificate and key when it requires client certificates."""

    ca_file: Path = Field(..., description="CA bundle the destination's certificate chains to")
    cert_file: Path | None = None
    key_file: Path | None = None
    server_hostname: str | None = Field(
        None, description="Name to check in its certificate; default: the destination's host"
    )

    @model_validator(mode="after")
    def _pair(self) -> TLSClientConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (our client certificate)")
        return self


class DicomNodeConfig(_Strict):
    """The storage SCP that PACS sends chest studies to."""

    ae_title: AETitle = Field("CXR_WORKER", description="Called AE title this node answers to")
    bind_host: Host = Field("127.0.0.1", description="Address to listen on (0.0.0.0 for all)")
    port: Port = Field(11112, description="TCP port for DICOM associations")
    allowed_calling_ae_titles: list[str] = Field(
        default_factory=list,
        description="Calling AE titles allowed to associate; empty list allows any",
    )
    storage_dir: Path = Field(Path("var/storage"), description="Folder for received instances")
    min_free_disk_mb: int = Field(
        1024,
        description="Below this much free space C-STORE answers 0xA700 (out of resources); "
        "must be at least 1: with no floor a full disk fails writes half-way",
    )
    max_dataset_mb: int = Field(
        256,
        ge=1,
        le=65536,
        description="Largest dataset accepted, after inflating a Deflated transfer syntax "
        "(a deflate bomb stops here); larger ones are answered 0xA700",
    )
    max_associations: int = Field(10, ge=1, le=1000)
    max_connections_per_peer: int = Field(
        8,
        ge=1,
        le=1000,
        description="Open connections one peer address may hold, idle ones included; more are "
        "closed at once",
    )
    acse_timeout_s: float = Field(
        10.0, gt=0, description="Seconds a connection may wait before its A-ASSOCIATE-RQ"
    )
    dimse_timeout_s: float = Field(60.0, gt=0)
    network_timeout_s: float = Field(60.0, gt=0)
    tls: TLSServerConfig | None = Field(
        None, description="DICOM TLS for the SCP (PS3.15 B.1); None: plain TCP"
    )

    @field_validator("min_free_disk_mb")
    @classmethod
    def _free_floor(cls, v: int) -> int:
        if v < 1:
            raise ValueError(
                f"{v} is not allowed: the free-space floor must be at least 1 MiB "
                "(rule: min_free_disk_mb >= 1; with no floor a full disk fails writes half-way "
                "instead of answering 0xA700 before writing)"
            )
        return v

    @field_validator("allowed_calling_ae_titles")
    @classmethod
    def _allowed(cls, v: list[str]) -> list[str]:
        return [validate_ae_title(x) for x in v]


class DestinationConfig(_Strict):
    """A DICOM node that receives our Structured Reports (usually the PACS itself)."""

    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    ae_title: AETitle
    host: str
    port: Port
    calling_ae_title: AETitle | None = Field(
        None, description="Calling AE title to use; defaults to dicom.ae_title"
    )
    send_key_image: bool = Field(
        False, description="Also send a Secondary Capture key image for viewers without SR support"
    )
    timeout_s: float = Field(30.0, gt=0)
    tls: TLSClientConfig | None = Field(None, description="DICOM TLS to this destination")

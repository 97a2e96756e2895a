"""Configuration section owned by the DICOM node (``dicom:`` and ``destinations:``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

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


#: An AE title, stripped of padding and checked by :func:`validate_ae_title`.
AETitle = Annotated[str, AfterValidator(validate_ae_title)]
#: A TCP port, checked by :func:`validate_port`.
Port = Annotated[int, AfterValidator(validate_port)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DicomNodeConfig(_Strict):
    """The storage SCP that PACS sends chest studies to."""

    ae_title: AETitle = Field("CXR_WORKER", description="Called AE title this node answers to")
    bind_host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0 for all)")
    port: Port = Field(11112, description="TCP port for DICOM associations")
    allowed_calling_ae_titles: list[str] = Field(
        default_factory=list,
        description="Calling AE titles allowed to associate; empty list allows any",
    )
    storage_dir: Path = Field(Path("var/storage"), description="Folder for received instances")
    min_free_disk_mb: int = Field(
        1024,
        ge=0,
        description="Below this much free space C-STORE answers 0xA700 (out of resources)",
    )
    max_associations: int = Field(10, ge=1, le=1000)
    acse_timeout_s: float = Field(30.0, gt=0)
    dimse_timeout_s: float = Field(60.0, gt=0)
    network_timeout_s: float = Field(60.0, gt=0)

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

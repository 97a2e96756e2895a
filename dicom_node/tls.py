"""``ssl.SSLContext`` for DICOM TLS (PS3.15 B.1, the BCP 195 profile: TLS 1.2 or later) from the
``dicom.tls`` and ``destinations[].tls`` config sections."""

from __future__ import annotations

import ssl

from .config import TLSClientConfig, TLSServerConfig


def _check(path: object, what: str) -> None:
    from pathlib import Path  # noqa: PLC0415

    if not Path(str(path)).is_file():
        raise FileNotFoundError(f"{what} {path} does not exist (config.yaml: {what})")


def server_context(cfg: TLSServerConfig) -> ssl.SSLContext:
    """The SCP's TLS context; client certificates are checked against ``ca_file`` when given
    (required when ``require_client_cert``)."""
    _check(cfg.cert_file, "dicom.tls.cert_file")
    _check(cfg.key_file, "dicom.tls.key_file")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cfg.cert_file), str(cfg.key_file))
    if cfg.ca_file is not None:
        _check(cfg.ca_file, "dicom.tls.ca_file")
        ctx.load_verify_locations(cafile=str(cfg.ca_file))
        ctx.verify_mode = ssl.CERT_REQUIRED if cfg.require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def client_context(cfg: TLSClientConfig) -> ssl.SSLContext:
    """A destination's TLS context: its certificate must chain to ``ca_file`` and name the host;
    our certificate is offered when configured."""
    _check(cfg.ca_file, "destinations[].tls.ca_file")
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cfg.ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cfg.cert_file is not None and cfg.key_file is not None:
        ctx.load_cert_chain(str(cfg.cert_file), str(cfg.key_file))
    return ctx

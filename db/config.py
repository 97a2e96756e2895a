"""Configuration sections owned by the queue (``queue:`` and ``completion:``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from db.engine import normalise_database_url


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


DEFAULT_DATABASE_URL = "sqlite:///var/queue.sqlite3"


class QueueConfig(_Strict):
    """Where the queue lives and how leases behave."""

    database_url: str = Field(
        DEFAULT_DATABASE_URL,
        description=(
            "sqlite:///path or postgresql+psycopg://user@host/db; env CXR_DATABASE_URL overrides"
        ),
    )
    lease_seconds: float = Field(
        300.0, gt=0, description="A claim expires this long after the last heartbeat"
    )
    heartbeat_seconds: float = Field(30.0, gt=0)
    max_attempts: int = Field(
        3, ge=1, description="After this many failed attempts a study is failed"
    )

    @field_validator("database_url")
    @classmethod
    def _url(cls, v: str) -> str:
        return normalise_database_url(v)

    @model_validator(mode="after")
    def _heartbeat_shorter(self) -> QueueConfig:
        if self.heartbeat_seconds >= self.lease_seconds:
            raise ValueError(
                f"heartbeat_seconds ({self.heartbeat_seconds}) must be shorter than lease_seconds "
                f"({self.lease_seconds}), or leases expire while work is still running"
            )
        return self


class CompletionConfig(_Strict):
    """When a study that is still receiving instances counts as complete (``ready``)."""

    quiet_seconds: float = Field(
        30.0, gt=0, description="Ready after no instance arrived for this long"
    )
    max_wait_seconds: float = Field(
        600.0, gt=0, description="Ready at most this long after the first instance"
    )
    lateral_grace_seconds: float = Field(
        120.0,
        ge=0,
        description=(
            "A study whose header-identified frontal has no lateral (and no image of unknown "
            "view) waits this long after its last instance for the lateral; 0 turns it off; "
            "max_wait_seconds still bounds it"
        ),
    )
    sweep_interval_seconds: float = Field(5.0, gt=0)

    @model_validator(mode="after")
    def _order(self) -> CompletionConfig:
        if self.max_wait_seconds < self.quiet_seconds:
            raise ValueError(
                f"max_wait_seconds ({self.max_wait_seconds}) must be at least "
                f"quiet_seconds ({self.quiet_seconds})"
            )
        return self

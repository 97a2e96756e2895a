"""Fixtures for tests that join packages: the storage SCP recording into the real queue.

``sqlite_queue``, ``any_queue`` (SQLite and PostgreSQL) and ``start_scp`` come from
tests/conftest.py; here ``scp`` is the SCP with default settings on the SQLite queue.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

from tests.dicom_net import RunningSCP

if TYPE_CHECKING:
    from db.queue import Queue


@pytest.fixture
def scp(start_scp: Callable[..., RunningSCP], sqlite_queue: Queue) -> RunningSCP:
    """The SCP with default settings, recording into the real queue on SQLite."""
    return start_scp(sqlite_queue)

"""Fixtures for the DICOM node's own tests: the storage SCP on a free loopback port, recording into
an in-memory sink (:class:`tests.fakes.MemorySink`), so nothing here needs db or worker. The SCP
tests that need the real queue live in tests/integration/.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.dicom_net import RunningSCP
from tests.fakes import MemorySink


@pytest.fixture
def memory_sink() -> MemorySink:
    return MemorySink()


@pytest.fixture
def scp(start_scp: Callable[..., RunningSCP], memory_sink: MemorySink) -> RunningSCP:
    """The SCP with default settings, recording into ``memory_sink``."""
    return start_scp(sink=memory_sink)

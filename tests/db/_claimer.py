"""Worker process body for the concurrency test (a module of its own so ``spawn`` can import it)."""

from __future__ import annotations

import time
from multiprocessing.queues import Queue as MPQueue
from multiprocessing.synchronize import Barrier


def claim_until_empty(url: str, worker_id: str, barrier: Barrier, out: MPQueue, limit: int) -> None:
    from db.queue import Queue

    q = Queue.from_url(url, lease_seconds=600, max_attempts=3)
    claimed: list[int] = []
    empty_in_a_row = 0
    try:
        barrier.wait(timeout=60)
        t0 = time.perf_counter()
        # An empty answer can be transient on PostgreSQL (SKIP LOCKED passes over rows another
        # worker is claiming right now), so stop only after a few empty answers in a row.
        while empty_in_a_row < 3:
            got = q.claim(worker_id, limit=limit)
            if got:
                empty_in_a_row = 0
                claimed.extend(c.id for c in got)
            else:
                empty_in_a_row += 1
                time.sleep(0.01)
        out.put((worker_id, claimed, time.perf_counter() - t0, None))
    except Exception as e:  # reported to the parent, which fails the test with it
        out.put((worker_id, claimed, 0.0, f"{type(e).__name__}: {e}"))
    finally:
        q.close()

"""Which queued requests run together, on which free instance, and when: pure functions.

Nothing here holds state or a lock.  The node (node.py) calls ``choose`` with a view of its
queue, its free instances and the time, and carries out what it returns.

* A batch is formed only when an instance is free, so batches grow while instances are busy.
  Among the free instances, the one whose ``[min, max]`` fits the queued work best is used:
  the smallest ``max`` that holds all of it, else the largest ``max``.
* A batch runs at once when it fills the instance's ``max`` (or the next request would not
  fit), when no more work is coming (the node is closing, or a held burst ended), when it is a lone request and nothing is running (no
  latency penalty at low load), or when waiting cannot help (``worth_waiting``).
* A batch never goes below an instance's ``min``: such requests wait for more work.  At
  shutdown none will come, so a draining node hands ``choose`` its slots with ``min``
  waived (node.py ``close``).

``worth_waiting`` is the ``batching_timeout`` policy: a partial batch waits only while the
observed arrivals say another request is likely to come inside the window, and sooner
than a batch takes to run (otherwise running now costs less: what arrives meanwhile
batches behind it).  When every caller is already queued (a closed loop at its
concurrency), arrivals stop and the batch runs at once instead of idling the instance for
the whole window.
"""
from __future__ import annotations

from typing import NamedTuple, Protocol
from collections.abc import Iterable, Iterator

# How much one inter-arrival gap moves the running estimate (an exponential average).
GAP_WEIGHT = 0.25
# Arrivals have stopped once none came for this many usual gaps.
OVERDUE_GAPS = 2.0


class Sized(Protocol):
    size: int


class QueueView(Protocol):
    """The node's queue as batching reads it (queues.PriorityQueue, a list in tests)."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Sized]: ...


class Slot(NamedTuple):
    """A free instance as batching sees it: its position and batch range."""

    instance: int
    lo: int
    hi: int


class Run(NamedTuple):
    """Run the first ``requests`` queued requests (``size`` rows) on instance ``slot``."""

    slot: Slot
    requests: int
    size: int


class Wait(NamedTuple):
    """Nothing is due before ``until`` (a ``time.monotonic()`` value)."""

    until: float


class Window(NamedTuple):
    """Everything ``choose`` needs besides the queue and the free instances (a tuple:
    built at every dispatch, so it must be cheap)."""

    now: float
    oldest: float  # when the longest-waiting queued request arrived
    timeout: float  # batching_timeout, seconds
    queued_size: int  # rows queued in all
    running: int  # batches running now
    flush: bool = False  # no more work is coming: the node closes, or a burst ended (hold.py)
    last_arrival: float = float("-inf")
    gap: float = float("inf")  # the usual time between arrivals (``next_gap``), seconds
    service: float = 0.0  # how long the node's recent batches took to run, seconds


def averaged(previous: float, sample: float) -> float:
    """An exponential average: recent samples weigh most."""
    return previous + GAP_WEIGHT * (sample - previous)


def next_gap(gap: float, last: float, now: float, timeout: float) -> float:
    """The usual gap between arrivals after one more at ``now`` (the one before came at
    ``last``).  A gap longer than the window counts as the window: for the policy it only
    says "none came in time".  Start from ``gap = timeout``: one arrival per window.
    Called at every submit, so plain arithmetic."""
    sample = now - last
    if sample > timeout:
        sample = timeout
    return gap + GAP_WEIGHT * (sample - gap)


def worth_waiting(size: int, hi: int, w: Window) -> float | None:
    """When to look again if a partial batch of ``size`` rows should wait for more, or None
    when it should run now: it is full, its window is over, the next arrival is expected
    after the window or later than a batch takes, or arrivals have stopped (none for
    ``OVERDUE_GAPS`` usual gaps)."""
    closes = w.oldest + w.timeout
    if size >= hi or w.now >= closes:
        return None
    if w.gap >= w.service:  # a batch run now ends before the next request would come
        return None
    if w.last_arrival + w.gap > closes:  # the next arrival would likely come too late
        return None
    overdue = w.last_arrival + OVERDUE_GAPS * w.gap
    if w.now >= overdue:
        return None
    return min(closes, overdue)


def take(queue: Iterable[Sized], limit: int) -> tuple[int, int]:
    """How many requests from the head fit in ``limit`` rows, and their rows."""
    count = size = 0
    for req in queue:
        if size + req.size > limit:
            break
        count += 1
        size += req.size
    return count, size


def best_fit(queue: QueueView, free: Iterable[Slot], queued_size: int) -> Run | None:
    """The free instance that fits the queued work best, with its batch."""
    fits = largest = None
    for slot in free:
        count, size = take(queue, slot.hi)
        if count == 0 or size < slot.lo:
            continue
        if size == queued_size and (fits is None or slot.hi < fits.slot.hi):
            fits = Run(slot, count, size)
        if largest is None or slot.hi > largest.slot.hi:
            largest = Run(slot, count, size)
    return fits or largest


def choose(queue: QueueView, free: Iterable[Slot], w: Window) -> Run | Wait | None:
    """The next batch to run now, when to look again, or None (nothing can run: no free
    instance, an empty queue, or work below every free instance's ``min``)."""
    if not queue:
        return None
    run = best_fit(queue, free, w.queued_size)
    if run is None:
        return None
    if run.requests < len(queue) or w.flush or (len(queue) == 1 and w.running == 0):
        return run  # it cannot grow, no more work is coming, or a lone request
    until = worth_waiting(run.size, run.slot.hi, w)
    return run if until is None else Wait(until)

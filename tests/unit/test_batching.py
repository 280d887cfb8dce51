"""Batch choice and the batching window as pure functions (trtserve/batching.py): single
decisions, then whole simulated arrival traces run through the same functions the node uses."""
from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field
from typing import NamedTuple

import pytest

from trtserve.batching import Run, Slot, Wait, Window, averaged, choose, next_gap, worth_waiting


@dataclass
class Req:
    size: int = 1
    enqueued: float = 0.0


class Arrivals(NamedTuple):
    last: float = float("-inf")
    gap: float = 0.002


def window(now=1.0, oldest=1.0, timeout=0.002, queued=None, running=0, flush=False, arrivals=None, service=0.001):
    arrivals = arrivals or Arrivals()
    return Window(now, oldest, timeout, queued, running, flush, arrivals.last, arrivals.gap, service)


def decide(queue, free, **kw):
    kw.setdefault("queued", sum(r.size for r in queue))
    return choose(queue, free, window(**kw))


ONE = [Slot(0, 1, 8)]
FLOWING = Arrivals(last=1.0, gap=0.0001)  # one every 100 us, the last just now


def test_nothing_queued_or_nothing_free_means_nothing_to_do():
    assert decide([], ONE) is None
    assert decide([Req()], []) is None


def test_a_lone_request_with_nothing_running_runs_at_once_despite_the_window():
    assert decide([Req()], ONE, timeout=10.0, arrivals=FLOWING) == Run(ONE[0], 1, 1)


def test_a_full_batch_runs_at_once():
    queue = [Req() for _ in range(8)]
    assert decide(queue, ONE, running=1, arrivals=FLOWING) == Run(ONE[0], 8, 8)


def test_a_batch_the_next_request_does_not_fit_runs_at_once():
    queue = [Req(5), Req(5)]
    assert decide(queue, ONE, running=1, arrivals=FLOWING) == Run(ONE[0], 1, 5)


def test_a_partial_batch_waits_while_requests_keep_coming():
    queue = [Req(), Req()]
    assert decide(queue, ONE, running=1, arrivals=FLOWING) == Wait(1.0 + 2 * 0.0001)


def test_partial_batches_run_at_once_when_no_more_work_is_coming():
    assert decide([Req(), Req()], ONE, running=1, flush=True, arrivals=FLOWING) == Run(ONE[0], 2, 2)


def test_without_a_window_a_partial_batch_runs_at_once():
    assert decide([Req(), Req()], ONE, running=1, timeout=0.0, arrivals=FLOWING) == Run(ONE[0], 2, 2)


def test_work_below_every_free_instances_min_waits_for_more():
    assert decide([Req(), Req()], [Slot(0, 4, 8)], running=1) is None


def test_best_fit_is_the_smallest_max_that_holds_all_else_the_largest():
    small, large = Slot(0, 1, 2), Slot(1, 1, 8)
    assert decide([Req(), Req()], [large, small], flush=True).slot == small
    assert decide([Req() for _ in range(5)], [small, large], flush=True) == Run(large, 5, 5)
    assert decide([Req() for _ in range(9)], [small, large], flush=True) == Run(large, 8, 8)


# -- the window policy -------------------------------------------------------------------
def test_the_usual_gap_starts_at_one_per_window_and_averages_gaps_capped_at_the_window():
    gap = next_gap(0.002, float("-inf"), 1.0, 0.002)  # the first arrival says nothing yet
    assert gap == 0.002
    gap = next_gap(gap, 1.0, 1.001, 0.002)
    assert gap == pytest.approx(0.002 + 0.25 * (0.001 - 0.002))
    assert next_gap(gap, 1.001, 2.0, 0.002) == pytest.approx(gap + 0.25 * (0.002 - gap))  # a second counts as a window


def test_no_wait_once_the_window_is_over():
    assert worth_waiting(2, 8, window(now=1.003, oldest=1.0, arrivals=FLOWING)) is None


def test_no_wait_when_the_next_arrival_is_expected_after_the_window():
    assert worth_waiting(2, 8, window(now=1.0, oldest=1.0, arrivals=Arrivals(1.0, 0.005))) is None


def test_no_wait_when_the_next_arrival_is_expected_later_than_a_batch_takes():
    # A request every 100 us, a batch in 50 us: run now, the next one batches behind it.
    assert worth_waiting(2, 8, window(arrivals=FLOWING, service=0.00005)) is None
    assert worth_waiting(2, 8, window(arrivals=FLOWING, service=0.0)) is None  # nothing ran yet


def test_no_wait_once_arrivals_have_stopped():
    stopped = Arrivals(last=1.0, gap=0.0001)
    assert worth_waiting(2, 8, window(now=1.0003, oldest=1.0, arrivals=stopped)) is None


def test_a_wait_ends_at_the_window_at_the_latest():
    steady = Arrivals(last=1.0015, gap=0.0004)
    assert worth_waiting(2, 8, window(now=1.0015, oldest=1.0, arrivals=steady)) == 1.002


# -- simulated traces ----------------------------------------------------------------------
@dataclass(order=True)
class Event:
    when: float
    kind: str = field(compare=False)  # "arrive", "free", "look"
    caller: int = field(default=-1, compare=False)


class Simulation:
    """One instance (max 8), a service time of ``fixed + per_row * rows``, the node's rules:
    a lone request goes at once, otherwise ``choose`` decides.  ``always_wait`` replaces the
    window rule by waiting for a full batch or the whole window (the rule before it)."""

    def __init__(self, timeout: float, fixed: float = 0.0003, per_row: float = 0.00005, always_wait: bool = False):
        self.timeout, self.fixed, self.per_row, self.always_wait = timeout, fixed, per_row, always_wait
        self.events: list[Event] = []
        self.queue: list[Req] = []
        self.callers: list[int] = []  # the caller of each queued request
        self.busy_until: float | None = None
        self.running: list[tuple[Req, int]] = []
        self.last, self.gap = float("-inf"), timeout
        self.service = 0.0
        self.latencies: list[float] = []
        self.batches: list[int] = []
        self.done: list[tuple[float, int]] = []  # (time, caller)

    def at(self, when: float, kind: str, caller: int = -1) -> None:
        heapq.heappush(self.events, Event(when, kind, caller))

    def run(self, until: float, closed_loop_think: float | None = None) -> None:
        while self.events and self.events[0].when <= until:
            event = heapq.heappop(self.events)
            now = event.when
            if event.kind == "arrive":
                self.gap = next_gap(self.gap, self.last, now, self.timeout) if self.timeout else self.gap
                self.last = now
                self.queue.append(Req(1, now))
                self.callers.append(event.caller)
            elif event.kind == "free":
                self.service = averaged(self.service, self.fixed + self.per_row * len(self.running))
                for req, caller in self.running:
                    self.latencies.append(now - req.enqueued)
                    self.done.append((now, caller))
                    if closed_loop_think is not None:
                        self.at(now + closed_loop_think, "arrive", caller)
                self.running, self.busy_until = [], None
            self.dispatch(now)

    def dispatch(self, now: float) -> None:
        if self.busy_until is not None or not self.queue:
            return
        w = Window(now, self.queue[0].enqueued, self.timeout, len(self.queue), 0, False, self.last, self.gap, self.service)
        if self.always_wait and 1 < len(self.queue) < 8 and now < w.oldest + self.timeout:
            decision = Wait(w.oldest + self.timeout)  # the lone rule, then the whole window
        else:
            decision = choose(self.queue, ONE, w)
        if isinstance(decision, Wait):
            self.at(decision.until, "look")
            return
        count = decision.requests
        batch, self.queue = self.queue[:count], self.queue[count:]
        callers, self.callers = self.callers[:count], self.callers[count:]
        self.running = list(zip(batch, callers))
        self.batches.append(count)
        self.busy_until = now + self.fixed + self.per_row * count
        self.at(self.busy_until, "free")


def closed_loop(concurrency: int, timeout: float, always_wait: bool = False, seconds: float = 1.0) -> float:
    """Requests per second of ``concurrency`` callers that resubmit 100 us after an answer."""
    sim = Simulation(timeout, always_wait=always_wait)
    for caller in range(concurrency):
        sim.at(caller * 1e-6, "arrive", caller)
    sim.run(seconds, closed_loop_think=0.0001)
    return len(sim.done) / seconds


def test_closed_loop_throughput_never_falls_as_concurrency_rises():
    rates = [closed_loop(c, timeout=0.002) for c in (1, 2, 4, 8, 16, 32, 64)]
    assert all(b >= a * 0.99 for a, b in zip(rates, rates[1:])), rates


def test_closed_loop_never_loses_to_waiting_for_the_whole_window_and_wins_where_that_rule_falls():
    for c in (1, 2, 4, 8, 16, 32, 64):
        assert closed_loop(c, 0.002) >= 0.99 * closed_loop(c, 0.002, always_wait=True), c
    # Waiting for the whole window: 4 callers get fewer answers than 2 (every caller is
    # already queued, the instance idles through the window).
    assert closed_loop(4, 0.002, always_wait=True) < closed_loop(2, 0.002, always_wait=True)
    assert closed_loop(4, 0.002) > 2 * closed_loop(4, 0.002, always_wait=True)


def test_a_closed_loop_at_one_caller_is_never_delayed():
    sim = Simulation(timeout=0.002)
    sim.at(0.0, "arrive", 0)
    sim.run(0.5, closed_loop_think=0.0001)
    assert max(sim.latencies) == pytest.approx(sim.fixed + sim.per_row)


def poisson(rate: float, seconds: float, seed: int = 7) -> list[float]:
    rng, t, times = random.Random(seed), 0.0, []
    while t < seconds:
        t += rng.expovariate(rate)
        times.append(t)
    return times


def open_loop(rate: float, timeout: float, **kw) -> Simulation:
    sim = Simulation(timeout, **kw)
    for t in poisson(rate, 1.0):
        sim.at(t, "arrive")
    sim.run(2.0)
    return sim


def test_under_steady_heavy_arrivals_the_window_forms_larger_batches():
    # 6 000 req/s against one instance that does 8 rows in 0.7 ms: waiting pays.
    waited, eager = open_loop(6000, 0.002), open_loop(6000, 0.0)
    def mean(sim):
        return sum(sim.batches) / len(sim.batches)

    assert mean(waited) > 1.2 * mean(eager), (mean(waited), mean(eager))
    assert len(waited.latencies) == len(eager.latencies)  # every request served


def test_under_sparse_arrivals_no_request_waits_for_the_window():
    # One request every 10 ms on average: the next is not expected inside a 2 ms window.
    sim = open_loop(100, 0.002)
    service = sim.fixed + sim.per_row
    assert sum(lat > service + 1e-9 for lat in sim.latencies) <= 0.05 * len(sim.latencies)

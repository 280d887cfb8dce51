"""The request-memory budget (server/budget.py): admission at each frame's header, waiting
connections resumed least-held first, and the refusal when waiting cannot help."""
from __future__ import annotations

import pytest

from trtserve.errors import ConfigError, ResourceExhaustedError
from trtserve.server.budget import SMALL, ByteBudget, default_limits, machine_memory

MIB = 1 << 20


class Connection:
    """Stands for a connection: counts the times the budget resumed it."""

    def __init__(self, budget: ByteBudget) -> None:
        self.resumed = 0
        self.account = budget.account(self.resume)

    def resume(self) -> None:
        self.resumed += 1


def test_frames_within_the_limits_are_admitted_and_released_when_answered():
    budget = ByteBudget(10 * MIB, 8 * MIB)
    conn = Connection(budget)
    assert conn.account.admit(3 * MIB) and conn.account.admit(MIB)
    assert (conn.account.held, budget.total) == (4 * MIB, 4 * MIB)
    conn.account.kept[1] = conn.account.sizes.popleft()  # request 1 in flight, as the protocol keeps it
    conn.account.release(conn.account.sizes.popleft())  # request 2 answered at once
    assert budget.total == 3 * MIB
    conn.account.release(conn.account.kept.pop(1))  # request 1 answered
    assert (conn.account.held, budget.total) == (0, 0)


def test_a_frame_that_can_never_fit_is_resource_exhausted():
    budget = ByteBudget(10 * MIB, 4 * MIB)
    conn = Connection(budget)
    with pytest.raises(ResourceExhaustedError, match="--max-buffered-per-connection 4194304") as refused:
        conn.account.admit(5 * MIB)
    assert refused.value.details == {"frame": 5 * MIB, "limit": 4 * MIB}
    with pytest.raises(ResourceExhaustedError, match="--max-buffered 2097152"):
        Connection(ByteBudget(2 * MIB, 2 * MIB)).account.admit(3 * MIB)


def test_past_the_budget_the_connections_holding_most_wait_and_the_least_held_resumes_first():
    budget = ByteBudget(10 * MIB, 8 * MIB)
    big, medium, small = Connection(budget), Connection(budget), Connection(budget)
    assert big.account.admit(6 * MIB) and medium.account.admit(2 * MIB) and small.account.admit(MIB)
    assert not big.account.admit(2 * MIB)  # 9 + 2 > 10: waits
    assert not medium.account.admit(2 * MIB)
    assert budget.waiting == {big.account, medium.account}
    small.account.release(small.account.sizes.popleft())  # 8 held: room for one of them
    assert (medium.resumed, big.resumed) == (1, 0)  # the one holding less goes first
    assert medium.account.admit(2 * MIB)  # its retry fits
    big.account.release(big.account.sizes.popleft())  # 6 MiB freed: big's 2 MiB fits now
    assert big.resumed == 1 and budget.waiting == set()


def test_a_connection_holding_nothing_always_gets_a_small_frame():
    budget = ByteBudget(4 * MIB, 4 * MIB)
    hog, client = Connection(budget), Connection(budget)
    assert hog.account.admit(4 * MIB)
    assert client.account.admit(SMALL)  # over the budget by one small frame, by design
    assert not client.account.admit(100)  # it now holds something: it waits like the rest
    assert not Connection(budget).account.admit(SMALL + 1)  # only small frames pass


def test_a_connection_over_its_share_waits_for_its_own_answers():
    budget = ByteBudget(100 * MIB, 4 * MIB)
    conn = Connection(budget)
    assert conn.account.admit(3 * MIB)
    conn.account.kept[1] = conn.account.sizes.popleft()
    assert not conn.account.admit(2 * MIB)  # 5 > its 4 MiB share, though the budget has room
    conn.account.release(conn.account.kept.pop(1))
    assert conn.resumed == 1 and conn.account.admit(2 * MIB)


def test_closing_frees_everything_and_resumes_waiters():
    budget = ByteBudget(4 * MIB, 4 * MIB)
    gone, waiter = Connection(budget), Connection(budget)
    assert gone.account.admit(3 * MIB) and waiter.account.admit(SMALL)
    assert not waiter.account.admit(2 * MIB)
    gone.account.close()
    assert budget.total == SMALL and waiter.resumed == 1
    gone.account.close()  # twice is harmless
    assert budget.total == SMALL


def test_defaults_are_sized_from_the_machine_and_bad_values_are_refused():
    memory = machine_memory()
    assert 0 < memory <= 1 << 50
    limit, share = default_limits(64 * MIB, None, None)
    assert limit == memory // 4 and share == min(limit, max(64 * MIB, limit // 8))
    assert default_limits(64 * MIB, 32 * MIB, None) == (32 * MIB, 32 * MIB)  # a share never exceeds the budget
    for bad in (0, -1, 1.5, "1"):
        with pytest.raises(ConfigError, match="max_buffered must be a positive number of bytes"):
            default_limits(64 * MIB, bad, None)
    with pytest.raises(ConfigError, match="exceeds max_buffered"):
        default_limits(64 * MIB, 10 * MIB, 20 * MIB)

"""Failing commits: logged without flooding, reported while they last, cleared by a success or by time."""

from __future__ import annotations

import logging

import pytest

from collab_server.logs import Throttled
from collab_server.storage.health import FAILING_FOR, SETTLED, CommitHealth


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records]


def test_a_recurring_line_is_written_once_per_interval_with_a_count_of_the_rest(caplog) -> None:
    clock = Clock()
    throttled = Throttled(logging.getLogger("t"), logging.ERROR, interval=10.0, clock=clock)
    with caplog.at_level(logging.ERROR):
        for i in range(5):
            throttled("failed n=%d", i)
            clock.now += 1
        clock.now += 6  # 11 s after the first
        throttled("failed n=%d", 5)
        throttled("failed n=%d", 6)
    assert messages(caplog) == ["failed n=0", "failed n=5 (and 4 more in the last 10 s)"]


def test_commit_health_logs_a_failing_spell_in_a_few_lines_and_forgets_it(caplog) -> None:
    clock = Clock()
    health = CommitHealth(clock)
    assert health.failing is None
    with caplog.at_level(logging.WARNING):
        for _ in range(100):
            health.failed(1, OSError("database or disk is full"))
            clock.now += 0.01
            health.succeeded()  # a nearly full disk lets one through now and then: not a recovery yet
            assert health.failing is None
            clock.now += 0.01
            health.failed(1, OSError("database or disk is full"))
            assert health.failing == "database or disk is full"
        clock.now += SETTLED
        health.succeeded()
        assert health.failing is None
        health.succeeded()  # nothing to report twice
    assert messages(caplog) == ["storage commit failed updates=1 error=database or disk is full",
                                "storage commits succeed again after 200 failed over 2.5 s"]

    health.failed(2, OSError("gone"))
    health.succeeded()  # too soon to count as settled, and then no commit for a long time
    clock.now += 3600
    with caplog.at_level(logging.WARNING):
        health.failed(2, OSError("gone"))
        clock.now += SETTLED
        health.succeeded()
    assert messages(caplog)[-1] == "storage commits succeed again after 1 failed over 0.5 s"  # this spell only

    health.failed(2, OSError("gone"))
    clock.now += FAILING_FOR - 0.1
    assert health.failing == "gone"
    clock.now += 0.2  # no commit since: a node out of rotation is tried again
    assert health.failing is None


def test_a_spell_lasts_from_its_first_failure_to_the_first_success_after_it(caplog) -> None:
    """Failures close together, then none while clients are held off: the spell lasted until commits worked
    again, not from its first failure to its last."""
    clock = Clock()
    health = CommitHealth(clock)
    with caplog.at_level(logging.WARNING):
        for _ in range(4):
            health.failed(1, OSError("gone"))
            clock.now += 0.01
        clock.now += 4.97
        health.succeeded()
        assert messages(caplog)[-1] == "storage commits succeed again after 4 failed over 5.0 s"

        health.failed(1, OSError("gone"))
        clock.now += 0.2
        health.succeeded()  # storage works again, but too soon after a failure to be sure: logged later
        clock.now += SETTLED
        health.succeeded()
    assert messages(caplog)[-1] == "storage commits succeed again after 1 failed over 0.2 s"


def test_while_commits_fail_one_client_a_second_is_let_in() -> None:
    clock = Clock()
    health = CommitHealth(clock)
    assert all(health.admits() for _ in range(3))
    health.failed(1, OSError("database or disk is full"))
    let_in = []
    for _ in range(28):  # 3.5 s, asking every 1/8 s
        clock.now += 0.125
        let_in.append(health.admits())
    assert [i for i, ok in enumerate(let_in) if ok] == [7, 15, 23]  # 1 s, 2 s and 3 s after the failure
    clock.now += 0.5
    health.failed(1, OSError("database or disk is full"))  # the probe's commit failed too
    clock.now += 0.9
    assert not health.admits()
    clock.now += 0.1
    assert health.admits()
    health.succeeded()
    assert all(health.admits() for _ in range(3))

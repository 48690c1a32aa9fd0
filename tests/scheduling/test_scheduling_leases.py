"""Leases on a manual clock: expiry requeues, late/duplicate/foreign results are refused, renew extends."""

from __future__ import annotations

import pytest

from dist_llm_train.errors import PreconditionError
from dist_llm_train.scheduling import LeaseTable, ManualClock, Task


def task(i: int) -> Task:
    return Task(task_id=i, shard_id=i, start=0, end=100, micro_batches=1)


@pytest.fixture()
def clock() -> ManualClock:
    return ManualClock(1000.0)


@pytest.fixture()
def table(clock: ManualClock) -> LeaseTable:
    return LeaseTable(lease_s=60.0, clock=clock)


def test_grant_fields_and_unique_ids(table: LeaseTable, clock: ManualClock) -> None:
    a = table.grant(task(0), "w1")
    clock.advance(5.0)
    b = table.grant(task(1), "w2", lease_s=10.0)
    assert (a.lease_id, a.worker_id, a.granted_at, a.expires_at) == (0, "w1", 1000.0, 1060.0)
    assert (b.lease_id, b.granted_at, b.expires_at) == (1, 1005.0, 1015.0)
    assert table.lease_of_task(0) == a and table.active_count("w1") == 1 and len(table) == 2
    assert table.next_expiry() == 1015.0


def test_complete_accepts_once_then_refuses_duplicate(table: LeaseTable) -> None:
    lease = table.grant(task(0), "w1")
    first = table.complete(lease.lease_id, "w1")
    assert first.accepted and first.reason is None and first.task == task(0)
    assert table.is_completed(0) and len(table) == 0
    again = table.complete(lease.lease_id, "w1")
    assert not again and again.reason == "duplicate"
    assert table.stats.completions == 1 and table.stats.refusals["duplicate"] == 1


def test_foreign_and_unknown_results_are_refused(table: LeaseTable) -> None:
    lease = table.grant(task(0), "w1")
    assert table.complete(lease.lease_id, "w2").reason == "not-holder"
    assert table.complete(999, "w1").reason == "unknown"
    # The refusals changed nothing: the holder can still deliver.
    assert table.complete(lease.lease_id, "w1").accepted


def test_expiry_requeues_and_late_result_of_old_holder_is_refused(
    table: LeaseTable, clock: ManualClock
) -> None:
    old = table.grant(task(0), "w1")
    clock.advance(59.999)
    assert table.expire() == []
    clock.advance(0.001)  # exactly expires_at: expired
    assert table.expire() == [task(0)]
    assert table.stats.expiries == 1 and table.lease_of_task(0) is None
    new = table.grant(task(0), "w2")
    late = table.complete(old.lease_id, "w1")
    assert not late.accepted and late.reason == "expired"
    assert table.complete(new.lease_id, "w2").accepted
    # The old holder retrying after the task is done is still refused; the task was applied once.
    assert table.complete(old.lease_id, "w1").reason == "expired"
    assert table.stats.completions == 1 and table.stats.refusals["expired"] == 2


def test_result_after_expiry_time_is_refused_even_before_expire_runs(
    table: LeaseTable, clock: ManualClock
) -> None:
    lease = table.grant(task(0), "w1")
    clock.advance(61.0)
    assert table.complete(lease.lease_id, "w1").reason == "expired"
    assert table.expire() == [task(0)]  # still handed back for requeueing


def test_expire_with_explicit_now_orders_by_expiry(table: LeaseTable, clock: ManualClock) -> None:
    table.grant(task(0), "w1", lease_s=30.0)
    table.grant(task(1), "w1", lease_s=10.0)
    table.grant(task(2), "w2", lease_s=20.0)
    assert table.expire(now=1025.0) == [task(1), task(2)]
    assert [lease.task.task_id for lease in table.active()] == [0]


def test_renew_extends_and_refuses_when_not_live(table: LeaseTable, clock: ManualClock) -> None:
    lease = table.grant(task(0), "w1")
    clock.advance(50.0)
    renewed = table.renew(lease.lease_id)
    assert renewed is not None and renewed.expires_at == 1110.0 and renewed.granted_at == 1000.0
    clock.advance(50.0)  # t = 1100: past the original expiry, within the renewed one
    assert table.expire() == []
    assert table.renew(lease.lease_id, "w2") is None  # not the holder
    assert table.stats.renewals == 1 and table.stats.renewals_refused == 1
    clock.advance(10.0)  # t = 1110: the renewed lease has run out; renewing cannot revive it
    assert table.renew(lease.lease_id) is None
    assert table.expire() == [task(0)]
    assert table.renew(lease.lease_id) is None


def test_renew_worker_renews_all_its_leases(table: LeaseTable, clock: ManualClock) -> None:
    table.grant(task(0), "w1")
    table.grant(task(1), "w1")
    table.grant(task(2), "w2")
    clock.advance(40.0)
    renewed = table.renew_worker("w1")
    assert [lease.expires_at for lease in renewed] == [1100.0, 1100.0]
    clock.advance(30.0)
    assert table.expire() == [task(2)]
    assert table.renew_worker("nobody") == []


def test_release_worker_requeues_and_refuses_its_later_results(table: LeaseTable) -> None:
    a = table.grant(task(0), "w1")
    table.grant(task(1), "w2")
    c = table.grant(task(2), "w1")
    assert table.release_worker("w1") == [task(0), task(2)]
    assert table.active_count("w1") == 0 and table.stats.releases == 2
    assert table.complete(a.lease_id, "w1").reason == "expired"
    assert table.complete(c.lease_id, "w1").reason == "expired"
    assert table.release_worker("w1") == []
    # Released tasks can be granted again.
    assert table.complete(table.grant(task(0), "w3").lease_id, "w3").accepted


def test_granting_a_leased_or_completed_task_is_refused(table: LeaseTable) -> None:
    lease = table.grant(task(0), "w1")
    with pytest.raises(PreconditionError, match="already has live lease"):
        table.grant(task(0), "w2")
    table.complete(lease.lease_id, "w1")
    with pytest.raises(PreconditionError, match="already completed"):
        table.grant(task(0), "w2")


def test_renewals_do_not_grow_memory_and_expiry_stays_correct(clock: ManualClock) -> None:
    table = LeaseTable(lease_s=5.0, clock=clock)
    table.grant(task(0), "w1")
    for _ in range(10_000):
        clock.advance(1.0)
        table.renew_worker("w1")
    assert len(table._heap) <= 4 * len(table) + 64
    assert table.next_expiry() == clock.now() + 5.0
    clock.advance(5.0)
    assert table.expire() == [task(0)]


def test_bounded_history_answers_unknown(clock: ManualClock) -> None:
    table = LeaseTable(lease_s=5.0, clock=clock, max_history=1)
    first = table.grant(task(0), "w")
    table.complete(first.lease_id, "w")
    second = table.grant(task(1), "w")
    table.complete(second.lease_id, "w")
    assert table.complete(first.lease_id, "w").reason == "unknown"  # forgotten, still refused
    assert table.complete(second.lease_id, "w").reason == "duplicate"


def test_invalid_lease_length(clock: ManualClock) -> None:
    with pytest.raises(PreconditionError, match="lease_s"):
        LeaseTable(lease_s=0.0, clock=clock)
    with pytest.raises(PreconditionError, match="lease_s"):
        LeaseTable(lease_s=1.0, clock=clock).grant(task(0), "w", lease_s=float("nan"))

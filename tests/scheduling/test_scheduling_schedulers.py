"""Priority and capability schedulers (exact expectations), the registry, and the TaskPool loop."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from dist_llm_train.data import Shard
from dist_llm_train.errors import ConfigError, PreconditionError
from dist_llm_train.scheduling import (
    CapabilityScheduler,
    CapabilityTracker,
    CostTable,
    LeaseTable,
    ManualClock,
    PriorityScheduler,
    Scheduler,
    StableMatchingScheduler,
    Task,
    TaskPool,
    WorkerInfo,
    available_schedulers,
    build_scheduler,
)


def tasks(n: int, tokens: int = 100, first_id: int = 0) -> list[Task]:
    return [Task(first_id + i, first_id + i, 0, tokens, 1) for i in range(n)]


def ids(pairs: Sequence[tuple[Task, str]]) -> list[tuple[int, str]]:
    return [(t.task_id, w) for t, w in pairs]


# -- priority --------------------------------------------------------------------------------------------


def test_priority_highest_first_to_fastest_finisher() -> None:
    pending = [
        Task(0, 0, 0, 100, 1, priority=0.0),
        Task(1, 1, 0, 100, 1, priority=5.0),
        Task(2, 2, 0, 100, 1, priority=1.0),
    ]
    workers = [WorkerInfo("slow", throughput=50.0), WorkerInfo("fast", throughput=100.0)]
    assert ids(PriorityScheduler().assign(pending, workers)) == [(1, "fast"), (2, "slow")]


def test_priority_accounts_for_queue_within_round_and_ties_go_to_faster() -> None:
    pending = [Task(i, i, 0, 300, 1, priority=float(i)) for i in range(4)]
    workers = [WorkerInfo("b", capacity=3, throughput=100.0), WorkerInfo("a", capacity=3, throughput=300.0)]
    # On a: 1 s, 2 s, 3 s for its 1st, 2nd, 3rd task; on b: 3 s. The third task ties (3 s) -> faster a;
    # the fourth finds a full.
    pairs = PriorityScheduler().assign(pending, workers)
    assert ids(pairs) == [(3, "a"), (2, "a"), (1, "a"), (0, "b")]


def test_priority_skips_misfits_and_keeps_queue_order_among_equals() -> None:
    pending = [
        Task(0, 0, 0, 100, 1, priority=1.0),
        Task(1, 1, 0, 100, 1, priority=9.0, memory_bytes=64),
        Task(2, 2, 0, 100, 1, priority=1.0),
    ]
    workers = [WorkerInfo("w", capacity=1, memory_bytes=32, throughput=10.0)]
    assert ids(PriorityScheduler().assign(pending, workers)) == [(0, "w")]


def test_queued_tokens_count_against_a_worker() -> None:
    workers = [
        WorkerInfo("fast-but-busy", throughput=200.0, queued_tokens=1000),
        WorkerInfo("idle", throughput=100.0),
    ]
    assert ids(PriorityScheduler().assign(tasks(1), workers)) == [(0, "idle")]


# -- capability ------------------------------------------------------------------------------------------


def test_capability_shares_are_proportional_to_throughput() -> None:
    workers = [
        WorkerInfo("slow", capacity=10, throughput=100.0),
        WorkerInfo("fast", capacity=10, throughput=300.0),
    ]
    pairs = CapabilityScheduler().assign(tasks(8), workers)
    # Finish times after k tasks: fast k/3 s, slow k s. Ties go to the faster worker -> 6 : 2.
    assert ids(pairs) == [
        (0, "fast"),
        (1, "fast"),
        (2, "fast"),
        (3, "slow"),
        (4, "fast"),
        (5, "fast"),
        (6, "fast"),
        (7, "slow"),
    ]


def test_capability_uses_tracker_over_claims_and_prior_for_newcomers() -> None:
    tracker = CapabilityTracker(beta=0.5)
    tracker.observe("a", 3000, 1.0)
    tracker.observe("b", 1000, 1.0)
    workers = [
        WorkerInfo("a", capacity=20, throughput=1.0),  # claims are overridden by measurements
        WorkerInfo("b", capacity=20, throughput=1e6),
        WorkerInfo("new", capacity=20),  # prior = mean of measured = 2000 tok/s
    ]
    pairs = build_scheduler("capability", tracker=tracker).assign(tasks(12, tokens=1000), workers)
    counts = {w: sum(1 for _, x in pairs if x == w) for w in ("a", "b", "new")}
    assert counts == {"a": 6, "b": 2, "new": 4}


def test_capability_ignores_priority_and_serves_queue_order() -> None:
    pending = [Task(0, 0, 0, 100, 1, priority=0.0), Task(1, 1, 0, 100, 1, priority=9.0)]
    workers = [WorkerInfo("w", capacity=1, throughput=10.0)]
    assert ids(CapabilityScheduler().assign(pending, workers)) == [(0, "w")]
    assert ids(PriorityScheduler().assign(pending, workers)) == [(1, "w")]


# -- registry and validation -----------------------------------------------------------------------------


def test_registry() -> None:
    assert available_schedulers() == ["capability", "priority", "stable-matching"]
    assert isinstance(build_scheduler("stable-matching", transfer_bytes=10), StableMatchingScheduler)
    with pytest.raises(ConfigError, match="unknown scheduler 'fifo'"):
        build_scheduler("fifo")
    with pytest.raises(ConfigError, match="no parameter alpha"):
        build_scheduler("priority", alpha=1)


def test_input_validation() -> None:
    workers = [WorkerInfo("w", throughput=1.0)]
    with pytest.raises(PreconditionError, match="twice"):
        PriorityScheduler().assign([*tasks(1), *tasks(1)], workers)
    with pytest.raises(PreconditionError, match="appears twice"):
        PriorityScheduler().assign(tasks(1), [*workers, *workers])
    with pytest.raises(PreconditionError, match="free_slots"):
        PriorityScheduler().assign(tasks(1), workers, {"w": -1})
    with pytest.raises(PreconditionError, match="capacity"):
        WorkerInfo("w", capacity=-1)
    with pytest.raises(PreconditionError, match="start < end"):
        Task(0, 0, 5, 5, 1)


class _Greedy(Scheduler):
    """A broken custom scheduler: every task to worker 0, ignoring slots."""

    name = "broken"

    def decide(
        self, pending: Sequence[Task], workers: Sequence[WorkerInfo], slots: list[int], costs: CostTable
    ) -> list[tuple[int, int]]:
        return [(t, 0) for t in range(len(pending))]


def test_base_class_rejects_over_assignment_by_a_subclass() -> None:
    with pytest.raises(PreconditionError, match="more than its 1 free slots"):
        _Greedy().assign(tasks(2), [WorkerInfo("w", capacity=1)])


# -- the pool --------------------------------------------------------------------------------------------


@pytest.fixture()
def clock() -> ManualClock:
    return ManualClock()


def make_pool(clock: ManualClock, n: int = 4, scheduler: str = "capability") -> TaskPool:
    shards = [Shard(i, i * 100, (i + 1) * 100) for i in range(n)]
    return TaskPool.from_shards(shards, build_scheduler(scheduler), LeaseTable(10.0, clock), micro_batches=2)


def test_pool_schedules_within_capacity_and_leaves_the_rest_pending(clock: ManualClock) -> None:
    pool = make_pool(clock, n=5)
    workers = [WorkerInfo("a", capacity=2, throughput=100.0), WorkerInfo("b", capacity=1, throughput=100.0)]
    leases = pool.schedule(workers)
    assert len(leases) == 3 and [t.task_id for t in pool.pending] == [3, 4]
    assert pool.schedule(workers) == []  # everyone is full
    pool.complete(leases[0].lease_id, leases[0].worker_id)
    again = pool.schedule(workers)
    assert [(lease.task.task_id, lease.worker_id) for lease in again] == [(3, leases[0].worker_id)]


def test_pool_expiry_requeues_at_front_and_refuses_late_result(clock: ManualClock) -> None:
    pool = make_pool(clock, n=3, scheduler="priority")
    worker = [WorkerInfo("a", capacity=1, throughput=100.0)]
    (lease,) = pool.schedule(worker)
    assert lease.task.task_id == 0 and [t.task_id for t in pool.pending] == [1, 2]
    clock.advance(10.0)
    assert pool.expire() == [lease.task]
    assert [t.task_id for t in pool.pending] == [0, 1, 2]  # back at the front
    (second,) = pool.schedule([WorkerInfo("b", capacity=1, throughput=100.0)])
    assert second.task.task_id == 0
    assert pool.complete(lease.lease_id, "a").reason == "expired"
    assert pool.complete(second.lease_id, "b").accepted
    assert pool.done_count == 1


def test_pool_heartbeat_keeps_leases_alive(clock: ManualClock) -> None:
    pool = make_pool(clock, n=1)
    (lease,) = pool.schedule([WorkerInfo("a", throughput=100.0)])
    for _ in range(5):
        clock.advance(6.0)
        assert len(pool.heartbeat("a")) == 1
        assert pool.expire() == []
    assert pool.complete(lease.lease_id, "a").accepted


def test_pool_release_worker_requeues_keeping_order_and_priority(clock: ManualClock) -> None:
    pending = [Task(i, i, 0, 100, 1, priority=float(i)) for i in range(4)]
    pool = TaskPool(build_scheduler("priority"), LeaseTable(10.0, clock), pending)
    leases = pool.schedule([WorkerInfo("a", capacity=2, throughput=100.0)])
    assert [lease.task.task_id for lease in leases] == [3, 2]
    assert [t.task_id for t in pool.release_worker("a")] == [3, 2]
    assert [t.task_id for t in pool.pending] == [3, 2, 0, 1]
    assert [t.priority for t in pool.pending] == [3.0, 2.0, 0.0, 1.0]
    assert pool.complete(leases[0].lease_id, "a").reason == "expired"


def test_pool_feeds_tracker_and_epochs(clock: ManualClock) -> None:
    tracker = CapabilityTracker()
    pool = TaskPool.from_shards(
        [Shard(0, 0, 400), Shard(1, 400, 800)],
        build_scheduler("capability", tracker=tracker),
        LeaseTable(10.0, clock),
        micro_batches=1,
        tracker=tracker,
    )
    leases = pool.schedule([WorkerInfo("a", capacity=2)])
    assert not pool.epoch_complete
    with pytest.raises(PreconditionError, match="unfinished"):
        pool.next_epoch()
    pool.complete(leases[0].lease_id, "a", seconds=2.0)
    assert tracker.throughput("a") == pytest.approx(200.0)
    pool.complete(leases[1].lease_id, "a")
    assert pool.epoch_complete and pool.done_count == 2
    fresh = pool.next_epoch()
    assert pool.epoch == 1 and [t.task_id for t in fresh] == [2, 3]
    assert [(t.shard_id, t.start, t.end) for t in fresh] == [(0, 0, 400), (1, 400, 800)]
    assert not pool.epoch_complete and pool.pending == tuple(fresh)
    with pytest.raises(PreconditionError, match="never reused"):
        pool.add(tasks(1))

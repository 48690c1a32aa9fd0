"""Scheduling: tasks, leases, schedulers, capability tracking and failure detection, on an injected clock.

Pure logic: nothing here opens a socket, starts a thread, sleeps or reads the system time, so the same
objects run inside the ZeroMQ controller (with :class:`MonotonicClock`) and inside the discrete-event
simulator and tests (with :class:`ManualClock`).

- :class:`Task`, :class:`WorkerInfo` — a data shard as a unit of work; a worker's capacity, memory, link
  and throughput.
- :class:`CapabilityTracker` — bias-corrected EWMA of each worker's throughput and task duration.
- :class:`LeaseTable` — leases with expiry and renewal; refuses late, duplicate and foreign results, so
  each task's update is applied at most once.
- :func:`build_scheduler` — ``stable-matching`` (many-to-one Gale–Shapley, tasks propose), ``priority``,
  ``capability``; :class:`TaskPool` drives one with a lease table; :func:`throughput_ratio` measures an
  assignment against the max-weight (maximum total throughput) assignment.
- :func:`build_failure_detector` — fixed heartbeat timeout or phi-accrual.

Config: ``scheduling`` section (:class:`~dist_llm_train.config.schema.SchedulingConfig`).
"""

from __future__ import annotations

from dist_llm_train.scheduling.capability import CapabilityTracker, Ewma
from dist_llm_train.scheduling.clock import Clock, ManualClock, MonotonicClock
from dist_llm_train.scheduling.cost import CostModel, CostTable, free_slot_counts
from dist_llm_train.scheduling.failure import (
    FailureDetector,
    FixedTimeoutDetector,
    PhiAccrualDetector,
    build_failure_detector,
    phi_from_normal,
)
from dist_llm_train.scheduling.leases import CompletionResult, Lease, LeaseStats, LeaseTable, RefusalReason
from dist_llm_train.scheduling.matching import (
    DeferredAcceptance,
    assignment_throughput,
    deferred_acceptance,
    hospitals_residents,
    max_weight_assignment,
    throughput_ratio,
)
from dist_llm_train.scheduling.schedulers import (
    CapabilityScheduler,
    PriorityScheduler,
    Scheduler,
    StableMatchingScheduler,
    TaskPool,
    available_schedulers,
    build_scheduler,
)
from dist_llm_train.scheduling.types import Task, WorkerInfo

__all__ = [
    "CapabilityScheduler",
    "CapabilityTracker",
    "Clock",
    "CompletionResult",
    "CostModel",
    "CostTable",
    "DeferredAcceptance",
    "Ewma",
    "FailureDetector",
    "FixedTimeoutDetector",
    "Lease",
    "LeaseStats",
    "LeaseTable",
    "ManualClock",
    "MonotonicClock",
    "PhiAccrualDetector",
    "PriorityScheduler",
    "RefusalReason",
    "Scheduler",
    "StableMatchingScheduler",
    "Task",
    "TaskPool",
    "WorkerInfo",
    "assignment_throughput",
    "available_schedulers",
    "build_failure_detector",
    "build_scheduler",
    "deferred_acceptance",
    "free_slot_counts",
    "hospitals_residents",
    "max_weight_assignment",
    "phi_from_normal",
    "throughput_ratio",
]

"""Many-to-one stable matching (hospitals/residents) and the max-weight assignment it is measured against.

:func:`hospitals_residents` is Gale–Shapley's deferred acceptance in its many-to-one form (Gale & Shapley
1962; Roth 1984): proposers (tasks) each go to at most one receiver (worker), a receiver takes up to its
capacity. With proposers proposing, the result is stable (no task and worker would both rather be with
each other than with what they got) and proposer-optimal (every task gets the best worker it has in any
stable matching).

Stable is not the same as efficient: a stable matching can leave capacity unused that a central planner
would fill (a high-priority task that fits anywhere takes the only big-memory worker, and the task that
needed it stays pending). :func:`max_weight_assignment` computes the assignment of maximum total
throughput with ``scipy.optimize.linear_sum_assignment`` on the workers' slots, and
:func:`throughput_ratio` reports how much of that optimum an assignment reaches.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from dist_llm_train.errors import PreconditionError
from dist_llm_train.scheduling.cost import CostModel, free_slot_counts
from dist_llm_train.scheduling.types import Task, WorkerInfo

__all__ = [
    "DeferredAcceptance",
    "assignment_throughput",
    "deferred_acceptance",
    "hospitals_residents",
    "max_weight_assignment",
    "throughput_ratio",
]


def hospitals_residents(
    proposer_prefs: Sequence[Sequence[int]],
    receiver_ranks: np.ndarray | Sequence[Sequence[int]],
    capacities: Sequence[int],
) -> list[int | None]:
    """Proposer-optimal stable matching by deferred acceptance; returns each proposer's receiver or None.

    ``proposer_prefs[p]``: the receivers ``p`` finds acceptable, best first. ``receiver_ranks[r][p]``: the
    rank receiver ``r`` gives proposer ``p`` (lower is better, distinct among ``r``'s acceptable proposers),
    or a negative number when ``p`` is unacceptable to ``r``. A pair is matched only if acceptable to both.
    ``capacities[r]``: how many proposers ``r`` takes. Strict preferences are required (ties would make
    "the" proposer-optimal matching ill-defined); break ties before calling.

    Runs in O(total preference length · log capacity).
    """
    ranks = receiver_ranks.tolist() if isinstance(receiver_ranks, np.ndarray) else receiver_ranks
    n_prop, n_recv = len(proposer_prefs), len(capacities)
    if len(ranks) != n_recv:
        raise PreconditionError(
            f"hospitals_residents: {len(ranks)} receiver rank rows for {n_recv} capacities"
        )
    for r, row in enumerate(ranks):
        if len(row) != n_prop:
            raise PreconditionError(
                f"hospitals_residents: receiver {r} ranks {len(row)} proposers, expected {n_prop}"
            )
        acceptable = [x for x in row if x >= 0]
        if len(set(acceptable)) != len(acceptable):
            raise PreconditionError(f"hospitals_residents: receiver {r} has tied ranks; break ties first")
        if capacities[r] < 0:
            raise PreconditionError(f"hospitals_residents: capacity {capacities[r]} of receiver {r} < 0")
    for p, prefs in enumerate(proposer_prefs):
        if len(set(prefs)) != len(prefs) or any(not 0 <= r < n_recv for r in prefs):
            raise PreconditionError(
                f"hospitals_residents: proposer {p} lists a receiver twice or one out of range: {list(prefs)}"
            )

    choices = [
        [(r, ranks[r][p]) for r in prefs if ranks[r][p] >= 0] for p, prefs in enumerate(proposer_prefs)
    ]
    return deferred_acceptance(choices, list(capacities))


class DeferredAcceptance:
    """Incremental deferred acceptance (McVitie & Wilson 1971): proposers enter one at a time.

    Each :meth:`add` lets the new proposer propose down its list; a receiver over capacity rejects its
    worst, who proposes on, and so on until the chain ends. The final matching is the proposer-optimal
    stable one whatever the order of entry. :attr:`bar` is, per receiver, the rank a newcomer must beat
    (infinite until the receiver is full, -1 for no capacity); once full a receiver stays full, so bars
    only tighten, and a proposer ranked at or above the bar of every receiver it accepts would be rejected
    everywhere: it may be left out without changing the result (how the scheduler prunes big queues).
    """

    def __init__(self, capacities: Sequence[int]) -> None:
        self.capacities = list(capacities)
        self.bar: list[float] = [math.inf if cap > 0 else -1.0 for cap in self.capacities]
        self.match: dict[int, int] = {}
        # Per receiver a max-heap on rank (stored negated) of the proposers it holds, worst on top.
        self._held: list[list[tuple[int, int]]] = [[] for _ in self.capacities]
        self._choices: dict[int, Sequence[tuple[int, int]]] = {}
        self._next: dict[int, int] = {}

    def add(self, proposer: int, choices: Sequence[tuple[int, int]]) -> None:
        """Enter ``proposer`` with ``(receiver, rank receiver gives it)`` pairs, best receiver first."""
        self._choices[proposer] = choices
        self._next[proposer] = 0
        free = [proposer]
        bar, held, caps, match = self.bar, self._held, self.capacities, self.match
        while free:
            p = free.pop()
            options = self._choices[p]
            i, n = self._next[p], len(options)
            while i < n:
                r, rank = options[i]
                i += 1
                if rank >= bar[r]:
                    continue
                heap = held[r]
                if len(heap) < caps[r]:
                    heapq.heappush(heap, (-rank, p))
                else:
                    _, loser = heapq.heapreplace(heap, (-rank, p))
                    del match[loser]
                    free.append(loser)
                if len(heap) == caps[r]:
                    bar[r] = -heap[0][0]
                match[p] = r
                break
            self._next[p] = i


def deferred_acceptance(
    choices: Sequence[Sequence[tuple[int, int]]], capacities: Sequence[int]
) -> list[int | None]:
    """The core of :func:`hospitals_residents` without input checks, for callers that build valid input.

    ``choices[p]``: ``(receiver, rank receiver gives p)`` for every mutually acceptable receiver, best
    first for ``p``; ranks must be strict per receiver. Returns each proposer's receiver or None.
    """
    da = DeferredAcceptance(capacities)
    for p, options in enumerate(choices):
        da.add(p, options)
    return [da.match.get(p) for p in range(len(choices))]


def max_weight_assignment(
    pending: Sequence[Task],
    workers: Sequence[WorkerInfo],
    free_slots: Mapping[str, int] | None = None,
    *,
    cost: CostModel | None = None,
) -> list[tuple[Task, str]]:
    """The assignment of maximum total throughput (sum over pairs of tokens / expected completion time).

    Each worker contributes one column per free slot (at most one per task), each task one row; memory
    misfits weigh 0 and are dropped from the result. Pairs are valued in the same model as the stable
    matching's preferences (a pair's completion time does not depend on what else the worker got in the
    round), so :func:`throughput_ratio` compares like with like. Returns pairs in ``pending`` order.
    """
    cost = CostModel() if cost is None else cost
    slots = free_slot_counts(workers, free_slots)
    if not pending or not any(slots):
        return []
    rate = cost.table(pending, workers).rate
    columns = np.repeat(np.arange(len(workers)), [min(s, len(pending)) for s in slots])
    weights = rate[:, columns]
    rows, cols = linear_sum_assignment(weights, maximize=True)
    return [
        (pending[t], workers[columns[c]].worker_id)
        for t, c in sorted(zip(rows.tolist(), cols.tolist(), strict=True))
        if weights[t, c] > 0.0
    ]


def assignment_throughput(
    assignment: Sequence[tuple[Task, str]], workers: Sequence[WorkerInfo], *, cost: CostModel | None = None
) -> float:
    """Total tokens per second of an assignment: sum over pairs of ``n_tokens / completion_s``."""
    cost = CostModel() if cost is None else cost
    by_id = {w.worker_id: w for w in workers}
    total = 0.0
    for task, worker_id in assignment:
        worker = by_id.get(worker_id)
        if worker is None:
            raise PreconditionError(f"assignment names worker {worker_id!r}, which is not in the worker list")
        if not worker.fits(task):
            raise PreconditionError(
                f"assignment puts task {task.task_id} ({task.memory_bytes} bytes) on worker {worker_id!r} "
                f"with {worker.memory_bytes} bytes"
            )
        total += task.n_tokens / cost.completion_s(task, worker)
    return total


def throughput_ratio(
    assignment: Sequence[tuple[Task, str]],
    pending: Sequence[Task],
    workers: Sequence[WorkerInfo],
    free_slots: Mapping[str, int] | None = None,
    *,
    cost: CostModel | None = None,
) -> float:
    """Throughput of ``assignment`` divided by that of :func:`max_weight_assignment` on the same round.

    In (0, 1] for any stable matching (one exists with at least one pair whenever any pair is feasible);
    1.0 when nothing at all can be assigned. Rounding can only push it a hair above 1, which is clipped.
    A ratio well below 1 means memory limits or priorities are leaving fast capacity idle: consider the
    ``capability`` scheduler, or more memory-homogeneous tasks.
    """
    best = assignment_throughput(
        max_weight_assignment(pending, workers, free_slots, cost=cost), workers, cost=cost
    )
    if best == 0.0:
        return 1.0
    return min(1.0, assignment_throughput(assignment, workers, cost=cost) / best)

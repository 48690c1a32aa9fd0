"""Column-blocked loops over [rows, d] data, spread over Python threads (shared by the aggregation kernels)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

__all__ = ["column_blocks"]

S = TypeVar("S")


def column_blocks(
    d: int, width: int, device: torch.device, make_state: Callable[[], S], step: Callable[[S, int, int], None]
) -> list[S]:
    """Run ``step(state, c0, c1)`` over column blocks of ``width``; one contiguous range per thread.

    On the CPU the ranges are spread over ``torch.get_num_threads()`` Python threads, each with its own
    ``state`` (buffers, partial sums): torch ops release the GIL, and ops on cache-sized blocks are too
    small for torch's own intra-op threads to pay off (an OpenMP fork/join per small op costs more than
    the op, and far more on an oversubscribed machine).  Returns the states in range order, so that
    reductions over them are deterministic for a given thread count.
    """
    n_blocks = -(-d // width)
    threads = 1 if device.type != "cpu" else max(1, min(torch.get_num_threads(), n_blocks))
    per_thread = -(-n_blocks // threads)
    states = [make_state() for _ in range(threads)]

    def work(t: int) -> None:
        c0 = t * per_thread * width
        end = min(d, (t + 1) * per_thread * width)
        while c0 < end:
            c1 = min(end, c0 + width)
            step(states[t], c0, c1)
            c0 = c1

    if threads == 1:
        work(0)
    else:
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="aggregation") as pool:
            for future in [pool.submit(work, t) for t in range(threads)]:
                future.result()
    return states

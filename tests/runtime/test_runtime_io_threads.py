"""libzmq's background threads start below the priority of the thread that handles messages."""

from __future__ import annotations

import os
import threading

import pytest
import zmq

from dist_llm_train.runtime.io_threads import start_io_threads


def _nice(tid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)


def test_the_context_threads_start_lower_and_the_caller_keeps_its_priority() -> None:
    caller = threading.get_native_id()
    base = _nice(caller)
    context = zmq.Context(io_threads=2)
    try:
        lowered = start_io_threads(context, nice=3)
        assert len(lowered) == 3  # two I/O threads and the reaper
        assert caller not in lowered
        assert [_nice(tid) for tid in lowered] == [min(19, base + 3)] * 3
        assert _nice(caller) == base
        # A started context has no new threads to find: nothing else is touched.
        assert start_io_threads(context, nice=3) == []
        # The context still works.
        pull = context.socket(zmq.PULL)
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push = context.socket(zmq.PUSH)
        push.connect(f"tcp://127.0.0.1:{port}")
        push.send(b"ping")
        assert pull.poll(5000) and pull.recv() == b"ping"
        push.close(linger=0)
        pull.close(linger=0)
    finally:
        context.term()


def test_nice_zero_changes_nothing_and_a_negative_one_is_refused() -> None:
    context = zmq.Context()
    try:
        assert start_io_threads(context, nice=0) == []
        with pytest.raises(ValueError, match="0 or more"):
            start_io_threads(context, nice=-1)
    finally:
        context.term()

"""Start a ZeroMQ context's background threads at a lower priority than the thread that handles messages.

libzmq receives on its own I/O thread and hands complete messages to the thread that calls ``recv``. When
both share a CPU at the same priority, the kernel lets the I/O thread preempt the handler whenever more
bytes arrive: the handler is interrupted in the middle of a message (validation, the finiteness check over
the update) while the I/O thread writes the next multi-megabyte message, and then resumes, most likely on
data that the next message has pushed out of the CPU's cache (the preemptions and the rates below are
measured; the cache is our reading of them). Lowered below the handler, the I/O thread reads ahead only
while the handler waits, which is when it has nothing else to do.

Measured with ``benchmarks/wire.py``'s controller path (session 12; 4 MB updates, the receiving side on one
CPU): the handler was preempted 200-217 times per 400 updates at equal priority and 19-49 times with the I/O
thread at nice +5; ingest went from 0.66-0.78 to 0.71-0.85 of raw ZeroMQ over ten rounds each, and the
benchmark's headline from 0.698-0.708 to 0.758-0.775 in three runs of each, alternating. With a CPU to
itself the I/O thread is never in the handler's way and the setting changes nothing.

Symptom → setting: a controller that has to share its CPUs and falls behind its workers' pushes keeps the
default (:data:`IO_THREAD_NICE`); ``0`` leaves libzmq's threads as they start. Linux only (``nice`` is a
per-thread attribute there); elsewhere nothing is changed.
"""

from __future__ import annotations

import logging
import os
import sys

import zmq

__all__ = ["IO_THREAD_NICE", "start_io_threads"]

log = logging.getLogger(__name__)

IO_THREAD_NICE = 5
_MAX_NICE = 19


def _thread_ids() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/task")}


def start_io_threads(context: zmq.Context, *, nice: int = IO_THREAD_NICE) -> list[int]:
    """Start ``context``'s I/O and reaper threads now, ``nice`` steps below the calling process's priority.

    Call it right after creating the context, before any socket and before this process starts threads of
    its own: the new threads are told apart from the others as the ones that appear while a throwaway
    socket starts the context. Returns the native ids of the threads it lowered: ``[]`` for a ``nice`` of 0,
    not Linux, a context already started, or new threads it could not attribute to libzmq alone.
    """
    if nice < 0:
        raise ValueError(f"nice must be 0 or more (a lower priority), got {nice}")
    if nice == 0 or not sys.platform.startswith("linux"):
        return []
    before = _thread_ids()
    probe = context.socket(zmq.PAIR)  # the first socket of a context starts its background threads
    probe.close(linger=0)
    started = sorted(_thread_ids() - before)
    expected = int(context.get(zmq.IO_THREADS)) + 1  # the I/O threads and the reaper
    if len(started) != expected:
        log.debug("expected %d new ZeroMQ threads, saw %d: priorities left alone", expected, len(started))
        return []
    lowered = []
    for tid in started:
        try:
            current = os.getpriority(os.PRIO_PROCESS, tid)
            # On Linux, PRIO_PROCESS with a thread id sets that one thread's nice value.
            os.setpriority(os.PRIO_PROCESS, tid, min(_MAX_NICE, current + nice))
        except OSError as exc:  # a sandbox that forbids it: that thread runs as libzmq started it
            log.debug("could not lower the priority of ZeroMQ thread %d: %s", tid, exc)
            continue
        lowered.append(tid)
    return lowered

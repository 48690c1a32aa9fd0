"""Controller ingest rate of pushed updates vs raw ZeroMQ PUSH/PULL of the same bytes, on loopback.

Both sides run in the same invocation, alternating rounds, so machine load hits both alike:

- **raw**: a sender process pushes ``--messages`` frames of ``4 x --numel`` bytes over a ZeroMQ PUSH
  socket; the receiver PULLs them and does nothing else. This is the ceiling of the transport.
- **controller**: a sender process (a worker's DEALER) sends protocol PUSH messages carrying an fp32
  update of ``--numel`` values as zero-copy frames; the receiver is the controller's path: ROUTER receive
  with protocol validation (:func:`router_recv`), payload validation (:func:`decode_payload`), the
  controller's decode (:func:`~dist_llm_train.compression.decode_view`), admission checks (shape,
  finiteness by one reduction), a cheap submit (the update is kept in a bounded buffer, as the
  coordinator keeps updates until its next step) and a PUSH_ACK back to the sender. ``--curve`` adds the same two paths with CurveZMQ encryption
  (*raw+curve*: PUSH/PULL of the raw bytes over an encrypted connection, the ceiling of an encrypted link),
  which separates the cost of encryption (raw+curve vs raw) from the controller's own work on an encrypted
  link (controller+curve vs raw+curve). ``--ablate-check`` adds *controller-no-check*: the controller path
  without the finiteness reduction, to show what share of the gap that one pass over the payload is.

The receiving side runs on one pinned CPU (``--cpu``) and the sender on the others, for both paths, as a
controller and its workers run on machines of their own. Left to the scheduler on a 2-CPU machine, the
four busy threads (two per process) landed differently from run to run: per-round ratios of one run fell
into two groups around 0.63 and 0.78 (session 11); pinned, they were 0.67-0.74. The receiving process also
runs with the controller's allocator settings (:func:`~dist_llm_train.runtime.allocator.retain_freed_buffers`),
and both receiving contexts start their ZeroMQ threads as the controller does, below the receiving thread's
priority (:func:`~dist_llm_train.runtime.io_threads.start_io_threads`).

Rates are updates per second between the first and the last update received (the first ``--warmup``
updates excluded). Each controller run is compared with the mean of the raw runs just before and after it
(a last raw run closes the sequence), and the median of these per-round ratios is the result; the target
is controller >= 70% of raw (both plaintext).

    python benchmarks/wire.py --numel 1000000 --messages 300 --rounds 3 --json runs/bench/wire.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from collections import deque
from pathlib import Path

import torch
import zmq
from rich.console import Console
from rich.table import Table

from dist_llm_train.compression import NoneCodec, decode_view
from dist_llm_train.coordination.flat import all_finite
from dist_llm_train.runtime.allocator import retain_freed_buffers
from dist_llm_train.runtime.io_threads import IO_THREAD_NICE, start_io_threads
from dist_llm_train.runtime.protocol import Limits, Push, PushAck, decode_payload, encode_message
from dist_llm_train.runtime.security import (
    CurveClient,
    CurveServer,
    generate_keys,
    load_keypair,
    load_public_key,
)
from dist_llm_train.runtime.transport import make_dealer, make_router, router_recv, router_send
from paired import machine_description, paired_ratio, round_ratios, split_cpus


def _raw_sender(endpoint: str, numel: int, messages: int, keys: str | None = None) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    if keys is not None:
        CurveClient(
            load_keypair(Path(keys) / "worker.key_secret"), load_public_key(Path(keys) / "controller.key")
        ).apply(sock)
    sock.setsockopt(zmq.LINGER, -1)
    sock.connect(endpoint)
    buf = memoryview(torch.randn(numel).numpy()).cast("B")
    for _ in range(messages):
        sock.send(buf, copy=False)
    sock.close()
    ctx.term()


def _protocol_sender(endpoint: str, numel: int, messages: int, keys: str | None) -> None:
    torch.set_num_threads(1)
    ctx = zmq.Context()
    curve = None
    if keys is not None:
        curve = CurveClient(
            load_keypair(Path(keys) / "worker.key_secret"), load_public_key(Path(keys) / "controller.key")
        )
    sock = make_dealer(ctx, Limits.for_params(numel), curve=curve, insecure=curve is None)
    sock.setsockopt(zmq.LINGER, -1)
    sock.connect(endpoint)
    payload = NoneCodec().encode(torch.randn(numel))
    acks = 0
    for i in range(messages):
        push = Push(base_version=0, lease_id=i, task_id=i, tokens=1, loss=1.0)
        sock.send_multipart(encode_message(push, payload), copy=False)
        # Drain acknowledgements as they come, as a worker does: a non-blocking receive until none is queued
        # (socket.poll would build a Poller per call, which the worker's receive path avoids too).
        while True:
            try:
                sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            acks += 1
    while acks < messages and sock.poll(30_000):
        sock.recv_multipart()
        acks += 1
    sock.close()
    ctx.term()


# CPUs the sending process is pinned to (None: left to the scheduler); set by main from --cpu.
_SENDER_CPUS: frozenset[int] | None = None


def _start_sender(sender: mp.process.BaseProcess) -> None:
    sender.start()
    if _SENDER_CPUS is not None and sender.pid is not None:
        # Set before the child has imported torch and zmq, so the threads it starts inherit it.
        os.sched_setaffinity(sender.pid, _SENDER_CPUS)


def _rate(times: list[float], warmup: int) -> float:
    kept = times[warmup:]
    return (len(kept) - 1) / (kept[-1] - kept[0])


def run_raw(numel: int, messages: int, warmup: int, keys: Path | None = None) -> float:
    ctx = zmq.Context()
    start_io_threads(ctx)  # as the controller runs them (its receiving thread waits in recv here anyway)
    server = None
    if keys is not None:
        # The same CurveServer (keys + ZAP allow-list) as the controller path: only the protocol work differs.
        server = CurveServer(ctx, load_keypair(keys / "controller.key_secret"), keys / "allow").start()
    sock = ctx.socket(zmq.PULL)
    if server is not None:
        server.apply(sock)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    sender = mp.get_context("spawn").Process(
        target=_raw_sender,
        args=(f"tcp://127.0.0.1:{port}", numel, messages, None if keys is None else str(keys)),
    )
    _start_sender(sender)
    times = []
    for _ in range(messages):
        frame = sock.recv(copy=False)
        assert len(frame) == 4 * numel
        times.append(time.perf_counter())
    sender.join()
    sock.close()
    if server is not None:
        server.stop()
    ctx.term()
    return _rate(times, warmup)


def run_controller(
    numel: int, messages: int, warmup: int, keys: Path | None, *, check_finite: bool = True
) -> float:
    ctx = zmq.Context()
    start_io_threads(ctx)  # the controller's setting: its I/O threads yield to the handling thread
    limits = Limits.for_params(numel)
    server = None
    if keys is not None:
        server = CurveServer(ctx, load_keypair(keys / "controller.key_secret"), keys / "allow").start()
    sock = make_router(ctx, limits, curve=server, insecure=server is None)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    sender = mp.get_context("spawn").Process(
        target=_protocol_sender,
        args=(f"tcp://127.0.0.1:{port}", numel, messages, None if keys is None else str(keys)),
    )
    _start_sender(sender)
    buffer: deque[torch.Tensor] = deque(maxlen=4)
    times = []
    try:
        while len(times) < messages:
            inbound = router_recv(sock, limits, timeout_s=60.0)
            assert inbound is not None, "the sender stopped sending"
            msg = inbound.message
            assert isinstance(msg, Push)
            encoded = decode_payload(inbound.frames)
            assert encoded.numel == numel
            vector = decode_view(encoded)  # the controller's own decode step
            # Admission checks (shape, and finiteness with the coordinator's own all_finite: one sum on
            # the finite path), then the cheapest possible "submit": keep the update in a buffer, as the
            # coordinator does until its next step.
            assert vector.dim() == 1
            if check_finite:
                assert all_finite(vector)
            buffer.append(vector)
            router_send(sock, inbound.routing_id, PushAck(ref=msg.id, accepted=True, staleness=0, version=0))
            times.append(time.perf_counter())
        sender.join()
    finally:
        sock.close()
        if server is not None:
            server.stop()
        ctx.term()
    return _rate(times, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--numel", type=int, default=1_000_000, help="update size in float32 values")
    parser.add_argument("--messages", type=int, default=300, help="updates per measurement")
    parser.add_argument("--warmup", type=int, default=20, help="updates excluded at the start")
    parser.add_argument("--rounds", type=int, default=3, help="alternating raw/controller rounds (median)")
    parser.add_argument("--curve", action="store_true", help="also measure the controller path with CurveZMQ")
    parser.add_argument(
        "--ablate-check",
        action="store_true",
        help="also measure the controller path without the finiteness check",
    )
    parser.add_argument(
        "--cpu",
        type=int,
        default=max(os.sched_getaffinity(0)),
        help="CPU for the receiving side (raw PULL or the controller path, with its ZeroMQ I/O thread); the "
        "sender gets the others (default: the highest-numbered CPU; -1: no pinning)",
    )
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    global _SENDER_CPUS
    split = split_cpus(args.cpu)
    if split is not None:
        # Before any ZeroMQ context exists: its I/O threads inherit the affinity.
        os.sched_setaffinity(0, split[0])
        _SENDER_CPUS = split[1]
    # This process receives for both paths: with the allocator settings the controller process runs with.
    retain_freed_buffers()
    keys_dir = None
    tmp = tempfile.TemporaryDirectory()
    if args.curve:
        keys_dir = Path(tmp.name)
        generate_keys(keys_dir, "controller")
        public, _ = generate_keys(keys_dir, "worker")
        (keys_dir / "allow").mkdir()
        (keys_dir / "allow" / "worker.key").write_bytes(public.read_bytes())
    results: dict[str, list[float]] = {
        "raw": [],
        "controller": [],
        "controller-no-check": [],
        "raw+curve": [],
        "controller+curve": [],
    }
    for _ in range(args.rounds):
        results["raw"].append(run_raw(args.numel, args.messages, args.warmup))
        results["controller"].append(run_controller(args.numel, args.messages, args.warmup, None))
        if args.ablate_check:
            results["controller-no-check"].append(
                run_controller(args.numel, args.messages, args.warmup, None, check_finite=False)
            )
        if args.curve:
            results["raw+curve"].append(run_raw(args.numel, args.messages, args.warmup, keys_dir))
            results["controller+curve"].append(
                run_controller(args.numel, args.messages, args.warmup, keys_dir)
            )
    # One more raw run closes the sequence, so every controller run sits between two raw runs.
    results["raw"].append(run_raw(args.numel, args.messages, args.warmup))
    if args.curve:
        results["raw+curve"].append(run_raw(args.numel, args.messages, args.warmup, keys_dir))
    tmp.cleanup()
    nbytes = 4 * args.numel
    medians = {k: statistics.median(v) for k, v in results.items() if v}
    # Headline: each controller run against the mean of the raw runs just before and after it, median over
    # rounds; machine speed drifts between rounds, and pooled medians would mix runs from different speeds.
    per_round = round_ratios(results["controller"], results["raw"])
    ratio = statistics.median(per_round)
    table = Table(
        title=f"ingest of {args.numel:,}-float fp32 updates over loopback ({args.rounds} rounds, median)"
    )
    for col in ("path", "updates/s", "GB/s", "median vs raw median", "all rounds (updates/s)"):
        table.add_column(col, justify="left" if col == "path" else "right")
    for key, value in medians.items():
        table.add_row(
            key,
            f"{value:,.1f}",
            f"{value * nbytes / 1e9:.2f}",
            f"{value / medians['raw']:.2f}",
            ", ".join(f"{v:,.0f}" for v in results[key]),
        )
    Console().print(table)
    print(
        f"controller / raw = {ratio:.2f} (paired per round: {', '.join(f'{r:.2f}' for r in per_round)}; "
        f"ratio of medians {medians['controller'] / medians['raw']:.2f}) (target >= 0.70): "
        f"{'met' if ratio >= 0.7 else 'MISSED'}"
    )
    no_check_ratio = None
    if args.ablate_check:
        no_check_ratio = paired_ratio(results["controller-no-check"], results["raw"])
        print(f"without the finiteness check: controller-no-check / raw = {no_check_ratio:.2f} (paired)")
    curve_ratio = None
    if args.curve:
        curve_ratio = paired_ratio(results["controller+curve"], results["raw+curve"])
        print(
            f"with CurveZMQ: raw+curve / raw = {medians['raw+curve'] / medians['raw']:.2f} (cost of "
            f"encryption), controller+curve / raw+curve = {curve_ratio:.2f} (the controller's share)"
        )
    if args.json:
        out = {
            "numel": args.numel,
            "messages": args.messages,
            "rounds": args.rounds,
            "results": results,
            "medians": medians,
            "ratio": ratio,
            "round_ratios": per_round,
            "ratio_of_medians": medians["controller"] / medians["raw"],
            "ratio_curve_vs_raw_curve": curve_ratio,
            "ratio_without_finiteness_check": no_check_ratio,
            "target": 0.7,
            "met": ratio >= 0.7,
            "placement": None
            if _SENDER_CPUS is None
            else {"receiver": sorted(os.sched_getaffinity(0)), "sender": sorted(_SENDER_CPUS)},
            "receiver_io_thread_nice": IO_THREAD_NICE,
            "machine": {**machine_description(), "zmq": zmq.zmq_version()},
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()

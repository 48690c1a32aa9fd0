"""The worker's handling of pulled parameters (no sockets: PARAMS messages built as the wire delivers them)
and the order of its work within a task."""

from __future__ import annotations

import torch

from dist_llm_train.compression import build_codec
from dist_llm_train.config import load_config
from dist_llm_train.coordination import ComputedUpdate
from dist_llm_train.runtime.protocol import (
    Limits,
    MessageType,
    Params,
    PushAck,
    TaskAssign,
    decode_message,
    encode_message,
)
from dist_llm_train.runtime.transport import Received
from dist_llm_train.runtime.worker import Worker, WorkerOptions

NUMEL = 300_000  # 1.2 MB: above PIECE_BYTES, so an encrypted link sends it in pieces


def _received(message: Params, values: torch.Tensor, *, split: bool) -> Received:
    frames = [bytes(f) for f in encode_message(message, build_codec("none").encode(values), split=split)]
    msg, payload = decode_message(frames, Limits.for_params(NUMEL))
    return Received(msg, payload, sum(len(f) for f in frames))


def _worker() -> Worker:
    worker = Worker(WorkerOptions(controller="tcp://127.0.0.1:1", insecure=True))
    worker.numel = NUMEL
    return worker


def _address(frame: memoryview) -> int:
    return torch.frombuffer(frame, dtype=torch.uint8).data_ptr()


def _pull_full(worker: Worker, *, seed: int, split: bool) -> tuple[torch.Tensor, Received]:
    """Pull full parameters at version 3; returns them and the reply (whose frames the worker may hold)."""
    params = torch.randn(NUMEL, generator=torch.Generator().manual_seed(seed))
    reply = _received(Params(ref=1, version=3, numel=NUMEL), params, split=split)
    assert worker._apply_params(reply) is None
    assert worker._params is not None and torch.equal(worker._params, params)
    return params, reply


def test_full_parameters_joined_from_pieces_are_held_without_another_copy() -> None:
    worker = _worker()
    _, reply = _pull_full(worker, seed=0, split=True)
    assert worker._params is not None and worker._params.data_ptr() == _address(reply.frames[1])
    assert worker._version == 3 and worker.report.pulls_full == 1


def test_full_parameters_in_a_received_frame_are_copied_out() -> None:
    worker = _worker()
    _, reply = _pull_full(worker, seed=1, split=False)
    assert worker._params is not None
    # Not a view of the frame: holding it would hold the network buffer until the next pull.
    frame_start = _address(reply.frames[1])
    assert not frame_start <= worker._params.data_ptr() < frame_start + len(reply.frames[1])


def test_a_delta_is_added_to_the_parameters_held_and_leaves_them_alone() -> None:
    worker = _worker()
    params, _ = _pull_full(worker, seed=2, split=True)
    delta = torch.randn(NUMEL, generator=torch.Generator().manual_seed(3))
    held = worker._params
    assert held is not None
    before = held.clone()
    reply = _received(Params(ref=2, version=4, base_version=3, numel=NUMEL), delta, split=True)
    assert worker._apply_params(reply) is None
    assert worker._params is not None and torch.equal(worker._params, params + delta)
    assert torch.equal(held, before)  # a new tensor: the previous version's buffer is not written to
    assert (worker._version, worker.report.pulls_delta) == (4, 1)
    # A delta from a version this worker does not hold is refused.
    stale = _received(Params(ref=3, version=6, base_version=5, numel=NUMEL), delta, split=False)
    assert worker._apply_params(stale) == "error" and worker._version == 4


class _RecordingEngine:
    """Stands in for the WorkerEngine: records the calls the task makes, in order."""

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def compute(self, params: torch.Tensor, version: int, item: object) -> ComputedUpdate:
        self.calls.append("compute")
        return ComputedUpdate(vector=params * 0.5, base_version=version, tokens=8, loss=1.0)

    def encode(self, vector: torch.Tensor, *, defer_residual: bool = False) -> object:
        self.calls.append(f"encode(defer_residual={defer_residual})")
        return build_codec("none").encode(vector)

    def settle(self) -> None:
        self.calls.append("settle")

    def observe_staleness(self, staleness: int) -> None:
        self.calls.append("ack")


def test_the_error_feedback_residual_is_formed_after_the_push_is_sent() -> None:
    worker = _worker()
    _pull_full(worker, seed=4, split=False)
    calls: list[str] = []
    worker.engine = _RecordingEngine(calls)  # type: ignore[assignment]
    worker.cfg = load_config("distributed-default")
    worker._send = lambda message, payload=(), **_: calls.append(f"send {message.TYPE.value}")  # type: ignore[method-assign]
    ack = PushAck(ref=1, accepted=True, staleness=0, version=3)
    worker._receive = lambda message, **_: Received(ack, [], 0)  # type: ignore[method-assign]
    assign = TaskAssign(
        ref=1,
        lease_id=1,
        task_id=1,
        shard_id=0,
        start=0,
        end=1000,
        micro_batches=1,
        batch_seed=1,
        lease_s=30.0,
        version=3,
    )
    assert worker._run_task(assign) == "done"
    push = calls.index(f"send {MessageType.PUSH.value}")
    # Encoded without its residual, pushed (and the next task asked for), and only then the residual,
    # before the worker waits for the controller's reply.
    assert calls[: push + 1] == ["compute", "encode(defer_residual=True)", f"send {MessageType.PUSH.value}"]
    assert calls[push + 1 :] == [f"send {MessageType.TASK_REQUEST.value}", "settle", "ack"]

"""The worker's handling of pulled parameters (no sockets: PARAMS messages built as the wire delivers them)."""

from __future__ import annotations

import torch

from dist_llm_train.compression import build_codec
from dist_llm_train.runtime.protocol import Limits, Params, decode_message, encode_message
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

"""The controller's decisions, message by message, on a manual clock (no sockets, no sleeps).

:class:`ControllerCore` is what the controller process runs behind its ROUTER socket; these tests hand it
validated messages as the transport would (:class:`Inbound`) and check its replies, its counters and the
state of the coordination objects it drives.
"""

from __future__ import annotations

import json
import math
import urllib.request
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch

from dist_llm_train.compression import Encoded, NoneCodec, build_codec, decode
from dist_llm_train.config import RunConfig, build_config
from dist_llm_train.coordination import flatten_params
from dist_llm_train.data import PreparedData, prepare_data
from dist_llm_train.models import build_model, resolve_model_shapes
from dist_llm_train.runtime.controller import ControllerCore, Outgoing, run_config_payload
from dist_llm_train.runtime.metrics import PrometheusExporter, summarize_snapshot, summarize_url
from dist_llm_train.runtime.protocol import (
    ErrorReply,
    Heartbeat,
    HeartbeatAck,
    Leave,
    Message,
    NoTask,
    Params,
    ProtocolError,
    Pull,
    Push,
    PushAck,
    Register,
    RegisterOk,
    Shutdown,
    TaskAssign,
    TaskRequest,
)
from dist_llm_train.runtime.state import load_controller_checkpoint, save_controller_checkpoint
from dist_llm_train.runtime.transport import Inbound
from dist_llm_train.scheduling import ManualClock

SHAKESPEARE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def _config(cache: Path, **sections: dict[str, Any]) -> RunConfig:
    base: dict[str, Any] = {
        "model": {"preset": "custom", "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16},
        "data": {
            "corpus": "files",
            "path": str(SHAKESPEARE),
            "max_bytes": 40_000,
            "shard_tokens": 2048,
            "cache_dir": str(cache),
        },
        "training": {"seed": 7, "max_steps": 50, "batch_size": 4, "lr": 1e-3, "warmup_steps": 0},
        "cluster": {"workers": 3},
        "sync": {"mode": "async", "buffer_size": 2, "max_staleness": 4},
        "aggregation": {"rule": "mean"},
        "scheduling": {"lease_s": 5.0, "heartbeat_interval_s": 1.0, "failure_timeout_s": 3.0},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return build_config(base)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("controller-cache")


class Harness:
    """A core plus helpers that play workers: each call goes through ``handle`` like a received message."""

    def __init__(self, cfg: RunConfig, data: PreparedData, **kwargs: Any) -> None:
        self.cfg = cfg
        self.data = data
        self.clock = ManualClock()
        self.events: list[tuple[str, dict[str, Any]]] = []
        shapes = resolve_model_shapes(cfg.model)
        torch.manual_seed(cfg.training.seed)
        self.model = build_model(cfg.model, data.tokenizer.vocab_size)
        self.initial = flatten_params(self.model)
        self.core = ControllerCore(
            cfg,
            data=data,
            initial_params=self.initial,
            model_shapes=shapes,
            clock=self.clock,
            emit=lambda event, **fields: self.events.append((event, fields)),
            **kwargs,
        )
        self.numel = self.initial.numel()

    def send(self, worker: str, message: Message, payload: Any = ()) -> list[Outgoing]:
        if isinstance(payload, Encoded):
            frames = [memoryview(bytes(f)) for f in payload.to_frames()]
        else:
            frames = [memoryview(bytes(f)) for f in payload]
        inbound = Inbound(
            message=message,
            frames=frames,
            nbytes=200 + sum(len(f) for f in frames),
            routing_id=worker.encode(),
            worker_id=worker,
            peer_key=None,
        )
        return self.core.handle(inbound)

    def one(self, worker: str, message: Message, payload: Any = ()) -> Message:
        out = self.send(worker, message, payload)
        assert len(out) == 1, out
        assert out[0].routing_id == worker.encode()
        return out[0].message

    def register(self, worker: str) -> RegisterOk:
        reply = self.one(worker, Register(name=worker, device="cpu"))
        assert isinstance(reply, RegisterOk)
        return reply

    def task(self, worker: str) -> TaskAssign:
        reply = self.one(worker, TaskRequest())
        assert isinstance(reply, TaskAssign), reply
        return reply

    def push(self, worker: str, assign: TaskAssign, vector: torch.Tensor, base: int | None = None) -> PushAck:
        payload = NoneCodec().encode(vector)
        push = Push(
            base_version=assign.version if base is None else base,
            lease_id=assign.lease_id,
            task_id=assign.task_id,
            tokens=1,
            loss=2.0,
        )
        reply = self.send(worker, push, payload)[0].message
        assert isinstance(reply, PushAck), reply
        return reply


@pytest.fixture(scope="module")
def data(cache: Path) -> PreparedData:
    cfg = _config(cache)
    return prepare_data(cfg.data, block_size=16)


def _grad(numel: int, seed: int) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(seed)) * 0.01


def test_register_sends_the_run_config_and_the_data_fingerprint(cache: Path, data: PreparedData) -> None:
    h = Harness(_config(cache), data)
    ok = h.register("w1")
    assert ok.worker_id == "w1" and ok.version == 0
    assert ok.heartbeat_interval_s == 1.0 and ok.lease_s == 5.0
    payload = json.loads(ok.config_json)
    assert payload["data_fingerprint"] == data.fingerprint
    assert payload["numel"] == h.numel
    assert build_config(payload["run_config"]) == h.cfg
    assert ok.config_json == run_config_payload(
        h.cfg, data.fingerprint, h.numel, resolve_model_shapes(h.cfg.model)
    )
    assert [e for e, _ in h.events] == ["register"]


def test_unregistered_workers_are_told_to_register(cache: Path, data: PreparedData) -> None:
    h = Harness(_config(cache), data)
    reply = h.one("ghost", TaskRequest())
    assert isinstance(reply, ErrorReply) and reply.code == "not-registered"
    ack = h.one("ghost", Heartbeat())
    assert isinstance(ack, HeartbeatAck) and ack.registered is False
    assert h.core.protocol_errors["not-registered"] == 1


def test_pull_full_and_push_steps_the_server(cache: Path, data: PreparedData) -> None:
    h = Harness(_config(cache), data)
    h.register("w1")
    h.register("w2")
    a1, a2 = h.task("w1"), h.task("w2")
    assert a1.task_id != a2.task_id and a1.version == 0
    out = h.send("w1", Pull())
    params = out[0].message
    assert isinstance(params, Params) and params.base_version is None and params.numel == h.numel
    assert torch.equal(decode(out[0].payload).reshape(-1), h.initial)  # type: ignore[arg-type]
    ack1 = h.push("w1", a1, _grad(h.numel, 1))
    assert ack1.accepted and ack1.version == 0  # buffer of 2: no step yet
    ack2 = h.push("w2", a2, _grad(h.numel, 2))
    assert ack2.accepted and ack2.version == 1
    assert not torch.equal(h.core.server.params, h.initial)
    stats = h.core.coordinator.stats
    assert stats.accepted == 2 and stats.steps == 1
    # Tokens come from the task definition, not from the worker's claim (it said 1).
    assert stats.tokens == 2 * h.core.tokens_per_task


def test_full_pulls_share_the_server_copy_which_later_steps_leave_alone(
    cache: Path, data: PreparedData
) -> None:
    # PARAMS frames are views of the server's stored copy, sent zero-copy: a send still in flight when the
    # server steps on (or drops that version from its history) must still carry the version it named.
    h = Harness(_config(cache, sync={"buffer_size": 1, "history": 1}), data)
    h.register("w1")
    first = h.send("w1", Pull())[0].payload
    assert isinstance(first, Encoded)
    assert first.buffers[0].data_ptr() == h.core.server.stored(0).data_ptr()  # type: ignore[union-attr]
    for seed in range(3):
        h.push("w1", h.task("w1"), _grad(h.numel, seed), base=h.core.version)
    assert h.core.version == 3 and h.core.server.stored(0) is None
    assert torch.equal(decode(first).reshape(-1), h.initial)
    now = h.send("w1", Pull())[0].payload
    assert torch.equal(decode(now).reshape(-1), h.core.server.params)  # type: ignore[arg-type]


def test_delta_pulls_reconstruct_the_parameters(cache: Path, data: PreparedData) -> None:
    h = Harness(_config(cache, sync={"buffer_size": 1}), data, pull_codec="int8")
    h.register("w1")
    held = decode(h.send("w1", Pull())[0].payload).reshape(-1)  # type: ignore[arg-type]
    for seed in range(3):
        h.push("w1", h.task("w1"), _grad(h.numel, seed), base=h.core.version)
    out = h.send("w1", Pull(have_version=0))
    msg = out[0].message
    assert isinstance(msg, Params) and msg.base_version == 0 and msg.version == 3
    rebuilt = held + decode(out[0].payload).reshape(-1)  # type: ignore[arg-type]
    now = h.core.server.params
    # int8 on the delta, not on the parameters: the error is half a quantisation step of the change.
    change = float((now - held).abs().max())
    assert 0 < float((rebuilt - now).abs().max()) <= change / 255 + 1e-7
    assert h.core.workers["w1"].pulls_delta == 1


def test_a_task_request_with_pull_brings_the_parameters_it_needs(cache: Path, data: PreparedData) -> None:
    h = Harness(_config(cache, sync={"buffer_size": 1}), data, pull_codec="int8")
    h.register("w")
    # No parameters held: the assignment is followed by the full parameters, answering the same request.
    request = TaskRequest(pull=True)
    out = h.send("w", request)
    assert [type(o.message) for o in out] == [TaskAssign, Params]
    assign, params = out[0].message, out[1].message
    assert isinstance(assign, TaskAssign) and isinstance(params, Params)
    assert params.ref == assign.ref == request.id and params.base_version is None
    assert params.version == assign.version == 0
    held = decode(out[1].payload).reshape(-1)  # type: ignore[arg-type]
    assert torch.equal(held, h.initial)
    h.push("w", assign, _grad(h.numel, 1))
    # Holding version 0 of 1: a delta from it follows; holding the current version: no parameters at all.
    out = h.send("w", TaskRequest(pull=True, have_version=0))
    assert [type(o.message) for o in out] == [TaskAssign, Params]
    delta = out[1].message
    assert isinstance(delta, Params) and delta.base_version == 0 and delta.version == 1
    rebuilt = held + decode(out[1].payload).reshape(-1)  # type: ignore[arg-type]
    assert float((rebuilt - h.core.server.params).abs().max()) < 1e-4
    h.push("w", out[0].message, _grad(h.numel, 2))  # type: ignore[arg-type]
    out = h.send("w", TaskRequest(pull=True, have_version=2))
    assert [type(o.message) for o in out] == [TaskAssign]
    record = h.core.workers["w"]
    assert (record.pulls_full, record.pulls_delta) == (1, 1)


def test_a_parked_request_with_pull_gets_the_parameters_of_the_new_round(
    cache: Path, data: PreparedData
) -> None:
    cfg = _config(
        cache, sync={"mode": "sync", "quorum": 2, "straggler_timeout_s": 10.0}, cluster={"workers": 2}
    )
    h = Harness(cfg, data)
    h.register("a")
    h.register("b")
    first, second = h.task("a"), h.task("b")
    assert h.push("a", first, _grad(h.numel, 1)).accepted
    parked = TaskRequest(pull=True, have_version=0)
    assert h.send("a", parked) == []  # its update is in the current round
    out = h.send(
        "b",
        Push(base_version=0, lease_id=second.lease_id, task_id=second.task_id, tokens=1, loss=1.0),
        NoneCodec().encode(_grad(h.numel, 2)),
    )
    to_a = [o for o in out if o.worker_id == "a"]
    assert [type(o.message) for o in to_a] == [TaskAssign, Params]
    params = to_a[1].message
    assert isinstance(params, Params) and params.ref == parked.id and params.version == 1
    assert torch.equal(decode(to_a[1].payload).reshape(-1), h.core.server.params)  # type: ignore[arg-type]


def test_expired_lease_is_requeued_and_the_late_result_refused(cache: Path, data: PreparedData) -> None:
    h = Harness(_config(cache, scheduling={"failure_timeout_s": 30.0}), data)
    h.register("slow")
    h.register("fast")
    lost = h.task("slow")
    h.clock.advance(4.0)
    h.one("fast", Heartbeat())  # "slow" names no lease in a heartbeat: its lease runs out
    h.clock.advance(1.0)  # lease_s = 5 since the grant
    h.core.tick()
    assert ("lease", {"kind": "expire", "task_id": lost.task_id}) in h.events
    again = h.task("fast")
    assert again.task_id == lost.task_id and again.lease_id != lost.lease_id  # requeued at the front
    late = h.push("slow", lost, _grad(h.numel, 3))
    assert not late.accepted and late.reason == "lease-expired"
    done = h.push("fast", again, _grad(h.numel, 4))
    assert done.accepted
    assert h.core.lease_refusals["expired"] == 1 and h.core.coordinator.stats.submitted == 1


def test_silent_worker_is_evicted_exactly_at_the_failure_timeout(cache: Path, data: PreparedData) -> None:
    h = Harness(_config(cache), data)
    h.register("quiet")
    held = h.task("quiet")
    h.clock.advance(2.999)
    h.core.tick()
    assert "quiet" in h.core.workers
    h.clock.advance(0.001)
    h.core.tick()
    assert "quiet" not in h.core.workers
    assert ("evict", {"worker_id": "quiet", "reason": "silent", "detail": "", "requeued": 1}) in h.events
    assert h.core.pool.pending[0].task_id == held.task_id
    # Coming back it must register again; its old lease is gone.
    reply = h.one("quiet", TaskRequest())
    assert isinstance(reply, ErrorReply) and reply.code == "not-registered"


def test_heartbeat_renews_only_the_leases_it_names(cache: Path, data: PreparedData) -> None:
    h = Harness(_config(cache, scheduling={"failure_timeout_s": 30.0}), data)
    h.register("w")
    kept = h.task("w")
    for _ in range(4):
        h.clock.advance(2.0)
        h.one("w", Heartbeat(lease_ids=[kept.lease_id]))
        h.core.tick()
    assert h.core.leases.get(kept.lease_id) is not None  # 8 s > lease_s, renewed
    h.clock.advance(2.0)
    h.one("w", Heartbeat(lease_ids=[]))  # the worker no longer works on it
    h.clock.advance(3.0)
    h.core.tick()
    assert h.core.leases.get(kept.lease_id) is None and h.core.requeued == 1


def test_bad_updates_are_rejected_and_counted(cache: Path, data: PreparedData) -> None:
    h = Harness(_config(cache), data)
    h.register("evil")
    version_before = h.core.version
    nan = torch.full((h.numel,), float("nan"))
    raw_nan = Encoded.build("none", 1, [h.numel], {}, [("values", nan)])
    assign = h.task("evil")
    push = Push(base_version=0, lease_id=assign.lease_id, task_id=assign.task_id, tokens=1, loss=1.0)
    reply = h.send("evil", push, raw_nan)[0].message
    assert isinstance(reply, PushAck) and reply.reason == "non-finite"
    ack = h.push("evil", h.task("evil"), _grad(10, 1))
    assert not ack.accepted and ack.reason == "wrong-shape"
    # A declared shape larger than the model is refused before anything is decoded or allocated.
    huge = build_codec("topk", k=1).encode(torch.ones(h.numel + 1))
    assign = h.task("evil")
    push = Push(base_version=0, lease_id=assign.lease_id, task_id=assign.task_id, tokens=1, loss=1.0)
    reply = h.send("evil", push, huge)[0].message
    assert isinstance(reply, PushAck) and reply.reason == "wrong-shape"
    # Wrong dtype: a none payload whose buffer is int32 is not a valid payload at all.
    header = msgpack.packb(
        {
            "codec": "none",
            "version": 1,
            "shape": [h.numel],
            "dtype": "float32",
            "params": {},
            "buffers": [["values", "int32", h.numel]],
        },
        use_bin_type=True,
    )
    assign = h.task("evil")
    push = Push(base_version=0, lease_id=assign.lease_id, task_id=assign.task_id, tokens=1, loss=1.0)
    reply = h.send("evil", push, [header, torch.zeros(h.numel, dtype=torch.int32).numpy().tobytes()])[
        0
    ].message
    assert isinstance(reply, ErrorReply) and reply.code == "bad-payload"
    assert h.core.version == version_before
    assert h.core.coordinator.stats.rejected["non-finite"] == 1
    assert h.core.coordinator.stats.rejected["wrong-shape"] == 1
    assert h.core.runtime_rejected["wrong-shape"] == 1
    assert h.core.protocol_errors["bad-payload"] == 1
    snap = h.core.snapshot()
    assert snap["rejected"] == {"non-finite": 1, "wrong-shape": 2}


def test_protocol_errors_are_answered_and_counted(cache: Path, data: PreparedData) -> None:
    h = Harness(_config(cache), data)
    exc = ProtocolError("version", "peer speaks 9", ref=12)
    exc.routing_id, exc.worker_id = b"x", "x"
    out = h.core.protocol_error(exc)
    assert out[0].routing_id == b"x" and isinstance(out[0].message, ErrorReply)
    assert out[0].message.code == "version" and out[0].message.ref == 12
    anonymous = ProtocolError("malformed", "no routing id")
    assert h.core.protocol_error(anonymous) == []
    h.register("w")
    reply = h.one("w", Params(version=0, numel=3), [b"x"])
    assert isinstance(reply, ErrorReply) and reply.code == "unexpected-type"
    assert h.core.protocol_errors == {"version": 1, "malformed": 1, "unexpected-type": 1}


def test_sync_barrier_parks_requests_until_the_round_steps(cache: Path, data: PreparedData) -> None:
    cfg = _config(
        cache, sync={"mode": "sync", "quorum": 2, "straggler_timeout_s": 10.0}, cluster={"workers": 2}
    )
    h = Harness(cfg, data)
    h.register("a")
    h.register("b")
    first = h.task("a")
    assert h.push("a", first, _grad(h.numel, 1)).accepted
    assert h.send("a", TaskRequest()) == []  # parked: its update is in the current round
    second = h.task("b")
    out = h.send(
        "b",
        Push(base_version=0, lease_id=second.lease_id, task_id=second.task_id, tokens=1, loss=1.0),
        NoneCodec().encode(_grad(h.numel, 2)),
    )
    kinds = {(o.worker_id, type(o.message)) for o in out}
    assert ("b", PushAck) in kinds and ("a", TaskAssign) in kinds  # the step releases "a"
    assert h.core.version == 1


def test_sync_straggler_timeout_steps_with_what_arrived(cache: Path, data: PreparedData) -> None:
    cfg = _config(
        cache,
        sync={"mode": "sync", "quorum": 3, "straggler_timeout_s": 2.0},
        cluster={"workers": 3},
        scheduling={"failure_timeout_s": 100.0, "lease_s": 100.0},
    )
    h = Harness(cfg, data)
    h.register("a")
    h.register("b")
    assert h.push("a", h.task("a"), _grad(h.numel, 1)).accepted
    h.clock.advance(1.9)
    h.core.tick()
    assert h.core.version == 0
    h.clock.advance(0.1)
    h.core.tick()
    assert h.core.version == 1 and h.core.straggler_timeouts == 1


def _step_wait_harness(cache: Path, data: PreparedData, buffer_size: int = 2) -> tuple[Harness, TaskAssign]:
    """Async, two workers, ``sync.step_wait=0.5``: both get a task, "a" pushes after 2 s."""
    cfg = _config(
        cache,
        sync={"mode": "async", "buffer_size": buffer_size, "step_wait": 0.5},
        cluster={"workers": 2},
        scheduling={"failure_timeout_s": 100.0, "lease_s": 100.0},
    )
    h = Harness(cfg, data)
    h.register("a")
    h.register("b")
    first, second = h.task("a"), h.task("b")
    h.clock.advance(2.0)
    assert h.push("a", first, _grad(h.numel, 1)).accepted
    return h, second


def test_step_wait_serves_the_request_with_the_version_its_peer_completes(
    cache: Path, data: PreparedData
) -> None:
    h, second = _step_wait_harness(cache, data)
    # "b" is computing the update that fills the buffer: "a" waits for that step instead of computing
    # on version 0, which the step is about to retire.
    assert h.send("a", TaskRequest(pull=True, have_version=0)) == []
    h.clock.advance(0.3)
    assert h.core.tick() == []
    out = h.send(
        "b",
        Push(base_version=0, lease_id=second.lease_id, task_id=second.task_id, tokens=1, loss=1.0),
        NoneCodec().encode(_grad(h.numel, 2)),
    )
    to_a = [o.message for o in out if o.worker_id == "a"]
    assert h.core.version == 1
    assert [type(m) for m in to_a] == [TaskAssign, Params]
    assert to_a[0].version == 1 and to_a[1].version == 1
    assert h.core.step_waits == 1 and h.core.step_wait_timeouts == 0


def test_step_wait_runs_out_and_serves_the_current_version(cache: Path, data: PreparedData) -> None:
    h, _ = _step_wait_harness(cache, data)
    assert h.send("a", TaskRequest()) == []
    h.clock.advance(0.99)  # the wait is half of "a"'s measured 2 s task time
    assert h.core.tick() == []
    h.clock.advance(0.01)
    out = h.core.tick()
    assert len(out) == 1 and isinstance(out[0].message, TaskAssign) and out[0].message.version == 0
    assert h.core.step_wait_timeouts == 1
    snap = h.core.snapshot()
    assert snap["step_waits"] == {"parked": 1, "timed_out": 1}
    assert summarize_snapshot(snap, source="x")["step_waits"] == {"parked": 1, "timed_out": 1}


def test_step_wait_never_waits_for_a_step_that_needs_the_asker(cache: Path, data: PreparedData) -> None:
    h, _ = _step_wait_harness(cache, data, buffer_size=3)
    # 2 updates missing, 1 in flight: the step cannot come without "a", which is served at once.
    assert isinstance(h.one("a", TaskRequest()), TaskAssign)
    assert h.core.step_waits == 0


def test_parked_request_times_out_with_no_task(cache: Path, data: PreparedData) -> None:
    cfg = _config(
        cache,
        sync={"mode": "sync", "quorum": 2},
        cluster={"workers": 2},
        scheduling={"failure_timeout_s": 100.0, "lease_s": 100.0},
    )
    h = Harness(cfg, data)
    h.register("a")
    assert h.push("a", h.task("a"), _grad(h.numel, 1)).accepted
    assert h.send("a", TaskRequest()) == []
    h.clock.advance(1.0)
    out = h.core.tick()
    assert len(out) == 1 and isinstance(out[0].message, NoTask) and out[0].message.reason == "barrier"


def test_no_task_until_min_workers_have_registered(cache: Path, data: PreparedData) -> None:
    cfg = _config(cache, scheduling={"min_workers": 3, "failure_timeout_s": 100.0})
    h = Harness(cfg, data)
    h.register("a")
    h.register("b")
    assert h.send("a", TaskRequest()) == []  # parked while the cluster assembles
    h.clock.advance(1.0)
    out = h.core.tick()
    assert len(out) == 1 and isinstance(out[0].message, NoTask) and out[0].message.reason == "assembling"
    assert h.send("a", TaskRequest()) == []
    assert not h.core.assembled and h.core.snapshot()["assembled"] is False
    h.register("c")
    out = h.core.tick()  # the third registration opens the gate; the parked request is served
    assert [(o.worker_id, type(o.message)) for o in out] == [("a", TaskAssign)]
    assert [f for e, f in h.events if e == "assembled"] == [{"workers": 3, "min_workers": 3, "version": 0}]
    # Open for the rest of the run, even when a worker leaves.
    h.send("c", Leave(reason="test"))
    assert isinstance(h.one("b", TaskRequest()), TaskAssign)


def test_a_resumed_controller_waits_again_for_min_workers(cache: Path, data: PreparedData) -> None:
    cfg = _config(cache, sync={"buffer_size": 1}, scheduling={"min_workers": 2}, cluster={"workers": 2})
    h = Harness(cfg, data)
    h.register("a")
    h.register("b")
    h.push("a", h.task("a"), _grad(h.numel, 1))
    resumed = Harness(cfg, data)
    resumed.core.load_state_dict(h.core.state_dict())  # the gate is not part of the checkpoint
    assert resumed.core.next_task_id == h.core.next_task_id
    resumed.register("a")
    assert resumed.send("a", TaskRequest()) == []
    resumed.register("b")
    assert [type(o.message) for o in resumed.core.tick()] == [TaskAssign]


def test_leave_requeues_and_finish_shuts_everyone_down(cache: Path, data: PreparedData) -> None:
    h = Harness(_config(cache), data)
    h.register("a")
    h.register("b")
    task = h.task("a")
    assert h.send("a", Leave(reason="bye")) == []
    assert h.core.pool.pending[0].task_id == task.task_id and h.core.evictions["leave"] == 1
    out = h.core.finish("max-steps")
    assert [(o.worker_id, type(o.message)) for o in out] == [("b", Shutdown)]
    reply = h.one("b", TaskRequest())
    assert isinstance(reply, Shutdown)


def test_finish_also_shuts_down_a_worker_evicted_as_silent(cache: Path, data: PreparedData) -> None:
    # On a loaded host a live worker can miss the failure timeout; at the end it must still hear SHUTDOWN,
    # or it keeps trying to re-register with a controller that is gone.
    h = Harness(_config(cache), data)
    h.register("slow")
    h.register("left")
    assert h.send("left", Leave(reason="bye")) == []
    h.clock.advance(3.0)
    h.core.tick()
    assert "slow" not in h.core.workers and h.core.evictions["silent"] == 1
    out = h.core.finish("signal-sigterm")
    assert [(o.worker_id, type(o.message)) for o in out] == [("slow", Shutdown)]
    assert out[0].message.reason == "signal-sigterm"


def test_after_finish_every_message_is_answered_with_shutdown(cache: Path, data: PreparedData) -> None:
    # A broadcast SHUTDOWN can be lost; the controller keeps answering for a while, and a worker's next
    # heartbeat (or push, or registration) brings it SHUTDOWN instead of an ordinary reply.
    h = Harness(_config(cache), data)
    h.register("a")
    h.core.finish("signal-sigterm")
    for message in (Heartbeat(lease_ids=[]), TaskRequest(), Register(name="a", device="cpu", capacity=1)):
        reply = h.one("a", message)
        assert isinstance(reply, Shutdown) and reply.ref == message.id and reply.reason == "signal-sigterm"
    assert h.send("a", Leave(reason="bye")) == []


def test_register_again_releases_the_old_leases(cache: Path, data: PreparedData) -> None:
    h = Harness(_config(cache), data)
    h.register("w")
    old = h.task("w")
    h.register("w")  # the process restarted
    assert h.core.evictions["re-register"] == 1
    late = h.push("w", old, _grad(h.numel, 1))
    assert not late.accepted and late.reason == "lease-expired"


def test_checkpoint_roundtrip_restores_server_exactly(
    cache: Path, data: PreparedData, tmp_path: Path
) -> None:
    cfg = _config(cache, sync={"buffer_size": 1})
    h = Harness(cfg, data)
    h.register("w")
    for seed in range(3):
        h.push("w", h.task("w"), _grad(h.numel, seed), base=h.core.version)
    shapes = resolve_model_shapes(cfg.model)
    state = {
        "config": cfg.model_dump(mode="json"),
        "model_shapes": shapes,
        "data_fingerprint": data.fingerprint,
    }
    save_controller_checkpoint(
        tmp_path, server=h.core.server, model=h.model, state=state, controller=h.core.state_dict()
    )
    fresh = Harness(cfg, data)
    ckpt = load_controller_checkpoint(
        tmp_path,
        server=fresh.core.server,
        model=fresh.model,
        model_shapes=shapes,
        data_fingerprint=data.fingerprint,
    )
    fresh.core.load_state_dict(ckpt.controller)
    assert ckpt.version == 3 and fresh.core.version == 3
    assert torch.equal(fresh.core.server.params, h.core.server.params)
    assert fresh.core.coordinator.stats.as_dict() == h.core.coordinator.stats.as_dict()
    assert fresh.core.next_task_id == h.core.next_task_id
    # Same optimiser state: the next identical update moves both servers identically.
    g = _grad(h.numel, 9)
    h.core.server.apply(g)
    fresh.core.server.apply(g)
    assert torch.equal(fresh.core.server.params, h.core.server.params)


def test_prometheus_endpoint_and_url_summary(cache: Path, data: PreparedData) -> None:
    h = Harness(_config(cache, sync={"buffer_size": 1}), data)
    h.register("w")
    h.push("w", h.task("w"), _grad(h.numel, 1))
    h.push("w", h.task("w"), _grad(10, 2))
    exporter = PrometheusExporter(0)
    try:
        snap = h.core.snapshot()
        snap["elapsed_s"] = 4.0
        exporter.update(snap, 3.25)
        url = f"http://127.0.0.1:{exporter.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        assert 'dlt_updates_rejected_total{reason="wrong-shape"} 1.0' in text
        summary = summarize_url(url)
    finally:
        exporter.close()
    assert summary["steps"] == 1 and summary["acceptance"]["accepted"] == 1
    assert summary["acceptance"]["rejected"] == {"wrong-shape": 1}
    assert summary["loss"]["final_val"] == 3.25
    assert summary["throughput"]["tokens_per_s"] == pytest.approx(h.core.tokens_per_task / 4.0)
    direct = summarize_snapshot(snap, source="x", evals=[(0, 5.0), (1, 3.25)], elapsed_s=4.0)
    assert direct["acceptance"] == summary["acceptance"]
    assert direct["workers"][0]["accepted"] == 1 and direct["workers"][0]["rejected"] == 1
    assert math.isclose(direct["loss"]["best_val"], 3.25)

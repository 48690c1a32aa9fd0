"""Parameter server and coordinators: admission, staleness, buffering, no-op steps, DP, Byzantine counts."""

from __future__ import annotations

import pytest
import torch

from dist_llm_train.aggregation import build_aggregator
from dist_llm_train.config import load_config
from dist_llm_train.coordination import (
    AdaptiveBound,
    AsyncCoordinator,
    FixedBound,
    ParameterServer,
    SyncCoordinator,
    Update,
    build_coordinator,
    build_server,
    flatten_params,
    load_flat_params,
    staleness_weight,
)
from dist_llm_train.errors import NonFiniteError, PreconditionError, UserError
from dist_llm_train.privacy import WorkerLevelDP

D = 6


def _server(optimizer: str = "sgd", lr: float = 1.0) -> ParameterServer:
    return ParameterServer(torch.zeros(D), optimizer=optimizer, lr=lr, momentum=0.0, history=4)


def _update(worker: str, version: int, value: float = 1.0, **kw: object) -> Update:
    return Update(worker, version, torch.full((D,), value), **kw)


def test_sgd_server_applies_descent_and_counts_versions() -> None:
    server = _server()
    assert server.apply(torch.ones(D)) == 1
    assert torch.allclose(server.params, -torch.ones(D))
    assert torch.allclose(server.delta_since(0), -torch.ones(D))
    assert server.snapshot(0).abs().sum() == 0


def test_history_ring_buffer_forgets_old_versions() -> None:
    server = _server()
    for _ in range(6):
        server.apply(torch.ones(D))
    assert server.oldest_version() == 3
    assert server.snapshot(1) is None and server.delta_since(2) is None
    assert torch.allclose(server.delta_since(4), -2 * torch.ones(D))


def test_stored_versions_are_shared_and_never_change() -> None:
    # The controller sends a version's stored copy zero-copy while later steps run: the server must never
    # write to it, and a version that left the history must stay intact for whoever still holds it.
    server = ParameterServer(torch.zeros(D), optimizer="sgd", lr=1.0, momentum=0.0, history=2)
    first = server.stored()
    assert first is not None and first is server.stored(0)
    assert first.data_ptr() != server.params.data_ptr()  # not the live parameters
    kept = first.clone()
    for _ in range(3):
        server.apply(torch.ones(D))
    assert server.stored(0) is None and server.stored(1) is None
    assert torch.equal(first, kept)
    assert torch.equal(server.stored(), server.params) and server.stored() is server.stored(3)


def test_server_rejects_bad_updates_and_restores_state() -> None:
    server = _server("adamw", lr=0.1)
    with pytest.raises(PreconditionError, match="parameters"):
        server.apply(torch.ones(D + 1))
    with pytest.raises(NonFiniteError):
        server.apply(torch.full((D,), float("nan")))
    server.apply(torch.ones(D))
    state = server.state_dict()
    server.apply(torch.ones(D))
    other = _server("adamw", lr=0.1)
    other.load_state_dict(state)
    assert other.version == 1
    other.apply(torch.ones(D))
    assert torch.equal(other.params, server.params)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "nesterov"])
def test_server_steps_match_the_per_tensor_torch_optimizer(optimizer: str) -> None:
    # The server runs torch's fused kernels; the result must be the textbook optimiser's up to rounding,
    # and the step must leave the caller's update as it was.
    gen = torch.Generator().manual_seed(3)
    start = torch.randn(1000, generator=gen)
    server = ParameterServer(start, optimizer=optimizer, lr=0.05, momentum=0.9, weight_decay=0.01)  # type: ignore[arg-type]
    reference = torch.nn.Parameter(start.clone())
    if optimizer == "adamw":
        ref_opt: torch.optim.Optimizer = torch.optim.AdamW(
            [reference], lr=0.05, betas=(0.9, 0.99), weight_decay=0.01, foreach=False
        )
    else:
        ref_opt = torch.optim.SGD(
            [reference],
            lr=0.05,
            momentum=0.9,
            nesterov=optimizer == "nesterov",
            weight_decay=0.01,
            foreach=False,
        )
    assert server._optimizer.defaults["fused"]
    for _ in range(30):
        sparse = torch.randn(1000, generator=gen) * (torch.rand(1000, generator=gen) < 0.1)
        kept = sparse.clone()
        server.apply(sparse)
        assert torch.equal(sparse, kept)
        reference.grad = kept
        ref_opt.step()
    torch.testing.assert_close(server.params, reference.detach(), rtol=1e-5, atol=1e-6)


def test_server_loads_the_state_of_a_per_tensor_optimizer() -> None:
    # Checkpoints written before the server used fused kernels hold the per-tensor optimiser's state.
    server = _server("adamw", lr=0.1)
    legacy = torch.nn.Parameter(torch.zeros(D))
    legacy_opt = torch.optim.AdamW([legacy], lr=0.1, betas=(0.9, 0.99), weight_decay=0.0, foreach=False)
    for _ in range(3):
        legacy.grad = torch.ones(D)
        legacy_opt.step()
    server.load_state_dict(
        {"params": legacy.detach().clone(), "version": 3, "optimizer": legacy_opt.state_dict()}
    )
    legacy.grad = torch.ones(D)
    legacy_opt.step()
    server.apply(torch.ones(D))
    assert server.version == 4
    torch.testing.assert_close(server.params, legacy.detach(), rtol=1e-6, atol=1e-7)


def test_empty_buffer_step_is_a_reported_noop() -> None:
    server = _server()
    coord = AsyncCoordinator(server, build_aggregator("mean"), bound=FixedBound(2), buffer_size=3)
    report = coord.step()
    assert report.noop and report.reason == "empty buffer"
    assert server.version == 0 and torch.equal(server.params, torch.zeros(D))
    assert coord.stats.noop_steps == 1 and coord.stats.steps == 0


@pytest.mark.parametrize("bound", [0, 1, 3])
def test_staleness_is_exact_and_bounded_as_configured(bound: int) -> None:
    server = _server()
    coord = AsyncCoordinator(server, build_aggregator("mean"), bound=FixedBound(bound), buffer_size=1)
    for _ in range(5):
        coord.submit(_update("fast", server.version))
    assert server.version == 5
    for base in range(6):
        version_before = server.version
        outcome = coord.submit(_update("slow", base))
        assert outcome.staleness == version_before - base
        assert outcome.accepted == (outcome.staleness <= bound)
        if not outcome.accepted:
            assert outcome.reason == "too-stale"
    assert max(int(k) for k in coord.stats.staleness) <= bound


def test_staleness_policies() -> None:
    assert staleness_weight(0, "inverse") == 1.0
    assert staleness_weight(4, "inverse") == 0.25
    assert staleness_weight(3, "none") == 1.0
    assert staleness_weight(2, "exponential", alpha=0.5) == pytest.approx(torch.e**-1.0)
    server = _server()
    coord = AsyncCoordinator(
        server, build_aggregator("mean"), bound=FixedBound(8), buffer_size=1, staleness_policy="inverse"
    )
    for _ in range(4):
        coord.submit(_update("a", server.version, 0.0))
    before = server.params.clone()
    outcome = coord.submit(_update("b", 0, 1.0))
    assert outcome.weight == pytest.approx(0.25)
    assert torch.allclose(before - server.params, torch.full((D,), 0.25))


def test_buffered_async_aggregates_every_b_updates_with_a_robust_rule() -> None:
    server = _server()
    coord = AsyncCoordinator(server, build_aggregator("median", f=1), bound=FixedBound(10), buffer_size=3)
    assert coord.submit(_update("a", 0, 1.0)).step is None
    assert coord.submit(_update("b", 0, 2.0)).step is None
    step = coord.submit(_update("evil", 0, 1e6, byzantine=True)).step
    assert step is not None and step.n_inputs == 3 and not step.noop
    assert torch.allclose(server.params, torch.full((D,), -2.0))  # median of {1, 2, 1e6}


def test_rejections_are_counted_by_reason_and_never_raise() -> None:
    server = _server()
    coord = AsyncCoordinator(server, build_aggregator("mean"), bound=FixedBound(1), buffer_size=1)
    outcomes = [
        coord.submit(Update("x", 0, torch.ones(D + 2))),
        coord.submit(Update("x", 5, torch.ones(D))),
        coord.submit(Update("x", 0, torch.full((D,), float("inf")), byzantine=True)),
        coord.submit(Update("x", 0, torch.ones(D, dtype=torch.int64))),
    ]
    assert [o.reason for o in outcomes] == ["wrong-shape", "unknown-version", "non-finite", "wrong-dtype"]
    assert coord.stats.byzantine_rejected == 1
    assert coord.stats.acceptance_rate == 0.0
    assert server.version == 0


def test_sync_rounds_quorum_duplicates_and_stale_rounds() -> None:
    server = _server()
    coord = SyncCoordinator(server, build_aggregator("mean"), quorum=3)
    assert coord.submit(_update("a", 0)).accepted
    assert coord.submit(_update("a", 0)).reason == "duplicate"
    assert coord.submit(_update("b", 0)).step is None
    assert coord.submit(_update("c", 0)).step is not None
    assert server.version == 1
    assert coord.submit(_update("d", 0)).reason == "stale-round"
    # a straggler timeout closes the round with what arrived
    coord.submit(_update("a", 1, 3.0))
    report = coord.step()
    assert report.n_inputs == 1 and server.version == 2


def test_adaptive_bound_follows_each_workers_natural_staleness() -> None:
    bound = AdaptiveBound(floor=2, ceiling=20, margin=1.5)
    assert bound.bound("new") == 2
    for _ in range(10):
        bound.observe("fast", 1)
        bound.observe("slow", 8)
    assert bound.bound("fast") == 2  # tight
    assert bound.bound("slow") == 12  # ceil(1.5 * 8)
    bound.observe("glacial", 100)
    assert bound.bound("glacial") == 20  # capped; bias correction makes one sample count fully
    bound.forget("slow")
    assert bound.bound("slow") == 2


def test_adaptive_admits_a_slow_worker_after_measuring_it() -> None:
    server = _server()
    coord = AsyncCoordinator(server, build_aggregator("mean"), bound=AdaptiveBound(1, 32), buffer_size=1)
    fixed = AsyncCoordinator(_server(), build_aggregator("mean"), bound=FixedBound(1), buffer_size=1)
    accepted = {"adaptive": 0, "fixed": 0}
    for _ in range(20):
        base, fixed_base = server.version, fixed.server.version
        for _ in range(6):  # the fast worker makes 6 steps while the slow one computes
            coord.submit(_update("fast", server.version, 0.01))
            fixed.submit(_update("fast", fixed.server.version, 0.01))
        accepted["adaptive"] += coord.submit(_update("slow", base, 0.01)).accepted
        accepted["fixed"] += fixed.submit(_update("slow", fixed_base, 0.01)).accepted
    assert accepted["fixed"] == 0
    assert accepted["adaptive"] >= 19  # only its first update, before it was measured, is refused


def test_worker_dp_noise_is_added_once_per_step() -> None:
    server = _server()
    dp = WorkerLevelDP(
        clip_norm=1.0, noise_multiplier=2.0, expected_workers=4, generator=torch.Generator().manual_seed(0)
    )
    coord = SyncCoordinator(server, build_aggregator("mean"), quorum=2, privacy=dp)
    coord.submit(_update("a", 0, 0.0))
    coord.submit(_update("b", 0, 0.0))
    # sum of zero updates + N(0, (zS)^2), divided by the expected count 4: std 0.5 per coordinate
    assert server.params.abs().max() > 0
    big = ParameterServer(torch.zeros(200_000), optimizer="sgd", lr=1.0, momentum=0.0)
    coord = SyncCoordinator(big, build_aggregator("mean"), quorum=1, privacy=dp)
    coord.submit(Update("a", 0, torch.zeros(200_000)))
    assert float(big.params.std()) == pytest.approx(0.5, rel=0.02)


def test_build_from_config_modes() -> None:
    params = torch.zeros(D)
    for mode, cls in [("sync", SyncCoordinator), ("async", AsyncCoordinator), ("adaptive", AsyncCoordinator)]:
        cfg = load_config(None, [f"sync.mode={mode}", "aggregation.rule=trimmed-mean", "aggregation.f=1"])
        coord = build_coordinator(cfg, build_server(cfg, params), n_workers=4)
        assert isinstance(coord, cls) and coord.mode == mode
    cfg = load_config(None, ["sync.mode=local-sgd"])
    server = build_server(cfg, params)
    assert server.optimizer_name == "nesterov" and server.current_lr() == pytest.approx(0.7)
    cfg = load_config(None, ["privacy.mode=worker", "privacy.target_epsilon=8", "training.max_steps=100"])
    coord = build_coordinator(cfg, build_server(cfg, params), n_workers=4)
    assert coord.privacy is not None and coord.privacy.noise_multiplier > 0


def test_exclusions_name_workers_only_when_rows_are_inputs() -> None:
    def run(pre: list[str]) -> tuple[int, int]:
        coord = AsyncCoordinator(
            _server(), build_aggregator("multi-krum", f=1, pre=pre, m=3), bound=FixedBound(9), buffer_size=12
        )
        for i in range(11):
            coord.submit(_update(f"h{i}", 0, 1.0 + 0.01 * i))
        coord.submit(_update("evil", 0, 1e4, byzantine=True))
        assert coord.stats.steps == 1
        return coord.stats.byzantine_excluded, coord.stats.honest_excluded

    assert run([]) == (1, 8)  # Multi-Krum keeps 3 of 12: the attacker and 8 honest inputs are left out
    assert run(["bucketing"]) == (0, 0)  # bucket rows (6 of them) are not workers: nothing is attributed


def test_step_wait_waits_only_for_a_step_that_is_near_and_reachable_without_the_asker() -> None:
    coord = AsyncCoordinator(
        _server(), build_aggregator("mean"), bound=FixedBound(4), buffer_size=3, step_wait=0.25
    )
    assert coord.step_wait_s(2.0, in_flight=5) == 0.0  # empty buffer: the current version is fresh
    assert coord.submit(_update("a", 0)).accepted
    assert coord.step_wait_s(2.0, in_flight=2) == pytest.approx(0.5)  # 2 missing, 2 computing
    assert coord.step_wait_s(2.0, in_flight=1) == 0.0  # the step needs the asker's own update
    assert coord.step_wait_s(None, in_flight=2) == 0.0  # no measured task time yet
    assert coord.submit(_update("b", 0)).accepted
    assert coord.step_wait_s(4.0, in_flight=1) == pytest.approx(1.0)
    assert coord.submit(_update("c", 0)).step is not None
    assert coord.step_wait_s(4.0, in_flight=2) == 0.0  # the step just happened
    off = AsyncCoordinator(_server(), build_aggregator("mean"), bound=FixedBound(4), buffer_size=3)
    assert off.submit(_update("a", 0)).accepted and off.step_wait_s(2.0, in_flight=2) == 0.0
    sync = SyncCoordinator(_server(), build_aggregator("mean"), quorum=3)
    assert sync.submit(_update("a", 0)).accepted and sync.step_wait_s(2.0, in_flight=2) == 0.0
    with pytest.raises(UserError, match="step_wait"):
        AsyncCoordinator(_server(), build_aggregator("mean"), bound=FixedBound(4), step_wait=1.5)


def test_loading_a_flat_vector_copies_it_into_the_model() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    storage = [p.data_ptr() for p in model.parameters()]
    flat = torch.arange(11, dtype=torch.float32)
    load_flat_params(model, flat)
    assert torch.equal(flatten_params(model), flat)
    # The model keeps its own storage: stepping it leaves the caller's vector as it was.
    assert [p.data_ptr() for p in model.parameters()] == storage
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert torch.equal(flat, torch.arange(11, dtype=torch.float32))
    with pytest.raises(PreconditionError, match="10 values cannot fill 11 parameters"):
        load_flat_params(model, flat[:10])

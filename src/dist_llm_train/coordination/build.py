"""Build the coordination objects a :class:`RunConfig` describes (used by the runtime and the simulator)."""

from __future__ import annotations

import torch

from dist_llm_train.aggregation import build_aggregator_from_config
from dist_llm_train.config import RunConfig
from dist_llm_train.coordination.coordinator import (
    AsyncCoordinator,
    Coordinator,
    SyncCoordinator,
    build_bound,
)
from dist_llm_train.coordination.parameter_server import ParameterServer
from dist_llm_train.privacy import PrivacyAccountant, WorkerLevelDP, noise_multiplier_for
from dist_llm_train.training.schedule import lr_at


def build_server(
    cfg: RunConfig, initial_params: torch.Tensor, *, total_steps: int | None = None
) -> ParameterServer:
    """The parameter server: AdamW over aggregated gradients (warm-up + cosine over server steps);
    DiLoCo's outer SGD with Nesterov momentum for ``local-sgd``; SGD/Nesterov at lr 1 (unless
    ``sync.server_lr``) over the parameter changes of ``sync.worker_optimizer=adamw``."""
    sc, tc = cfg.sync, cfg.training
    if sc.mode == "local-sgd":
        return ParameterServer(
            initial_params,
            optimizer="nesterov",
            lr=sc.server_lr or sc.outer_lr,
            momentum=sc.outer_momentum,
            history=sc.history,
        )
    if sc.worker_optimizer == "adamw":
        # The workers' AdamW already took the scheduled steps: the server adds their aggregate (lr 1).
        return ParameterServer(
            initial_params,
            optimizer=sc.server_optimizer,
            lr=sc.server_lr or 1.0,
            momentum=sc.server_momentum,
            history=sc.history,
        )
    steps = total_steps or tc.max_steps
    base_lr = sc.server_lr or tc.lr
    min_lr = min(tc.min_lr, base_lr)
    decay = tc.lr_decay_steps or steps

    def schedule(version: int) -> float:
        return lr_at(version, lr=base_lr, min_lr=min_lr, warmup_steps=tc.warmup_steps, decay_steps=decay)

    return ParameterServer(
        initial_params,
        optimizer=sc.server_optimizer,
        lr=base_lr,
        momentum=sc.server_momentum,
        betas=(tc.beta1, tc.beta2),
        weight_decay=tc.weight_decay if sc.server_optimizer == "adamw" else 0.0,
        lr_schedule=schedule if sc.server_optimizer == "adamw" else None,
        history=sc.history,
    )


def updates_per_step(cfg: RunConfig, n_workers: int) -> int:
    """How many updates one server step aggregates (the sync quorum, or the async buffer size)."""
    if cfg.sync.mode in ("sync", "local-sgd"):
        return min(cfg.sync.quorum or n_workers, n_workers)
    return cfg.sync.buffer_size


def build_coordinator(
    cfg: RunConfig, server: ParameterServer, *, n_workers: int, total_steps: int | None = None
) -> Coordinator:
    """Coordinator for ``cfg.sync.mode`` with the configured aggregator, staleness policy and DP."""
    sc = cfg.sync
    aggregator = build_aggregator_from_config(cfg.aggregation)
    per_step = updates_per_step(cfg, n_workers)
    privacy = accountant = None
    if cfg.privacy.mode == "worker":
        pc = cfg.privacy
        sample_rate = min(1.0, per_step / n_workers)
        z = pc.noise_multiplier
        if z is None:
            assert pc.target_epsilon is not None, "validated by PrivacyConfig"
            z = noise_multiplier_for(
                pc.target_epsilon,
                sample_rate,
                steps=total_steps or cfg.training.max_steps,
                delta=pc.delta,
                accountant=pc.accountant,
            )
        privacy = WorkerLevelDP(
            pc.clip_norm, z, per_step, generator=torch.Generator().manual_seed(cfg.training.seed)
        )
        accountant = PrivacyAccountant(accountant=pc.accountant, delta=pc.delta)
    common = {
        "privacy": privacy,
        "accountant": accountant,
        "population": n_workers,
        "staleness_policy": sc.staleness_policy if sc.mode in ("async", "adaptive") else "none",
        "staleness_alpha": sc.staleness_alpha,
    }
    if sc.mode in ("sync", "local-sgd"):
        return SyncCoordinator(server, aggregator, quorum=per_step, **common)
    bound = build_bound(sc.mode, sc.max_staleness, sc.adaptive_max_staleness, sc.adaptive_margin)
    return AsyncCoordinator(
        server, aggregator, bound=bound, buffer_size=sc.buffer_size, step_wait=sc.step_wait, **common
    )

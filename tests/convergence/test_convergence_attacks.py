"""Byzantine workers (f = 2 of n = 7 < n/3): the plain mean is measurably hurt, the defence is not.

The ``sync7`` cluster (7 workers, synchronous rounds, 60 steps) with its last two workers replaced by
attackers from the catalogue. Every attack is judged by final validation losses:

- the plain mean, in the undefended configuration (``sync7``: Nesterov SGD on the server, no worker
  momentum; clean 2.6725), ends at least ``mean_gap`` above its clean run, or unlearns (see
  ``UNLEARNED``);
- the recommended defence (``DEFENCE``: worker momentum 0.7, plain SGD lr 1.0 on the server, NNM
  pre-aggregation + coordinate trimmed mean with f = 2) ends within ``DEFENCE_MARGIN`` of its own clean
  run, and that clean run is itself within ``DEFENCE_CLEAN_COST`` of the undefended one, so the margin is
  not bought with a crippled baseline.

Measured (seed 1337; "seeds 2, 1" gives the defence on two more seeds, for the spread):

| attack | mean (undefended) | defence, vs its clean 2.6862 | seeds 2, 1 |
|---|---|---|---|
| sign flip | 2.7740 (+0.101) | 2.6775 (-0.009) | +0.015, +0.073 |
| scaling x1000 | 7946 after 20 steps | 2.6630 (-0.023) | |
| Gaussian, std 1 | 6.81 after 20 steps | 2.6630 (-0.023) | |
| zero | 2.7220 (+0.049) | 2.7101 (+0.024) | +0.010, +0.041 |
| ALIE (paper z = 0.57) | 2.8178 (+0.145) | 2.6937 (+0.008) | +0.011, +0.074 |
| IPM, epsilon 3 | 4.99 after 20 steps | 2.6630 (-0.023) | |

Why this defence (docs/results_coordination.md has the grid):

- Without worker momentum every robust rule tried lost as much as the mean or more to sign flip (+0.19
  to +0.47) and zero (+0.05 to +0.46): two identical attackers near the centre of noisy 512-token
  gradients bias coordinate-wise rules and win distance-based selections. Worker momentum is the
  published cure (Karimireddy et al. 2021).
- Worker momentum 0.9, the published value, fails here on ALIE (NNM + trimmed mean +0.22, 0.85: +0.22 to
  +0.36, 0.8: +0.07 to +0.15, 0.7: +0.01 to +0.07 over three seeds). The simulator's ALIE attacker
  forges from the honest updates that reached the server before it, the previous round's, so what it
  injects is mostly a stale momentum (its harm to the mean does not depend on z: 3.158 at z = 0, 3.153 at
  z = 0.57, 3.151 at z = 1, worker momentum 0.9). Our reading: the stale copy acts like extra momentum,
  and the longer the workers' averaging window the more that destabilises 60 steps of SGD at this
  learning rate.
- Server momentum on top of worker momentum was unstable (worker 0.9 with Nesterov lr 0.1 momentum 0.9:
  5.76 without attackers), hence plain SGD on the server.
- The mean is judged in the undefended configuration: with the defence's worker momentum and server SGD
  (clean 2.6511) zero only shrinks its step and costs it nothing measurable (-0.002; sign flip +0.074,
  ALIE +0.207, the others diverge), so the "hurt" half of the requirement is about what a run without
  the defence loses.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from dist_llm_train.simulation import SimulationReport

RunSim = Callable[..., SimulationReport]

ATTACKERS = 2
STEPS = 60
# The recommended Byzantine defence (reused by the `byzantine` validation preset): worker momentum 0.7
# (worker momentum starts at zero), plain SGD lr 1.0 on the server, NNM + coordinate trimmed mean, f = 2.
DEFENCE = (
    "sync.worker_momentum=0.7",
    "sync.server_optimizer=sgd",
    "sync.server_lr=1.0",
    "sync.server_momentum=0.0",
    "aggregation.rule=trimmed-mean",
    "aggregation.f=2",
    "aggregation.pre=[nnm]",
)
# Every attack costs the defence at most this much over its own clean run (worst measured on the test
# seed: zero, +0.024; worst over seeds 1337, 2, 1: +0.074).
DEFENCE_MARGIN = 0.10
# The defended clean run may end at most this much above the undefended clean run (measured 2.6862 vs
# 2.6725: +0.014).
DEFENCE_CLEAN_COST = 0.05

# Attacks that break the mean outright are run for only this many steps of the mean, and it must end at
# least UNLEARNED above the untrained model's loss (4.19): training went backwards. Measured after 20
# steps: scaling 7946, Gaussian 6.81, IPM 4.99 (the smallest: +0.80). The clean mean is at 3.18 then.
SHORT_STEPS = 20
UNLEARNED = 0.5

# (attack, attack params, minimum loss increase of the undefended mean over its clean run, or None: it
# must unlearn within SHORT_STEPS); measured values in the comments.
ATTACKS: list[tuple[str, str | None, float | None]] = [
    ("sign-flip", None, 0.05),  # mean +0.101; defence -0.009
    ("scaling", None, None),  # mean 7946 after 20 steps; defence -0.023; scale 1000 is the default
    ("gaussian", None, None),  # mean 6.81 after 20 steps; defence -0.023; std 1 per coordinate
    ("zero", None, 0.025),  # mean +0.049; defence +0.024
    ("alie", None, 0.08),  # mean +0.145; defence +0.008
    # A large epsilon is the variant that hurts the mean (REFERENCES.md §2): 2 x 3 > 5 honest reverses it.
    ("ipm", "{epsilon: 3.0}", None),  # mean 4.99 after 20 steps; defence -0.023
]


def _attacked(attack: str, params: str | None) -> tuple[str, ...]:
    extra = (f"cluster.attack_params={params}",) if params else ()
    return (f"cluster.byzantine={ATTACKERS}", f"cluster.attack={attack}", *extra)


def _check_attacked(report: SimulationReport, steps: int) -> None:
    byz = report.byzantine
    assert report.server_steps == steps
    assert byz.workers == ATTACKERS and byz.submitted == steps * ATTACKERS


@pytest.mark.slow
def test_the_defence_costs_little_without_attackers(run_sim: RunSim, sync7: tuple[str, ...]) -> None:
    clean = run_sim(sync7, eval_every=STEPS)
    defended = run_sim((*sync7, *DEFENCE), eval_every=STEPS)
    assert defended.server_steps == STEPS
    assert defended.final_val_loss <= clean.final_val_loss + DEFENCE_CLEAN_COST, (
        f"the defence without attackers ends at {defended.final_val_loss:.3f}, the undefended run at "
        f"{clean.final_val_loss:.3f}"
    )


@pytest.mark.slow
@pytest.mark.parametrize(("attack", "params", "mean_gap"), ATTACKS, ids=[a[0] for a in ATTACKS])
def test_attack_hurts_the_mean_and_the_defence_holds(
    run_sim: RunSim, sync7: tuple[str, ...], attack: str, params: str | None, mean_gap: float | None
) -> None:
    if mean_gap is None:
        short = (*sync7, f"training.max_steps={SHORT_STEPS}", *_attacked(attack, params))
        mean = run_sim(short, eval_every=SHORT_STEPS)
        _check_attacked(mean, SHORT_STEPS)
        loss = mean.final_val_loss
        assert not math.isfinite(loss) or loss >= mean.initial_val_loss + UNLEARNED, (
            f"mean under {attack} after {SHORT_STEPS} steps: {loss:.3f}, untrained {mean.initial_val_loss:.3f}"
        )
    else:
        clean = run_sim(sync7, eval_every=STEPS)
        mean = run_sim((*sync7, *_attacked(attack, params)), eval_every=STEPS)
        _check_attacked(mean, STEPS)
        assert mean.final_val_loss >= clean.final_val_loss + mean_gap, (
            f"mean under {attack}: {mean.final_val_loss:.3f} vs clean {clean.final_val_loss:.3f}"
        )

    defended_clean = run_sim((*sync7, *DEFENCE), eval_every=STEPS)
    defended = run_sim((*sync7, *DEFENCE, *_attacked(attack, params)), eval_every=STEPS)
    _check_attacked(defended, STEPS)
    assert math.isfinite(defended.final_val_loss)
    assert defended.final_val_loss <= defended_clean.final_val_loss + DEFENCE_MARGIN, (
        f"{attack} against the defence: {defended.final_val_loss:.3f}, its clean run "
        f"{defended_clean.final_val_loss:.3f}"
    )

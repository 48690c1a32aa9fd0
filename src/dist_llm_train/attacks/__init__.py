"""Byzantine attacks: what malicious workers send (REFERENCES.md §2).

Build one by name and call it once per round::

    attack = build_attack("alie")                     # z from the paper's rule
    byzantine = attack(honest, own, f)                # honest [h, d], own [d] or None -> [f, d]

Update attacks transform what is sent; ``label-flip`` is a *data* attack (``attack.is_data_attack``): the
worker trains on ``attack.transform_targets(targets)`` and the update path forwards its own update.
The white-box ``optimal-alie`` / ``optimal-ipm`` need the defender's rule: ``aggregator=<callable>``.
"""

from __future__ import annotations

import inspect
from typing import Any

from dist_llm_train.attacks.base import Attack
from dist_llm_train.attacks.label_flip import LabelFlip
from dist_llm_train.attacks.optimal import OptimalALIE, OptimalIPM, OptimalScaleAttack
from dist_llm_train.attacks.updates import (
    ALIE,
    GaussianNoise,
    InnerProductManipulation,
    Mimic,
    NonFinite,
    Scaling,
    SignFlip,
    Zero,
    alie_z,
)
from dist_llm_train.errors import ConfigError

__all__ = [
    "ALIE",
    "Attack",
    "GaussianNoise",
    "InnerProductManipulation",
    "LabelFlip",
    "Mimic",
    "NonFinite",
    "OptimalALIE",
    "OptimalIPM",
    "OptimalScaleAttack",
    "Scaling",
    "SignFlip",
    "Zero",
    "alie_z",
    "available_attacks",
    "build_attack",
]

_REGISTRY: dict[str, type[Attack]] = {
    cls.name: cls
    for cls in (
        SignFlip,
        Scaling,
        GaussianNoise,
        Zero,
        NonFinite,
        ALIE,
        InnerProductManipulation,
        Mimic,
        LabelFlip,
        OptimalALIE,
        OptimalIPM,
    )
}


def available_attacks() -> list[str]:
    """Names accepted by :func:`build_attack` (and by ``cluster.attack`` in the run config), sorted."""
    return sorted(_REGISTRY)


def build_attack(name: str, **params: Any) -> Attack:
    """Build the attack called ``name`` with its parameters (``cluster.attack_params`` in the config).

    Raises:
        ConfigError: unknown name, unknown parameter, or a parameter out of its allowed range.
    """
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ConfigError(f"unknown attack {name!r}; choose one of: {', '.join(available_attacks())}.")
    signature = inspect.signature(cls.__init__).parameters
    accepted = [p for p in signature if p != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ConfigError(
            f"attack {name!r} does not take parameter(s) {', '.join(unknown)}; "
            f"it accepts: {', '.join(accepted) or 'none'}."
        )
    missing = [p for p in accepted if signature[p].default is inspect.Parameter.empty and p not in params]
    if missing:
        raise ConfigError(
            f"attack {name!r} needs parameter(s) {', '.join(missing)}; it accepts: {', '.join(accepted)}."
        )
    return cls(**params)

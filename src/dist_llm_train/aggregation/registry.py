"""Build aggregators by name (from code, the CLI or a :class:`~dist_llm_train.config.schema.AggregationConfig`)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from dist_llm_train.aggregation.base import Aggregator, PreAggregator, check_f
from dist_llm_train.aggregation.iterative import CenteredClip, GeometricMedian
from dist_llm_train.aggregation.preaggregators import NNM, Bucketing, NormClip
from dist_llm_train.aggregation.rules import CoordinateMedian, Mean, TrimmedMean
from dist_llm_train.aggregation.selection import Bulyan, Krum, MultiKrum
from dist_llm_train.config.schema import AggregationConfig
from dist_llm_train.errors import ConfigError

__all__ = [
    "available_aggregators",
    "available_preaggregators",
    "build_aggregator",
    "build_aggregator_from_config",
    "build_preaggregator",
]

_RULES: dict[str, type[Aggregator]] = {
    cls.name: cls
    for cls in (Mean, CoordinateMedian, TrimmedMean, Krum, MultiKrum, Bulyan, GeometricMedian, CenteredClip)
}
_PRE: dict[str, type[PreAggregator]] = {cls.name: cls for cls in (NNM, Bucketing, NormClip)}


def available_aggregators() -> tuple[str, ...]:
    """Names accepted by :func:`build_aggregator`."""
    return tuple(_RULES)


def available_preaggregators() -> tuple[str, ...]:
    """Names accepted in ``pre``."""
    return tuple(_PRE)


def _normalise(name: object, kind: str, known: Mapping[str, object]) -> str:
    if not isinstance(name, str):
        raise ConfigError(f"{kind} name must be a string, got {name!r}.")
    key = name.strip().lower().replace("_", "-")
    if key not in known:
        raise ConfigError(f"unknown {kind} {name!r}; choose one of: {', '.join(known)}.")
    return key


def _check_params(cls: type, owner: str, params: Mapping[str, Any], reserved: tuple[str, ...]) -> None:
    allowed = [
        p.name
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in reserved
    ]
    for key in params:
        if key not in allowed:
            hint = f"allowed: {', '.join(allowed)}" if allowed else "it takes no parameters"
            raise ConfigError(f"unknown parameter {key!r} for {owner}; {hint}.")


def build_preaggregator(name: str, **params: Any) -> PreAggregator:
    """Build one pre-aggregator by name (``nnm``, ``bucketing``, ``clip``) with its keyword parameters."""
    key = _normalise(name, "pre-aggregator", _PRE)
    cls = _PRE[key]
    _check_params(cls, key, params, ())
    return cls(**params)


def build_aggregator(
    name: str,
    f: int = 0,
    pre: Sequence[str | PreAggregator] = (),
    *,
    pre_params: Mapping[str, Mapping[str, Any]] | None = None,
    **params: Any,
) -> Aggregator:
    """Build an aggregation rule by name, with pre-aggregators applied in order before it.

    Args:
        name: one of :func:`available_aggregators` (``mean``, ``median``, ``trimmed-mean``, ``krum``,
            ``multi-krum``, ``bulyan``, ``geometric-median``, ``centered-clip``); ``_`` works for ``-``.
        f: declared number of Byzantine inputs per aggregation, shared by the rule and pre-aggregators.
        pre: pre-aggregator names (``nnm``, ``bucketing``, ``clip``) or instances, applied in order.
        pre_params: keyword parameters per pre-aggregator name, e.g. ``{"bucketing": {"s": 2}}``.
        **params: the rule's own parameters, e.g. ``m`` for multi-krum, ``nu``/``iterations``/``tol``
            for geometric-median, ``tau``/``iterations``/``init`` for centered-clip.

    Raises:
        ConfigError: unknown name or parameter, or a parameter out of range.
    """
    key = _normalise(name, "aggregator", _RULES)
    check_f(f, key)
    pre_params = dict(pre_params or {})
    named = {_normalise(p, "pre-aggregator", _PRE) for p in pre if not isinstance(p, PreAggregator)}
    for p_name in pre_params:
        if _normalise(p_name, "pre-aggregator", _PRE) not in named:
            raise ConfigError(f"pre_params has parameters for {p_name!r}, which is not in pre ({list(pre)}).")
    normalised_params = {_normalise(k, "pre-aggregator", _PRE): v for k, v in pre_params.items()}
    stages: list[PreAggregator] = []
    for p in pre:
        if isinstance(p, PreAggregator):
            stages.append(p)
        else:
            p_key = _normalise(p, "pre-aggregator", _PRE)
            stages.append(build_preaggregator(p_key, **dict(normalised_params.get(p_key, {}))))
    cls = _RULES[key]
    _check_params(cls, key, params, ("f", "pre"))
    return cls(f, stages, **params)


def build_aggregator_from_config(config: AggregationConfig) -> Aggregator:
    """Build the aggregator an :class:`AggregationConfig` section describes."""
    return build_aggregator(
        config.rule, config.f, tuple(config.pre), pre_params=config.pre_params, **config.params
    )

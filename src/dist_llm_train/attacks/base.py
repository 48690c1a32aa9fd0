"""The contract every Byzantine attack follows, and the checks shared by all of them.

An attack is *omniscient*: it sees the honest updates of the round (``honest``, shape ``[h, d]``) and,
where it needs one, the attacker's own honestly computed update (``own``, shape ``[d]``). It returns the
``f`` updates the Byzantine workers send, shape ``[f, d]``, on the device and in the dtype of its inputs.

Attacks never modify their inputs and hold no state between calls apart from a seeded generator, so the
same attack object drives the real runtime and the virtual-clock simulator alike.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor

from dist_llm_train.errors import ConfigError, PreconditionError

__all__ = ["Attack", "check_finite_param", "check_positive_param"]


def check_finite_param(attack: str, name: str, value: object) -> float:
    """Return ``value`` as a float, or raise :class:`ConfigError` if it is not a finite real number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ConfigError(f"attack '{attack}': {name} must be a finite number, got {value!r}.")
    return float(value)


def check_positive_param(attack: str, name: str, value: object) -> float:
    """Return ``value`` as a float, or raise :class:`ConfigError` unless it is finite and > 0."""
    number = check_finite_param(attack, name, value)
    if number <= 0.0:
        raise ConfigError(f"attack '{attack}': {name} must be > 0, got {value!r}.")
    return number


class Attack(ABC):
    """A Byzantine behaviour: ``attack(honest, own, f, generator) -> Tensor[f, d]``.

    Subclasses set the class attributes below and implement :meth:`_forge`; :meth:`__call__` validates the
    inputs first, so every attack rejects malformed calls the same way.

    Attributes:
        name: registry name (what ``build_attack`` and ``cluster.attack`` accept).
        is_data_attack: True when the attack acts on the attacker's *training data* (label flip); its update
            path then just forwards ``own``, which the worker computed on poisoned data.
        needs_own: True when ``own`` must be given.
        min_honest: the fewest honest updates the attack needs to compute its statistics
            (:meth:`required_honest` adds what the attack needs for a given ``f``).
    """

    name: ClassVar[str] = ""
    is_data_attack: ClassVar[bool] = False
    needs_own: bool = False
    min_honest: int = 0

    def __init__(self, *, seed: int = 0) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"attack '{self.name}': seed must be an integer, got {seed!r}.")
        self.seed = seed
        # The only state an attack holds; a generator passed to __call__ takes precedence over it.
        self._generator = torch.Generator().manual_seed(seed)

    def __call__(
        self, honest: Tensor, own: Tensor | None, f: int, generator: torch.Generator | None = None
    ) -> Tensor:
        """Return the ``f`` Byzantine updates, shape ``[f, d]``, for this round.

        Args:
            honest: the honest updates of the round, ``[h, d]`` (the attacker is omniscient). Not modified.
            own: the attacker's own honestly computed update ``[d]``; needed by attacks with ``needs_own``.
            f: how many Byzantine updates to produce (``0`` gives an empty ``[0, d]`` tensor).
            generator: source of randomness for randomised attacks; unset: the attack's own seeded one.
        """
        self._check_inputs(honest, own, f)
        if f == 0:
            return honest.new_empty((0, honest.shape[1]))
        return self._forge(honest, own, f, generator if generator is not None else self._generator)

    def required_honest(self, f: int) -> int:
        """The fewest honest updates the attack needs to forge ``f`` updates (a caller with fewer waits)."""
        del f
        return self.min_honest

    @abstractmethod
    def _forge(self, honest: Tensor, own: Tensor | None, f: int, generator: torch.Generator) -> Tensor:
        """Produce the ``[f, d]`` Byzantine updates; inputs are already validated and must not be modified."""

    def _check_inputs(self, honest: Tensor, own: Tensor | None, f: int) -> None:
        if not isinstance(honest, Tensor) or honest.dim() != 2 or not honest.is_floating_point():
            shape = tuple(honest.shape) if isinstance(honest, Tensor) else type(honest).__name__
            raise PreconditionError(
                f"attack '{self.name}': honest must be a floating-point tensor of shape [h, d], got {shape}; "
                "stack the honest updates with torch.stack."
            )
        if isinstance(f, bool) or not isinstance(f, int) or f < 0:
            raise PreconditionError(f"attack '{self.name}': f must be an integer >= 0, got {f!r}.")
        needed = self.required_honest(f)
        if honest.shape[0] < needed:
            raise PreconditionError(
                f"attack '{self.name}' needs at least {needed} honest updates to compute its "
                f"statistics, got h={honest.shape[0]}; give the attacker more honest inputs or pick another attack."
            )
        if own is None:
            if self.needs_own:
                raise PreconditionError(
                    f"attack '{self.name}' needs the attacker's own update (own=None given); "
                    "compute it honestly on the worker and pass it."
                )
            return
        if not isinstance(own, Tensor) or own.dim() != 1 or own.shape[0] != honest.shape[1]:
            shape = tuple(own.shape) if isinstance(own, Tensor) else type(own).__name__
            raise PreconditionError(
                f"attack '{self.name}': own must be a tensor of shape [d] = [{honest.shape[1]}] matching "
                f"honest [h, d], got {shape}."
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(seed={self.seed})"

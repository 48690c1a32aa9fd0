"""Link arithmetic: how long a message of ``n`` bytes takes over a worker's link, retransmissions included.

One message = one transfer of its whole payload (a model pull, an update push, a heartbeat). Its time is
propagation (``latency ± jitter``) plus serialisation (``bytes · 8 / bandwidth``). With ``loss > 0`` every
transmission is lost with that probability; the sender notices after its retransmission timeout (RTO) and
sends the whole message again, so each lost try costs ``serialisation + rto`` and puts the bytes on the wire
once more. Transfers of one worker do not slow each other down (a worker pulls, computes and pushes one
task after another) and the server's own link is not modelled: it is assumed to be the fast side.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dist_llm_train.errors import PreconditionError

__all__ = ["Transfer", "serialization_s", "transfer"]


@dataclass(frozen=True)
class Transfer:
    """One delivered message.

    ``seconds``: from the first byte sent until the message is fully received. ``sender_s``: until the
    sender put its last byte on the wire (a sender that crashes before then never delivers the message).
    ``attempts``: transmissions (1 + retransmissions); ``wire_bytes`` = ``attempts`` × message bytes.
    """

    seconds: float
    sender_s: float
    attempts: int
    wire_bytes: int


def serialization_s(nbytes: int, bits_per_s: float) -> float:
    """Seconds to put ``nbytes`` on a link of ``bits_per_s`` bits per second."""
    return nbytes * 8.0 / bits_per_s


def transfer(
    nbytes: int,
    bits_per_s: float,
    latency_s: float,
    *,
    jitter_s: float = 0.0,
    loss: float = 0.0,
    rto_s: float = 0.2,
    rng: np.random.Generator | None = None,
) -> Transfer:
    """Time and bytes of sending ``nbytes`` over one link direction.

    Without jitter and loss this is exactly ``latency_s + nbytes · 8 / bits_per_s`` and ``rng`` is not
    needed. Jitter draws the propagation delay uniformly from ``latency ± jitter`` (floored at 0); each
    transmission is lost with probability ``loss`` and costs ``serialisation + rto_s`` before the resend.
    """
    if nbytes < 0 or not bits_per_s > 0:
        raise PreconditionError(f"transfer: nbytes={nbytes} must be >= 0 and bits_per_s={bits_per_s} > 0")
    if (jitter_s > 0 or loss > 0) and rng is None:
        raise PreconditionError("transfer: a link with jitter or loss needs a random generator (rng=)")
    if not 0.0 <= loss < 1.0:
        raise PreconditionError(f"transfer: loss={loss} must be in [0, 1)")
    ser = serialization_s(nbytes, bits_per_s)
    attempts = 1
    busy = 0.0
    if loss > 0:
        assert rng is not None
        while rng.random() < loss:
            busy += ser + rto_s
            attempts += 1
    propagation = latency_s
    if jitter_s > 0:
        assert rng is not None
        propagation = max(0.0, latency_s + float(rng.uniform(-jitter_s, jitter_s)))
    sender = busy + ser
    return Transfer(
        seconds=sender + propagation, sender_s=sender, attempts=attempts, wire_bytes=nbytes * attempts
    )

"""Example-level DP-SGD (Abadi et al. 2016; REFERENCES.md §5) with per-sample gradients from ``torch.func``.

For a batch of B samples: compute every sample's gradient g_i (``vmap`` over ``grad`` of a
``functional_call``), scale it by min(1, C / (‖g_i‖ + 1e-6)) with the norm over *all* trainable parameters,
sum, add N(0, (σC)² I) once, and divide by the *expected* batch size (under Poisson sampling the actual size
varies, and dividing by it would leak the size). For a language model a sample is one sequence: the loss
of a sample is the mean over that sequence's tokens, so the guarantee protects one whole sequence.

Account it with ``PrivacyAccountant.step(sample_rate=expected_batch_size / dataset_size,
noise_multiplier=σ)`` per step; the accountant assumes Poisson sampling of sequences.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from dist_llm_train.errors import ConfigError, NonFiniteError, PreconditionError

__all__ = ["dp_sgd_gradients", "per_sample_gradients"]

LossFn = Callable[[Tensor, Tensor], Tensor]

# Half-precision parameters accumulate the clipped sum in float32 (a sum of B fp16 values loses digits).
_LOW = (torch.float16, torch.bfloat16)


def per_sample_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    *,
    chunk_size: int | None = None,
) -> dict[str, Tensor]:
    """Gradients of each sample's loss, ``{name: Tensor[B, *param.shape]}`` for every trainable parameter.

    ``loss_fn(model_output, sample_targets)`` is called on a batch of one (inputs and targets keep a leading
    dimension of 1) and must return a scalar. Dropout draws different masks per sample; BatchNorm in training
    mode mixes samples and cannot be used (use LayerNorm/GroupNorm).

    Args:
        chunk_size: samples processed by one vmap call; unset: all at once. Memory grows with
            chunk_size × model size; if you run out of memory, lower it (the result is the same).
    """
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    frozen = {name: p.detach() for name, p in model.named_parameters() if not p.requires_grad}
    buffers = {name: b.detach() for name, b in model.named_buffers()}
    if not params:
        raise PreconditionError("per_sample_gradients: the model has no parameter with requires_grad=True.")

    def sample_loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(model, (p, frozen, buffers), (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0), randomness="different", chunk_size=chunk_size)
    return per_sample(params, inputs, targets)


def dp_sgd_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    clip_norm: float,
    noise_multiplier: float,
    expected_batch_size: float,
    generator: torch.Generator | None = None,
    *,
    chunk_size: int | None = None,
) -> dict[str, Tensor]:
    """One DP-SGD gradient: ``(Σ_i clip_C(g_i) + N(0, (σC)² I)) / expected_batch_size`` per parameter.

    The result has one entry per trainable parameter (by ``named_parameters`` name), ready to be written to
    ``param.grad`` or flattened into an update. ``model`` is not modified and no ``.grad`` is touched.

    Args:
        model: the network; ``model(inputs[i:i+1])`` must give the output ``loss_fn`` expects.
        loss_fn: ``loss_fn(output, targets[i:i+1]) -> scalar`` for one sample (for an LM: cross-entropy
            averaged over that sequence's tokens).
        inputs, targets: the batch, with the samples along dim 0.
        clip_norm: C, the per-sample L2 bound over all parameters together. If nearly every sample is clipped,
            gradients lose their relative sizes: raise C; if none is, the noise σC is larger than needed.
        noise_multiplier: σ (>= 0); 0 gives clipped, noise-free gradients (no privacy, useful for tests).
        expected_batch_size: the divisor, q × dataset size under Poisson sampling (not the actual size).
        generator: source of the noise; unset: a fresh generator seeded from the OS entropy.
        chunk_size: see :func:`per_sample_gradients`.

    Raises:
        NonFiniteError: a per-sample gradient is NaN/Inf (a diverged model: lower the learning rate).
    """
    if (
        isinstance(clip_norm, bool)
        or not isinstance(clip_norm, (int, float))
        or not (math.isfinite(clip_norm) and clip_norm > 0)
    ):
        raise ConfigError(f"privacy.clip_norm must be finite and > 0, got {clip_norm!r}.")
    if (
        isinstance(noise_multiplier, bool)
        or not isinstance(noise_multiplier, (int, float))
        or not (math.isfinite(noise_multiplier) and noise_multiplier >= 0)
    ):
        raise ConfigError(f"privacy.noise_multiplier must be finite and >= 0, got {noise_multiplier!r}.")
    if (
        isinstance(expected_batch_size, bool)
        or not isinstance(expected_batch_size, (int, float))
        or not (math.isfinite(expected_batch_size) and expected_batch_size > 0)
    ):
        raise ConfigError(f"dp_sgd_gradients: expected_batch_size must be > 0, got {expected_batch_size!r}.")
    if inputs.dim() < 1 or targets.dim() < 1 or inputs.shape[0] != targets.shape[0]:
        raise PreconditionError(
            f"dp_sgd_gradients: inputs and targets need the same number of samples along dim 0, got "
            f"{tuple(inputs.shape)} and {tuple(targets.shape)}."
        )

    batch = inputs.shape[0]
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    total = {
        name: torch.zeros_like(p, dtype=torch.float32 if p.dtype in _LOW else p.dtype)
        for name, p in params.items()
    }
    if batch > 0:
        grads = per_sample_gradients(model, loss_fn, inputs, targets, chunk_size=chunk_size)
        sq_norms = torch.zeros(batch, dtype=torch.float64, device=inputs.device)
        for g in grads.values():
            sq_norms = sq_norms + g.flatten(1).double().pow(2).sum(dim=1).to(sq_norms.device)
        norms = sq_norms.sqrt()
        if not bool(torch.isfinite(norms).all()):
            raise NonFiniteError(
                "dp_sgd_gradients: a per-sample gradient is NaN or Inf; the model has diverged, lower the "
                "learning rate or restore a checkpoint."
            )
        factors = torch.clamp(clip_norm / (norms + 1e-6), max=1.0)
        for name, g in grads.items():
            f = factors.to(device=g.device, dtype=total[name].dtype).view(-1, *([1] * (g.dim() - 1)))
            total[name] = (g.to(total[name].dtype) * f).sum(dim=0)

    if generator is None:
        generator = torch.Generator()
        generator.seed()
    std = noise_multiplier * clip_norm
    out: dict[str, Tensor] = {}
    for name, p in params.items():
        acc = total[name]
        if std > 0:
            noise = torch.randn(acc.shape, generator=generator, device=generator.device, dtype=torch.float32)
            acc = acc + noise.to(device=acc.device, dtype=acc.dtype) * std
        out[name] = (acc / expected_batch_size).to(p.dtype)
    return out

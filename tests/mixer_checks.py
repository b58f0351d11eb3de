"""Checks every sequence mixer (lra.models.mixers) must pass, shared by its test files.

A mixer maps x [B, L, E] and mask [B, L] to [B, L, E]. `check_contract` (shape, dtype,
finite), `check_no_mask_leak` (values at masked positions change no real output, nor
the gradient's real part), `check_no_future_leak` (causal) and
`check_step_equals_full_pass` (causal decoding) take a mixer built with `make_mixer`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lra.models import mixers


def make_mixer(name, *, emb_dim=8, max_len=16, causal=False, dropout=0.0,
               dtype=jnp.float32, seed=0, **options):
    return mixers.make(name, emb_dim=emb_dim, qkv_dim=emb_dim, num_heads=2, max_len=max_len,
                       dropout=dropout, attention_dropout=0.0, causal=causal, dtype=dtype,
                       rngs=nnx.Rngs(seed), **options)


def random_x(shape, seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def pure(mixer, mask, deterministic=True):
    """x -> output as a traceable function, the same randomness on every call."""
    graphdef, state = nnx.split(mixer)

    def apply(x):
        return nnx.merge(graphdef, state, copy=True)(x, mask, deterministic=deterministic)

    return apply


def check_contract(mixer, x, mask, deterministic=True):
    """Output shape and dtype equal x's; every value (masked rows too) is finite."""
    out = pure(mixer, mask, deterministic)(x)
    assert out.shape == x.shape and out.dtype == x.dtype, (out.shape, out.dtype)
    assert np.isfinite(np.asarray(out, np.float32)).all()
    return out


def check_no_mask_leak(mixer, x, mask, deterministic=True, atol=0.0):
    """Perturbing x at masked positions changes no real output (exactly, unless `atol`),
    and the gradient of a loss on real outputs is zero at masked positions."""
    apply = pure(mixer, mask, deterministic)
    real = np.asarray(mask)
    noise = np.random.default_rng(5).normal(size=x.shape) * 10.0
    perturbed = jnp.where(mask[..., None], x, x + noise.astype(x.dtype))
    out = np.asarray(apply(x), np.float64)
    np.testing.assert_allclose(np.asarray(apply(perturbed), np.float64)[real], out[real],
                               rtol=0, atol=atol)
    weights = jnp.asarray(np.random.default_rng(7).normal(size=x.shape), x.dtype)
    grad = np.asarray(jax.grad(lambda x: jnp.sum(apply(x) * weights * mask[..., None]))(x),
                      np.float64)
    assert np.isfinite(grad).all()
    np.testing.assert_array_equal(grad[~real], 0.0)
    assert np.abs(grad[real]).sum() > 0  # the check can fail


def check_no_future_leak(mixer, x, mask=None):
    """A causal output at i has zero gradient with respect to x at j > i."""
    apply = pure(mixer, mask)
    for i in range(x.shape[1]):
        grad = jax.grad(lambda x: jnp.sum(apply(x)[:, i]))(x)
        np.testing.assert_array_equal(np.asarray(grad, np.float64)[:, i + 1:], 0.0)


def check_step_equals_full_pass(mixer, x, mask, rtol=1e-5):
    """`init_state` / `step` over tokens 0, 1, ... give the full causal pass's outputs."""
    full = np.asarray(mixer(x, mask, deterministic=True), np.float64)
    state = mixer.init_state(x.shape[0])
    steps = []
    for t in range(x.shape[1]):
        state, y_BxE = mixer.step(state, x[:, t], mask[:, t], t)
        steps.append(np.asarray(y_BxE, np.float64))
    stepped = np.stack(steps, 1)
    real = np.asarray(mask)
    np.testing.assert_allclose(stepped[real], full[real], rtol=0,
                               atol=rtol * np.abs(full[real]).max())

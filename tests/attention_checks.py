"""Checks every attention family must pass, shared by the per-family test files.

A family's test file builds its core with `make_core`, then calls `check_contract` (shapes,
dtypes, finite values, masked rows), `check_no_mask_leak` (outputs and gradients) and, for
causal cores, `check_no_future_leak`; it compares with `reference_attention`, a naive
float64 NumPy softmax over an explicit allowed pattern [B, H|1, L, L] that the test builds
from the family's own definition.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lra.models import attention


def make_core(name, *, num_heads=2, head_dim=4, max_len=16, causal=False, dropout_rate=0.0,
              seed=0, **options):
    return attention.make(
        name, num_heads=num_heads, head_dim=head_dim, max_len=max_len, causal=causal,
        dropout_rate=dropout_rate, rngs=nnx.Rngs(params=seed, dropout=seed + 1), **options)


def random_qkv(shape, seed=0, dtype=jnp.float32):
    """Three arrays of `shape` = (B, L, H, D) with standard normal entries."""
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=shape), dtype) for _ in range(3))


def float64_by_name(state):
    """An nnx.State of parameters (or their gradients) as float64 NumPy arrays by name,
    for references written in NumPy."""
    unwrap = lambda x: x.get_value() if isinstance(x, nnx.Variable) else x
    return {path[-1]: np.asarray(unwrap(x), np.float64) for path, x in nnx.to_flat_state(state)}


def float64_params(core):
    """A core's parameters as float64 NumPy arrays (name -> array)."""
    return float64_by_name(nnx.state(core, nnx.Param))


def outputs_and_input_grads(core, q, k, v, mask, seed=9):
    """(output, (dq, dk, dv)) of sum(output * fixed random weights), compiled at XLA's
    lowest optimisation level (these checks compare numbers, not speed)."""
    apply = pure(core, mask)
    weights = jnp.asarray(np.random.default_rng(seed).normal(size=q.shape), jnp.float32)

    def loss(q, k, v):
        out = apply(q, k, v)
        return jnp.sum(out * weights), out

    fn = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))
    compiled = fn.lower(q, k, v).compile({"xla_backend_optimization_level": 0})
    (_, out), grads = compiled(q, k, v)
    return out, grads


def edge_mask(batch, length, seed=0):
    """Row 0 all real; row 1 one real token (not the first); others random, >= 1 real.

    Real tokens need not be a prefix: families must not assume they are.
    """
    rng = np.random.default_rng(seed)
    mask = rng.random((batch, length)) < 0.6
    mask[0] = True
    if batch > 1:
        mask[1] = False
        mask[1, length // 2] = True
    mask[2:, -1] = True
    mask[2:, 0] = False
    return jnp.asarray(mask)


def prefix_mask(lengths, length):
    """Real tokens first, padding after (how the data pipeline makes masks)."""
    return jnp.arange(length)[None, :] < jnp.asarray(lengths)[:, None]


def reference_attention(q, k, v, allowed):
    """Softmax attention over an explicit pattern, float64.

    Args:
      q, k, v: [B, L, H, D].
      allowed: bool, broadcastable to [B, H, L(query), L(key)].

    Returns:
      [B, L, H, D]; NaN rows where a query has no allowed key.
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(allowed, logits, -np.inf)
    with np.errstate(invalid="ignore", divide="ignore"):
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights = weights / weights.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", weights, v)


def key_pattern(mask, causal=False):
    """The allowed pattern of plain masked (causal) attention: [B, 1, L, L]."""
    mask = np.asarray(mask)
    length = mask.shape[1]
    allowed = np.ones((length, length), bool)
    if causal:
        allowed = np.tril(allowed)
    return allowed[None, None] & mask[:, None, None, :]


def pure(core, mask, deterministic=True):
    """(q, k, v) -> output as a traceable function, the same randomness on every call."""
    graphdef, state = nnx.split(core)

    def apply(q, k, v):
        return nnx.merge(graphdef, state, copy=True)(q, k, v, mask, deterministic=deterministic)

    return apply


def outputs_and_grads(core, q, k, v, mask):
    """(output, (dq, dk, dv)) of sum(output * fixed random weights)."""
    apply = pure(core, mask)
    weights = jnp.asarray(np.random.default_rng(9).normal(size=q.shape), q.dtype)

    def loss(q, k, v):
        out = apply(q, k, v)
        return jnp.sum(out * weights), out

    (_, out), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


def assert_close_relative(actual, expected, rtol=1e-5):
    """|actual - expected| <= rtol * max |expected| everywhere, in float64 (same shapes;
    an all-zero expectation is refused, since then the comparison could not fail)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = np.abs(expected).max()
    assert scale > 0
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


def _perturb_masked(x, mask, seed):
    noise = np.random.default_rng(seed).normal(size=x.shape) * 10.0
    return jnp.where(mask[:, :, None, None], x, x + noise.astype(x.dtype))


def check_contract(core, q, k, v, mask, deterministic=True):
    """Output shape and dtype equal q's; every value (masked rows too) is finite."""
    out = pure(core, mask, deterministic)(q, k, v)
    assert out.shape == q.shape, (out.shape, q.shape)
    assert out.dtype == q.dtype, (out.dtype, q.dtype)
    assert np.isfinite(np.asarray(out, np.float32)).all()
    return out


def check_no_mask_leak(core, q, k, v, mask, deterministic=True, atol=0.0):
    """Values at masked positions change no real output, nor its gradients' real part.

    Perturbs q, k and v at masked positions; real outputs must stay (exactly, unless
    `atol` allows float noise); the gradient of a loss on real outputs with respect to
    masked-position inputs must be exactly zero.
    """
    apply = pure(core, mask, deterministic)
    real = np.asarray(mask)
    out = np.asarray(apply(q, k, v), np.float64)
    perturbed = [_perturb_masked(x, mask, seed) for seed, x in enumerate((q, k, v))]
    out_perturbed = np.asarray(apply(*perturbed), np.float64)
    np.testing.assert_allclose(out_perturbed[real], out[real], rtol=0, atol=atol)

    weights = jnp.asarray(np.random.default_rng(7).normal(size=q.shape), q.dtype)

    def loss(q, k, v):
        return jnp.sum(apply(q, k, v) * weights * mask[:, :, None, None])

    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    for grad in grads:
        grad = np.asarray(grad, np.float64)
        assert np.isfinite(grad).all()
        np.testing.assert_array_equal(grad[~real], 0.0)
    assert np.abs(np.asarray(grads[2], np.float64)[real]).sum() > 0  # the check can fail


def check_no_future_leak(core, q, k, v, mask=None, deterministic=True):
    """A causal output at i has zero gradient with respect to q, k, v at j > i."""
    apply = pure(core, mask, deterministic)
    length = q.shape[1]
    for i in range(length):
        grads = jax.grad(lambda q, k, v: jnp.sum(apply(q, k, v)[:, i]), argnums=(0, 1, 2))(q, k, v)
        for grad in grads:
            np.testing.assert_array_equal(np.asarray(grad, np.float64)[:, i + 1:], 0.0)

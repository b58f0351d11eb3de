"""Attention registry and families: contract, naive reference, mask leaks, dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lra.models import attention
from lra.models.attention import softmax

B, L, H, D = 3, 7, 2, 4


def _make(name="softmax", *, causal=False, dropout_rate=0.0, **options):
    return attention.make(
        name,
        num_heads=H,
        head_dim=D,
        max_len=L,
        causal=causal,
        dropout_rate=dropout_rate,
        rngs=nnx.Rngs(params=0, dropout=1),
        **options,
    )


def _qkv(seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=(B, L, H, D)), dtype) for _ in range(3))


def _mask(seed=0):
    """Row 0 all real, row 1 exactly one real token (not at 0), row 2 random."""
    rng = np.random.default_rng(seed)
    mask = np.ones((B, L), bool)
    mask[1] = False
    mask[1, 3] = True
    mask[2] = rng.random(L) < 0.5
    mask[2, [0, L - 1]] = [False, True]  # at least one real, one masked
    return jnp.asarray(mask)


def _reference(q, k, v, mask, causal):
    """Naive masked softmax attention in float64; NaN rows where no key is allowed."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    allowed = np.ones((L, L), bool)
    if causal:
        allowed = np.tril(allowed)
    allowed = allowed[None, None] & np.asarray(mask)[:, None, None, :]
    logits = np.where(allowed, logits, -np.inf)
    with np.errstate(invalid="ignore"):
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights = weights / weights.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", weights, v)


def _perturb_masked(x, mask, seed):
    noise = np.random.default_rng(seed).normal(size=x.shape) * 100.0
    return jnp.where(mask[:, :, None, None], x, x + noise.astype(x.dtype))


# --- registry -----------------------------------------------------------------


def test_names_contains_softmax():
    assert isinstance(attention.NAMES, tuple)
    assert "softmax" in attention.NAMES


def test_unknown_name_lists_known():
    with pytest.raises(ValueError, match="nonexistent.*softmax"):
        _make("nonexistent")


def test_unknown_option_names_family_and_accepted():
    with pytest.raises(ValueError, match="softmax.*bogus.*implementation"):
        _make(bogus=1)


def test_family_options_from_constructor():
    assert attention.family_options("softmax") == ("implementation",)


def test_bad_enum_value_lists_choices():
    with pytest.raises(ValueError, match="implementation.*'xla'.*'cudnn'.*'flash'"):
        _make(implementation="flash")


def test_cudnn_lengths_give_the_masked_attention_on_real_rows():
    """The cuDNN path's per-example lengths equal the dense mask for right padding.

    cuDNN itself needs a GPU; XLA takes the same length arguments, so the lengths that
    `seq_lengths_of` builds are checked against the dense mask here.
    """
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(3, 16, 2, 8)), jnp.float32) for _ in range(3))
    lengths = np.array([16, 9, 1])
    mask_BxL = jnp.asarray(np.arange(16)[None] < lengths[:, None])
    with_lengths = jax.nn.dot_product_attention(
        q, k, v, implementation="xla", **softmax.seq_lengths_of(mask_BxL))
    with_mask = jax.nn.dot_product_attention(q, k, v, mask=mask_BxL[:, None, None, :])
    for row, length in enumerate(lengths):
        np.testing.assert_allclose(with_lengths[row, :length], with_mask[row, :length], atol=1e-6)
    assert softmax.seq_lengths_of(None) == {}


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN needs an NVIDIA GPU "
                    "(scripts/gpu_check.sh runs this file there)")
def test_cudnn_equals_xla_attention_on_real_rows():
    """On a GPU: cuDNN's fused attention (bfloat16, right padding) gives XLA's outputs."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 128, 2, 64)), jnp.bfloat16) for _ in range(3))
    lengths = np.array([128, 77])
    mask_BxL = jnp.asarray(np.arange(128)[None] < lengths[:, None])
    outputs = {implementation: softmax.SoftmaxAttention(
        num_heads=2, head_dim=64, max_len=128, rngs=nnx.Rngs(0),
        implementation=implementation)(q, k, v, mask_BxL)
        for implementation in ("xla", "cudnn")}
    for row, length in enumerate(lengths):
        np.testing.assert_allclose(np.float32(outputs["cudnn"][row, :length]),
                                   np.float32(outputs["xla"][row, :length]), atol=3e-2, rtol=3e-2)


def test_cudnn_rejects_attention_dropout():
    with pytest.raises(ValueError, match="cudnn.*no attention dropout"):
        softmax.SoftmaxAttention(num_heads=2, head_dim=8, max_len=16, dropout_rate=0.1,
                                 rngs=nnx.Rngs(0), implementation="cudnn")


def test_enum_accepts_value_and_member():
    assert _make(implementation="xla").implementation is softmax.Implementation.XLA
    assert (
        _make(implementation=softmax.Implementation.CUDNN).implementation
        is softmax.Implementation.CUDNN
    )


# --- exactness ----------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_naive_reference(causal, masked):
    q, k, v = _qkv()
    mask = _mask() if masked else jnp.ones((B, L), bool)
    out = _make(causal=causal)(q, k, v, mask if masked else None)
    expected = _reference(q, k, v, mask, causal)
    real = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(out)[real], expected[real], atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_explicit_path_matches_reference(causal):
    q, k, v = _qkv(1)
    mask = _mask(1)
    keep = mask[:, None, None, :]
    out = softmax._explicit_attention(q, k, v, keep, causal, lambda p: p)
    real = np.asarray(mask)
    expected = _reference(q, k, v, mask, causal)
    np.testing.assert_allclose(np.asarray(out)[real], expected[real], atol=1e-5)


# --- masking ------------------------------------------------------------------


def _pure(core, mask, deterministic):
    """(q, k, v) -> output, with the same dropout pattern on every call (traceable)."""
    graphdef, state = nnx.split(core)

    def apply(q, k, v):
        core = nnx.merge(graphdef, state, copy=True)
        return core(q, k, v, mask, deterministic=deterministic)

    return apply


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("deterministic", [True, False])
def test_masked_values_do_not_leak(causal, deterministic):
    core = _make(causal=causal, dropout_rate=0.5)
    q, k, v = _qkv()
    mask = _mask()
    apply = _pure(core, mask, deterministic)
    out = apply(q, k, v)
    perturbed = [_perturb_masked(x, mask, seed) for seed, x in enumerate((q, k, v))]
    out2 = apply(*perturbed)
    real = np.asarray(mask)
    np.testing.assert_array_equal(np.asarray(out)[real], np.asarray(out2)[real])
    assert np.isfinite(np.asarray(out2)).all()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("deterministic", [True, False])
def test_masked_positions_get_zero_gradient(causal, deterministic):
    core = _make(causal=causal, dropout_rate=0.5)
    q, k, v = _qkv(2)
    mask = _mask(2)
    weights = jnp.asarray(np.random.default_rng(3).normal(size=(B, L, H, D)))
    apply = _pure(core, mask, deterministic)

    def loss(q, k, v):
        out = apply(q, k, v)
        return jnp.sum(out * weights * mask[:, :, None, None])

    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    masked = ~np.asarray(mask)
    for grad in grads:
        assert np.isfinite(np.asarray(grad)).all()
        np.testing.assert_array_equal(np.asarray(grad)[masked], 0.0)
    assert np.abs(np.asarray(grads[2])[~masked]).sum() > 0  # the test can fail


@pytest.mark.parametrize("deterministic", [True, False])
def test_causal_no_future_gradients(deterministic):
    core = _make(causal=True, dropout_rate=0.5)
    q, k, v = _qkv(4)
    apply = _pure(core, None, deterministic)

    def output_at(i, q, k, v):
        return jnp.sum(apply(q, k, v)[:, i])

    for i in range(L):
        grads = jax.grad(output_at, argnums=(1, 2, 3))(i, q, k, v)
        for grad in grads:
            np.testing.assert_array_equal(np.asarray(grad)[:, i + 1 :], 0.0)
        assert np.abs(np.asarray(grads[2])[:, : i + 1]).sum() > 0


# --- dropout ------------------------------------------------------------------


def test_dropout_changes_outputs_only_when_not_deterministic():
    core = _make(dropout_rate=0.5)
    q, k, v = _qkv()
    mask = _mask()
    deterministic = core(q, k, v, mask)
    real = np.asarray(mask)
    expected = _reference(q, k, v, mask, causal=False)
    np.testing.assert_allclose(np.asarray(deterministic)[real], expected[real], atol=1e-5)
    nnx.reseed(core, dropout=7)
    dropped = core(q, k, v, mask, deterministic=False)
    assert not np.allclose(np.asarray(dropped)[real], np.asarray(deterministic)[real])
    nnx.reseed(core, dropout=7)
    again = core(q, k, v, mask, deterministic=False)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(dropped))
    nnx.reseed(core, dropout=8)
    other = core(q, k, v, mask, deterministic=False)
    assert not np.allclose(np.asarray(other), np.asarray(dropped))


# --- shapes, dtypes, finite values --------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("deterministic", [True, False])
def test_shape_dtype_finite_with_fully_masked_row(dtype, causal, deterministic):
    core = _make(causal=causal, dropout_rate=0.5)
    q, k, v = _qkv(5, dtype)
    mask = _mask(5).at[0].set(False)  # row 0: no real token at all
    out = core(q, k, v, mask, deterministic=deterministic)
    assert out.shape == (B, L, H, D)
    assert out.dtype == dtype
    assert np.isfinite(np.asarray(out, np.float32)).all()
    out_no_mask = core(q, k, v, None, deterministic=deterministic)
    assert out_no_mask.shape == (B, L, H, D) and out_no_mask.dtype == dtype


def test_bfloat16_close_to_reference():
    q, k, v = _qkv(6, jnp.bfloat16)
    mask = _mask(6)
    out = _make()(q, k, v, mask)
    real = np.asarray(mask)
    expected = _reference(q, k, v, mask, causal=False)
    np.testing.assert_allclose(
        np.asarray(out, np.float32)[real], expected[real], atol=5e-2, rtol=5e-2
    )

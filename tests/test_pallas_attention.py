"""softmax's ``implementation="pallas"``: JAX's Pallas flash-attention kernels (flash.py).

On this CPU the kernels run in Pallas' interpret mode, the path the platform rule picks
here (the GPU kernel) and, forced, splash attention (the TPU kernel): both against the
XLA path in outputs and in gradients at real positions, through the attention contract,
and lowered for CUDA and TPU without a device (Triton / Mosaic custom calls).
"""

import functools

import attention_checks as checks
import jax
import jax.numpy as jnp
import mixer_checks
import numpy as np
import pytest
from flax import nnx

from configs import listops as listops_config
from lra.common import set_path
from lra.models.attention import flash, softmax
from lra.training import validation

H, D = 2, 16
KERNELS = ("gpu", "tpu")


def _pallas(causal, **options):
    return checks.make_core("softmax", num_heads=H, head_dim=D, max_len=128, causal=causal,
                            implementation="pallas", **options)


def _loss_on_real_outputs(attend, mask):
    """(q, k, v) -> (sum over real positions of output * fixed weights, output)."""
    def loss(q, k, v):
        out = attend(q, k, v)
        weights = jnp.asarray(np.random.default_rng(9).normal(size=out.shape), out.dtype)
        return jnp.sum(out * weights * mask[:, :, None, None]), out
    return loss


def _outputs_and_grads(attend, q, k, v, mask):
    grad_fn = jax.value_and_grad(_loss_on_real_outputs(attend, mask), (0, 1, 2), has_aux=True)
    (_, out), grads = jax.jit(grad_fn)(q, k, v)
    return out, grads


def _xla(q, k, v, mask, causal):
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :], is_causal=causal,
                                        implementation="xla")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("causal", [False, True])
def test_pallas_equals_xla_in_outputs_and_gradients(kernel, causal):
    """Right padding (lengths L, L - 5) and L = 37, a multiple of no kernel block: the same
    outputs at real positions and the same gradients w.r.t. q, k, v (zero at padding)."""
    length = 37
    q, k, v = checks.random_qkv((2, length, H, D), seed=1)
    mask = checks.prefix_mask([length, length - 5], length)
    pallas = lambda q, k, v: flash.attention(q, k, v, mask, causal=causal, kernel=kernel,
                                             interpret=True)
    out, grads = _outputs_and_grads(pallas, q, k, v, mask)
    expected_out, expected_grads = _outputs_and_grads(
        lambda q, k, v: _xla(q, k, v, mask, causal), q, k, v, mask)
    real = np.asarray(mask)
    checks.assert_close_relative(np.asarray(out)[real], np.asarray(expected_out)[real])
    for grad, expected in zip(grads, expected_grads):
        checks.assert_close_relative(grad, expected)
        np.testing.assert_array_equal(np.asarray(grad)[~real], 0.0)


@pytest.mark.parametrize("length", [1, 64])
def test_short_and_odd_lengths(length):
    """Lengths 1 and 64 (below and at a block), causal, the last token masked
    in row 1 (none masked at length 1), through the module and the platform's kernel."""
    q, k, v = checks.random_qkv((2, length, H, D), seed=length)
    mask = checks.prefix_mask([length, max(length - 1, 1)], length)
    out = jax.jit(lambda q, k, v: _pallas(True)(q, k, v, mask))(q, k, v)
    real = np.asarray(mask)
    assert out.shape == q.shape and np.isfinite(np.asarray(out)).all()
    checks.assert_close_relative(np.asarray(out)[real],
                                 np.asarray(_xla(q, k, v, mask, True))[real])


class _JittedCore(nnx.Module):
    """softmax with implementation="pallas" called under `jax.jit` (the contract's checks
    call their core eagerly; Pallas' interpret mode is slow outside jit)."""

    def __init__(self, causal: bool):
        self.causal = causal

    def __call__(self, q, k, v, mask=None, *, deterministic=True):
        return _jitted_pallas(q, k, v, mask, causal=self.causal)


@functools.partial(jax.jit, static_argnames="causal")
def _jitted_pallas(q, k, v, mask, causal):
    core = checks.make_core("softmax", num_heads=q.shape[2], head_dim=q.shape[3],
                            max_len=q.shape[1], causal=causal, implementation="pallas")
    return core(q, k, v, mask)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_contract(causal):
    """The attention contract (tests/attention_checks.py) on masks with holes and a row
    with one real token; head width 4 (padded to 16 inside) and no mask as well."""
    core = _JittedCore(causal)
    q, k, v = checks.random_qkv((4, 24, H, 4), seed=3)
    mask = checks.edge_mask(4, 24, seed=3)
    out = checks.check_contract(core, q, k, v, mask)
    checks.check_no_mask_leak(core, q, k, v, mask)
    real = np.asarray(mask)
    expected = checks.reference_attention(q, k, v, checks.key_pattern(mask, causal))
    checks.assert_close_relative(np.asarray(out)[real], expected[real])
    unmasked = checks.check_contract(core, q, k, v, None)
    checks.assert_close_relative(
        unmasked, checks.reference_attention(q, k, v, checks.key_pattern(
            np.ones((4, 24), bool), causal)))
    if causal:
        checks.check_no_future_leak(core, q, k, v, mask)


@pytest.mark.parametrize("causal", [False, True])
def test_mixer_contract(causal):
    """The mixer registry's contract (tests/mixer_checks.py, as test_mixer_contract.py runs
    it for softmax's default options) with implementation="pallas": 72 tokens, right
    padding, holes and a row without real tokens; and the dtypes under 64-bit mode."""
    new_mixer = lambda: mixer_checks.make_mixer("softmax", max_len=72, causal=causal,
                                                implementation="pallas")
    x, mask = mixer_checks.random_x((4, 72, 8)), mixer_checks.contract_mask(4, 72)
    mixer_checks.check_mixer_contract(new_mixer(), x, mask, causal=causal)
    mixer_checks.check_dtypes_under_x64(new_mixer, x, mask)


def test_bfloat16_keeps_the_dtype():
    q, k, v = checks.random_qkv((2, 40, H, D), seed=4, dtype=jnp.bfloat16)
    mask = checks.prefix_mask([40, 33], 40)
    out = _pallas(False)(q, k, v, mask)
    assert out.dtype == jnp.bfloat16
    real = np.asarray(mask)
    np.testing.assert_allclose(np.float32(out)[real],
                               np.float32(_xla(q, k, v, mask, False))[real], atol=3e-2)


def test_batch_split_over_the_mesh_in_context():
    """Under `jax.set_mesh` the kernel runs in a `shard_map` over the batch (XLA cannot
    split a Pallas kernel), with the same outputs."""
    q, k, v = checks.random_qkv((4, 20, H, D), seed=5)
    mask = checks.prefix_mask([20, 15, 7, 1], 20)
    attend = lambda q, k, v: flash.attention(q, k, v, mask, causal=True)
    alone = jax.jit(attend)(q, k, v)
    mesh = jax.make_mesh((4, 1), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    with jax.set_mesh(mesh):
        assert "shard_map" in str(jax.make_jaxpr(attend)(q, k, v))
        split = jax.jit(attend)(q, k, v)
    real = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(split)[real], np.asarray(alone)[real], atol=1e-6)


def test_pallas_refuses_attention_dropout():
    with pytest.raises(ValueError, match="implementation='pallas' has no attention dropout"):
        _pallas(False, dropout_rate=0.1)
    assert _pallas(False, dropout_rate=0.0).implementation is softmax.Implementation.PALLAS


def _config(arguments="runlocal", **overrides):
    config = listops_config.get_config(arguments)
    for key, value in overrides.items():
        set_path(config, key, value)
    return config


def test_validation_names_the_dropout_key_for_pallas():
    config = _config(**{"model.attention_dropout": 0.1,
                        "model.attention_options.implementation": "pallas"})
    with pytest.raises(ValueError, match=(
            r"config\.model\.attention_options\.implementation='pallas' cannot run with "
            r"config\.model\.attention_dropout=0\.1 \(the Pallas kernels have no dropout")):
        validation.validate_config(config, num_devices=1)
    # float32 is fine for pallas (cuDNN alone needs bfloat16), without dropout
    validation.validate_config(_config(**{"model.attention_dropout": 0.0,
                                          "model.attention_options.implementation": "pallas"}),
                               num_devices=1)


def test_validation_covers_softmax_in_a_pattern():
    config = _config("runlocal,pattern=linear+softmax", **{
        "model.num_layers": 2, "model.attention_dropout": 0.1,
        "model.pattern_options.softmax.implementation": "pallas"})
    with pytest.raises(ValueError, match=(
            r"config\.model\.pattern_options\.softmax\.implementation='pallas' cannot run "
            r"with config\.model\.attention_dropout=0\.1")):
        validation.validate_config(config, num_devices=1)


def _lowered_text(fn, platform, *args):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("kernel, platform, custom_call", [
    ("gpu", "cuda", "__gpu$xla.gpu.triton"),
    ("tpu", "tpu", "tpu_custom_call"),
])
def test_lowers_for_the_accelerator_without_one(kernel, platform, custom_call):
    """The forward and backward passes lower for CUDA (Triton kernels) and TPU (Mosaic
    kernels) on this CPU; compiling them needs the device."""
    shape = jax.ShapeDtypeStruct((2, 200, H, 64), jnp.bfloat16)
    mask = jax.ShapeDtypeStruct((2, 200), jnp.bool_)

    def loss(q, k, v, mask):
        out = flash.attention(q, k, v, mask, causal=True, kernel=kernel, interpret=False)
        return jnp.sum(out.astype(jnp.float32))

    grads = lambda q, k, v, mask: jax.grad(loss, (0, 1, 2))(q, k, v, mask)
    text = _lowered_text(grads, platform, shape, shape, shape, mask)
    assert text.count(custom_call) >= 2  # forward and backward kernels

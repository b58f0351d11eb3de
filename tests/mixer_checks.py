"""The mixer contract: checks every token mixer (lra.models.mixers) must pass.

A mixer maps x [B, L, E] and mask [B, L] to [B, L, E]. tests/test_mixer_contract.py runs
`check_mixer_contract` on every registered mixer with its default options; a family's own
test file runs it (or one of its parts) on configurations the defaults do not reach
(another form, tiny chunks). The parts:

- `check_contract`: the output has x's shape and dtype and is finite everywhere, also on a
  row with no real token;
- `check_no_mask_leak`: values at masked positions (right padding and holes in the middle)
  change no real output, and the gradient of real outputs with respect to masked inputs
  is exactly zero;
- `check_no_future_leak` (causal mixers): a real output i has zero gradient with respect
  to every input j > i;
- `check_step_equals_full_pass` (mixers that decode, `init_state` / `step`): token by token
  gives the full causal pass;
- `check_dtypes_under_x64`: with JAX's global 64-bit mode on, parameters, outputs and
  gradients stay float32.

Every check reads one jitted pass (`probe`: the outputs, the outputs with noise at masked
inputs, and the gradients of the outputs at each position and of each row), so a mixer
compiles once for the whole contract (twice if it decodes); the dtype check only traces.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lra.models import mixers

_QUICK_COMPILE = {"xla_backend_optimization_level": 0}


def make_mixer(name, *, emb_dim=8, max_len=16, causal=False, dropout=0.0,
               dtype=jnp.float32, seed=0, **options):
    return mixers.make(name, emb_dim=emb_dim, qkv_dim=emb_dim, num_heads=2, max_len=max_len,
                       dropout=dropout, attention_dropout=0.0, causal=causal, dtype=dtype,
                       rngs=nnx.Rngs(seed), **options)


def random_x(shape, seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def contract_mask(batch: int, length: int) -> jax.Array:
    """Row 0 all real; row 1 right padding (the second half masked but for 3 tokens);
    row 2 holes: every 7th token from the first, a run of 5 in the middle and the last 2
    masked; row 3 (if batch > 3) no real token; further rows random, with at least one
    real token."""
    assert batch >= 3 and length >= 16
    mask = np.random.default_rng(0).random((batch, length)) < 0.6
    mask[:, length // 4] = True
    mask[0] = True
    mask[1] = np.arange(length) < length // 2 + 3
    mask[2] = True
    mask[2, ::7] = False
    mask[2, length // 2 - 2: length // 2 + 3] = False
    mask[2, -2:] = False
    mask[3:4] = False
    return jnp.asarray(mask)


def pure(mixer, mask, deterministic=True):
    """x -> output as a traceable function, the same randomness on every call."""
    graphdef, state = nnx.split(mixer)

    def apply(x):
        return nnx.merge(graphdef, state, copy=True)(x, mask, deterministic=deterministic)

    return apply


class Probe(NamedTuple):
    """What the checks read from one jitted pass of a mixer (`probe`), float64 NumPy.

    With fixed random weights w [B, L, E] and y = sum over channels of w * output:
    out: the output [B, L, E]; perturbed: the output with noise added at masked inputs;
    by_position [B, L(out), L(in), E]:
    d (sum_b y[b, i]) / d x[b, j] at [b, i, j] (each row's own derivatives when rows are
    independent); by_row [B(out), B(in), L, E]: d (sum_i y[b, i]) / d x[b', j].
    """

    out: np.ndarray
    perturbed: np.ndarray
    by_position: np.ndarray
    by_row: np.ndarray
    dtype: np.dtype


def probe(mixer, x, mask, deterministic=True) -> Probe:
    """Runs the mixer once, jitted, for everything the checks need (one compilation)."""
    graphdef, state = nnx.split(mixer)
    noise = np.random.default_rng(5).normal(size=x.shape) * 10.0
    weights = jnp.asarray(np.random.default_rng(7).normal(size=x.shape), x.dtype)

    def run(state, x, mask):
        def apply(x, mask):
            return nnx.merge(graphdef, state, copy=True)(x, mask, deterministic=deterministic)

        perturbed = jnp.where(mask[..., None], x, x + noise.astype(x.dtype))
        weighted = lambda x: jnp.sum(apply(x, mask) * weights, -1)
        return apply(x, mask), apply(perturbed, mask), *_derivatives(weighted, x)

    outputs = _compiled(run, state, x, mask)(state, x, mask)
    assert all(out.shape == x.shape for out in outputs[:2]), [o.shape for o in outputs[:2]]
    out, perturbed, by_position_LxBxLxE, by_row = (np.asarray(o, np.float64) for o in outputs)
    return Probe(out, perturbed, by_position_LxBxLxE.transpose(1, 0, 2, 3), by_row,
                 outputs[0].dtype)


def _compiled(fn, *args):
    """`fn` jitted for `args` without XLA's backend optimisations: the checks run each
    function once on a few tokens, so compiling is most of their time (halved), and
    what they check (exact zeros, equal values) does not depend on optimisation."""
    return jax.jit(fn).lower(*args).compile(compiler_options=_QUICK_COMPILE)


def _derivatives(y_fn, x):
    """Gradients of y = y_fn(x) [B, L] summed over the batch at each position i, and
    summed over the positions of each row b: [L, *x.shape] and [B, *x.shape]. One plain
    vector-Jacobian product each, in a `lax.map` (not a batched `jax.jacrev`: under jit
    its backward pass of the reformer core gives nonzero derivatives across batch rows,
    which the eager Jacobian, `jacfwd` and per-output gradients all show to be zero)."""
    y, vjp = jax.vjp(y_fn, x)
    batch, length = y.shape
    at_position = jnp.eye(length, dtype=y.dtype)[:, None, :].repeat(batch, 1)  # [L, B, L]
    in_row = jnp.eye(batch, dtype=y.dtype)[:, :, None].repeat(length, 2)  # [B, B, L]
    gradients = jax.lax.map(lambda cotangent: vjp(cotangent)[0],
                            jnp.concatenate([at_position, in_row]))
    return gradients[:length], gradients[length:]


def check_shape_dtype_finite(result: Probe, x, mask):
    """Output shape and dtype equal x's; every value (masked rows too) is finite, on a
    batch with a row without any real token."""
    assert result.out.shape == x.shape and result.dtype == x.dtype, (result.out.shape,
                                                                     result.dtype)
    assert (~np.asarray(mask)).all(1).any(), "the mask needs a row without real tokens"
    assert np.isfinite(result.out).all()


def check_no_mask_values_leak(result: Probe, mask, atol=0.0):
    """Noise at masked inputs changes no real output (exactly, unless `atol`)."""
    real = np.asarray(mask)
    np.testing.assert_allclose(result.perturbed[real], result.out[real], rtol=0, atol=atol)


def check_no_mask_gradient_leak(result: Probe, mask):
    """No real output depends on a masked input: those derivatives are exactly 0, and a
    real output depends on some real input (the check can fail)."""
    real = np.asarray(mask)
    assert np.isfinite(result.by_position).all()
    real_outputs = result.by_position[real]  # [R, L, E]: each real output by its row's inputs
    masked_inputs = ~real[np.nonzero(real)[0]]  # [R, L]
    leak = np.abs(real_outputs[masked_inputs]).max(initial=0.0)
    assert leak == 0.0, f"a real output has gradient {leak:g} at a masked input"
    assert np.abs(real_outputs[~masked_inputs]).sum() > 0


def check_rows_independent(result: Probe):
    """No output depends on another row of the batch."""
    other_rows = ~np.eye(result.by_row.shape[0], dtype=bool)
    leak = np.abs(result.by_row[other_rows]).max(initial=0.0)
    assert leak == 0.0, f"an output has gradient {leak:g} at another batch row"


def check_no_future_leak_in(result: Probe, mask, rtol=0.0):
    """A real output i has no gradient at any input j > i (exactly, or within `rtol` of the
    largest gradient for a mixer that is causal only up to rounding), and some real output
    depends on an earlier input (the check can fail). Masked outputs are free: a masked
    query with no real key before it may read any key (the encoder never uses it)."""
    real_out = np.asarray(mask)[:, :, None]
    size = np.abs(result.by_position).max(-1)  # [B, L(out), L(in)]
    length = size.shape[1]
    later = np.triu(np.ones((length, length), bool), 1)[None]  # [1, i, j]: j > i
    future = size[later & real_out].max(initial=0.0)
    assert future <= rtol * size.max(), f"an output has gradient {future:g} at a later input"
    earlier = np.tril(np.ones((length, length), bool), -1)[None]
    assert size[earlier & real_out].max() > 0


def check_sees_later_tokens(result: Probe, mask):
    """A bidirectional mixer: some real output depends on a later real input."""
    real = np.asarray(mask)
    size = np.abs(result.by_position).max(-1)  # [B, L(out), L(in)]
    length = real.shape[1]
    later = np.triu(np.ones((length, length), bool), 1)[None]
    both_real = real[:, :, None] & real[:, None, :]
    assert size[both_real & later].max(initial=0.0) > 0, "no output sees a later token"


def check_contract(mixer, x, mask, deterministic=True):
    """Output shape and dtype equal x's; every value (masked rows too) is finite, also with
    a row without any real token. Forward passes only (any length); returns the output."""
    graphdef, state = nnx.split(mixer)
    run = jax.jit(lambda state, x, mask: nnx.merge(graphdef, state, copy=True)(
        x, mask, deterministic=deterministic))
    for row_mask in (mask, mask.at[0].set(False)):
        out = run(state, x, row_mask)
        assert out.shape == x.shape and out.dtype == x.dtype, (out.shape, out.dtype)
        assert np.isfinite(np.asarray(out, np.float32)).all()
    return run(state, x, mask)


def check_no_mask_leak(mixer, x, mask, deterministic=True, atol=0.0):
    """Values at masked positions change no real output and real outputs have zero
    gradient at masked positions."""
    result = probe(mixer, x, mask, deterministic)
    check_no_mask_values_leak(result, mask, atol)
    check_rows_independent(result)
    check_no_mask_gradient_leak(result, mask)


def check_no_future_leak(mixer, x, mask=None, rtol=0.0):
    """A causal output at a real position i has zero gradient with respect to x at j > i."""
    mask = jnp.ones(x.shape[:2], bool) if mask is None else mask
    result = probe(mixer, x, mask)
    check_rows_independent(result)
    check_no_future_leak_in(result, mask, rtol)


def check_step_equals_full_pass(mixer, x, mask, rtol=1e-5, full=None):
    """`init_state` / `step` over tokens 0, 1, ... give the full causal pass's outputs
    (`full`, computed here unless given)."""
    full = np.asarray(pure(mixer, mask)(x) if full is None else full, np.float64)
    graphdef, params = nnx.split(mixer)
    step_fn = lambda params, state, x_BxE, mask_B, t: nnx.merge(graphdef, params).step(
        state, x_BxE, mask_B, t)
    state, steps = mixer.init_state(x.shape[0]), []
    position = lambda t: jnp.asarray(t, jnp.int32)
    step = _compiled(step_fn, params, state, x[:, 0], mask[:, 0], position(0))
    for t in range(x.shape[1]):
        state, y_BxE = step(params, state, x[:, t], mask[:, t], position(t))
        steps.append(np.asarray(y_BxE, np.float64))
    stepped = np.stack(steps, 1)
    real = np.asarray(mask)
    np.testing.assert_allclose(stepped[real], full[real], rtol=0,
                               atol=rtol * np.abs(full[real]).max())


def _float_dtypes(tree) -> set[np.dtype]:
    return {leaf.dtype for leaf in jax.tree.leaves(tree)
            if jnp.issubdtype(leaf.dtype, jnp.floating)}


def check_dtypes_under_x64(new_mixer, x, mask):
    """With JAX's 64-bit mode on, `new_mixer()` has float32 parameters and gives float32
    outputs and float32 gradients for float32 inputs, and a causal mixer's decoding step
    keeps its state's dtypes: no parameter, carry or intermediate silently becomes float64
    (a `lax.scan` whose float32 carry turns float64 raises a TypeError here). Traced
    abstractly (`eval_shape`): nothing is computed."""
    with jax.enable_x64(True):
        mixer = nnx.eval_shape(new_mixer)
        graphdef, params, rest = nnx.split(mixer, nnx.Param, ...)
        assert _float_dtypes(params) <= {jnp.dtype(jnp.float32)}, _float_dtypes(params)

        def loss(params, rest, x):
            out = nnx.merge(graphdef, params, rest)(x, mask, deterministic=True)
            return jnp.sum(out * out), out

        grad_fn = jax.value_and_grad(loss, (0, 2), has_aux=True)
        (_, out), grads = jax.eval_shape(grad_fn, params, rest, x)
        assert out.dtype == jnp.float32, out.dtype
        assert _float_dtypes(grads) == {jnp.dtype(jnp.float32)}, _float_dtypes(grads)
        if getattr(mixer, "causal", False) and getattr(mixer, "decodes", False):
            _check_step_dtypes(graphdef, params, rest, x, mask)


def _check_step_dtypes(graphdef, params, rest, x, mask):
    """One decoding step keeps the state's dtypes and gives a float32 output."""
    def step(params, rest, x_BxE, mask_B):
        mixer = nnx.merge(graphdef, params, rest)
        state = mixer.init_state(x_BxE.shape[0])
        return state, mixer.step(state, x_BxE, mask_B, 0)

    state, (new_state, y_BxE) = jax.eval_shape(step, params, rest, x[:, 0], mask[:, 0])
    dtypes = lambda tree: [leaf.dtype for leaf in jax.tree.leaves(tree)]
    assert dtypes(new_state) == dtypes(state), (dtypes(state), dtypes(new_state))
    assert _float_dtypes(state) <= {jnp.dtype(jnp.float32)}, _float_dtypes(state)
    assert y_BxE.dtype == jnp.float32, y_BxE.dtype


def check_mixer_contract(mixer, x, mask, *, causal, future_rtol=0.0):
    """The whole contract on one mixer: shape, dtype and finite values, no mask leak in
    values and gradients, independent batch rows, no future leak if `causal` (else: some
    output sees a later token), and decoding equal to the full pass if it is causal and
    decodes.

    Args:
      mixer: called as mixer(x, mask, *, deterministic); `decodes` / `init_state` / `step`
        where it decodes.
      x: [B, L, E] float inputs.
      mask: [B, L] bool, with right padding, holes and a row without real tokens
        (`contract_mask`).
      causal: whether the mixer was built causal.
      future_rtol: gradient allowed at later inputs, relative to the largest one (0: exact).
    """
    result = probe(mixer, x, mask)
    check_shape_dtype_finite(result, x, mask)
    check_no_mask_values_leak(result, mask)
    check_rows_independent(result)
    check_no_mask_gradient_leak(result, mask)
    if causal:
        check_no_future_leak_in(result, mask, future_rtol)
    else:
        check_sees_later_tokens(result, mask)
    if causal and getattr(mixer, "decodes", False):
        check_step_equals_full_pass(mixer, x, mask, full=result.out)

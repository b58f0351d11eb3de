"""The Mamba2 block (lra/models/mixers/mamba2.py), the mixer `mamba2`.

The block must match a float64 NumPy forward written here from the paper's equations
(Dao & Gu, ICML 2024, the Mamba2 block: in_proj, depthwise convolution, SiLU, the
token-by-token SSD recurrence h_t = exp(dt_t A) h_{t-1} + dt_t B_t^T x_t,
y_t = C_t h_t + D x_t, the gated RMSNorm, out_proj), causal and bidirectional (the
module's definition: a centred convolution of 2 conv_size - 1 taps; forward inclusive
plus reverse exclusive sums of the SSD), with masked tokens dropped from the sequence
(the module's "skip" semantics), and stay finite at 16K bfloat16 tokens. The mixer
contract (masks, causality, token-by-token decoding) is tests/test_mixer_contract.py.
"Relative" tolerances are relative to the largest magnitude of the expected array.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from mixer_checks import (
    check_contract,
    check_no_mask_leak,
    check_step_equals_full_pass,
    make_mixer,
    random_x,
)

from lra.models import mixers
from lra.models.attention import ssd
from lra.models.mixers import mamba2, ssm

B, L, E = 3, 11, 8
OPTIONS = {"expand": 2, "head_dim": 4, "d_state": 4, "chunk_size": 4}


def _block(*, causal, seed=0, **options):
    return make_mixer("mamba2", emb_dim=E, max_len=L, causal=causal, seed=seed,
                      **{**OPTIONS, **options})


def _edge_mask():
    """Row 0 all real; row 1 first token masked, a hole in the middle, right padding;
    row 2 right padding only."""
    mask = np.ones((B, L), bool)
    mask[1, [0, 4, 5, 9, 10]] = False
    mask[2, 6:] = False
    return jnp.asarray(mask)


def _np(param):
    return np.asarray(param[...], np.float64)


def assert_close_relative(actual, expected, rtol=1e-5):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * np.abs(expected).max())


# --- a float64 NumPy Mamba2 block from the paper's equations -----------------------------


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _softplus(x):
    return np.log1p(np.exp(x))


def _reference_row(block, u_TxE, causal):
    """The block on one sequence of T real tokens (no padding), float64 [T, E]. B and C
    per group of heads (head h in group h // (H / G), Mamba2's layout); the SSD state
    starts from the learned one if any (forward direction only); dt clamped to dt_limit."""
    d_inner, n, heads, p = block.d_inner, block.d_state, block.num_heads, block.head_dim
    groups, k_conv = block.ngroups, block.conv_size
    zxbcdt = u_TxE @ _np(block.in_proj.kernel)  # no bias
    gn = groups * n
    z, xbc, dt_raw = (zxbcdt[:, :d_inner], zxbcdt[:, d_inner:2 * d_inner + 2 * gn],
                      zxbcdt[:, 2 * d_inner + 2 * gn:])
    # depthwise convolution: causal sees t-K+1..t; bidirectional t-K+1..t+K-1
    w, bias = _np(block.conv_weight_KxC), _np(block.conv_bias_C)
    offsets = range(-(k_conv - 1), 1) if causal else range(-(k_conv - 1), k_conv)
    assert w.shape[0] == len(offsets)
    T = len(u_TxE)
    conv = np.tile(bias, (T, 1))
    for t in range(T):
        for tap, offset in enumerate(offsets):
            if 0 <= t + offset < T:
                conv[t] += w[tap] * xbc[t + offset]
    xbc = _silu(conv)
    x = xbc[:, :d_inner].reshape(T, heads, p)
    of_head = np.arange(heads) // (heads // groups)  # each head's group
    Bm = xbc[:, d_inner:d_inner + gn].reshape(T, groups, n)[:, of_head]  # [T, H, N]
    Cm = xbc[:, d_inner + gn:].reshape(T, groups, n)[:, of_head]
    dt = np.clip(_softplus(dt_raw + _np(block.dt_bias_H)), *block.dt_limit)  # [T, H]
    A = -np.exp(_np(block.A_log_H))
    a = np.exp(dt * A)  # [T, H]
    y = np.zeros((T, heads, p))
    h = (np.zeros((heads, n, p)) if block.init_states_HxNxP is None
         else _np(block.init_states_HxNxP))
    for t in range(T):  # forward, inclusive: h_t = a_t h_{t-1} + B_t^T dt_t x_t
        h = a[t][:, None, None] * h + np.einsum("hn,hp->hnp", Bm[t], dt[t][:, None] * x[t])
        y[t] += np.einsum("hn,hnp->hp", Cm[t], h)
    if not causal:  # reverse, exclusive: r_t = sum_{s>t} a_{t+1}..a_s B_s^T dt_s x_s
        r = np.zeros((heads, n, p))
        for t in range(T - 2, -1, -1):
            r = a[t + 1][:, None, None] * (
                r + np.einsum("hn,hp->hnp", Bm[t + 1], dt[t + 1][:, None] * x[t + 1]))
            y[t] += np.einsum("hn,hnp->hp", Cm[t], r)
    y = (y + _np(block.D_H)[:, None] * x).reshape(T, d_inner)
    y = y * _silu(z)
    y = y / np.sqrt(np.mean(y**2, -1, keepdims=True) + 1e-5) * _np(block.norm_scale_I)
    return y @ _np(block.out_proj.kernel)


def _reference(block, x, mask, causal):
    """Masked tokens dropped: each row's real tokens alone; NaN at masked positions."""
    x, mask = np.asarray(x, np.float64), np.asarray(mask)
    out = np.full(x.shape, np.nan)
    for row in range(len(x)):
        out[row, mask[row]] = _reference_row(block, x[row, mask[row]], causal)
    return out


@pytest.mark.parametrize("causal,form", [(True, "chunked"), (False, "chunked"),
                                         (True, "parallel"), (False, "recurrent")])
def test_matches_numpy_reference(causal, form):
    block = _block(causal=causal, form=form)
    x, mask = random_x((B, L, E), seed=1), _edge_mask()
    out = np.asarray(block(x, mask, deterministic=True), np.float64)
    expected = _reference(block, x, mask, causal)
    real = np.asarray(mask)
    assert_close_relative(out[real], expected[real])


def test_masked_tokens_are_dropped_from_the_sequence():
    """A row with holes gives, at its real tokens, the outputs of its real tokens alone."""
    for causal in (True, False):
        block = _block(causal=causal)
        x, mask = random_x((B, L, E), seed=2), _edge_mask()
        out = np.asarray(block(x, mask), np.float64)
        real = np.asarray(mask[1])
        alone = np.asarray(block(x[1:2, real], None), np.float64)[0]
        assert_close_relative(out[1, real], alone)


# --- decoding (its equality with the full pass: the mixer contract) ---------------------


def test_masked_step_keeps_the_state():
    block = _block(causal=True)
    assert block.decodes and not _block(causal=False).decodes
    x = random_x((B, L, E), seed=6)
    state = block.init_state(B)
    state, _ = block.step(state, x[:, 0], jnp.ones(B, bool), 0)
    kept, _ = block.step(state, x[:, 1], jnp.zeros(B, bool), 1)
    for before, after in zip(state, kept):
        np.testing.assert_array_equal(np.asarray(after), np.asarray(before))
    assert np.abs(np.asarray(state.ssd_BxHxNxP)).sum() > 0  # the check can fail
    with pytest.raises(ValueError, match="causal"):
        _block(causal=False).step(_block(causal=False).init_state(B), x[:, 0], None, 0)


def test_bfloat16_at_16k_tokens_is_finite():
    block = _block(causal=False, chunk_size=64)
    x = random_x((1, 16384, E), seed=7, dtype=jnp.bfloat16)
    mask = jnp.arange(16384)[None] < 16000
    out = check_contract(block, x, mask)
    assert out.dtype == jnp.bfloat16


# --- parameters, options, registry -------------------------------------------------------


def test_ssm_params_are_a_log_dt_bias_and_d():
    block = _block(causal=False)
    ssm_params = nnx.state(block, ssm.SsmParam)
    names = {path[-1] for path, _ in nnx.to_flat_state(ssm_params)}
    assert names == {"A_log_H", "dt_bias_H", "D_H"}
    a = np.exp(_np(block.A_log_H))
    assert ((a >= 1.0) & (a <= 16.0)).all()
    dt = _softplus(_np(block.dt_bias_H))
    assert ((dt >= 1e-4 * 0.999) & (dt <= 0.1 * 1.001)).all()
    np.testing.assert_array_equal(_np(block.D_H), 1.0)


def test_shapes_from_options_and_head_dim_is_clipped():
    block = _block(causal=True)
    assert (block.d_inner, block.num_heads, block.d_state) == (16, 4, 4)
    assert block.in_proj.kernel.shape == (E, 2 * 16 + 2 * 4 + 4)
    assert block.conv_weight_KxC.shape == (4, 16 + 8)
    assert _block(causal=False).conv_weight_KxC.shape == (7, 16 + 8)
    assert block.in_proj.bias is None and block.out_proj.bias is None
    wide = make_mixer("mamba2", emb_dim=E, causal=False)  # head_dim 64 > d_inner 16
    assert (wide.head_dim, wide.num_heads) == (16, 1)


@pytest.mark.parametrize("option,value", [
    ("expand", 0), ("head_dim", 3), ("head_dim", 0), ("d_state", 0), ("conv_size", 0),
    ("chunk_size", 0), ("chunk_size", 2.5), ("form", "nope"), ("expand", True),
    ("ngroups", 0), ("ngroups", 3), ("learnable_init_states", "yes"), ("dt_limit", 0.1),
    ("dt_limit", (0.1, 0.01)), ("dt_limit", (-1.0, 1.0)), ("dt_limit", ("a", 1.0))])
def test_bad_options_raise_naming_the_option(option, value):
    with pytest.raises(ValueError, match=option):
        _block(causal=False, **{option: value})


def test_registry_makes_the_block_under_mamba2():
    assert "mamba2" in mixers.SEQUENCE_NAMES and "mamba2" not in mixers.ATTENTION_NAMES
    assert not mixers.is_attention("mamba2")
    assert not mixers.default_block_mlp("mamba2")
    assert mixers.default_options("mamba2") == {
        "expand": 2, "head_dim": 64, "d_state": 64, "conv_size": 4, "form": "chunked",
        "chunk_size": 64, "ngroups": 1, "learnable_init_states": False,
        "dt_limit": (0.0, float("inf"))}
    assert isinstance(_block(causal=False), mamba2.Mamba2Block)


def test_the_ssd_core_has_its_own_name_and_no_name_is_in_both_registries(monkeypatch):
    """One name, one model: the block is `mamba2`, its SSD core the attention `ssd` (as a
    mixer: the core in the attention wrapper), and a name that both registries define
    stops the mixer registry's import."""
    import importlib

    from lra.models import attention
    from lra.models.attention.ssd import SsdAttention
    from lra.models.mixers.multi_head import MultiHeadAttention

    with pytest.raises(ValueError, match="unknown attention 'mamba2'"):
        attention.make("mamba2", num_heads=2, head_dim=4, max_len=L, rngs=nnx.Rngs(0))
    assert isinstance(attention.make("ssd", num_heads=2, head_dim=4, max_len=L,
                                     rngs=nnx.Rngs(0)), SsdAttention)
    assert isinstance(make_mixer("ssd", emb_dim=E, max_len=L), MultiHeadAttention)
    assert (mixers.kind("ssd"), mixers.kind("mamba2")) == (mixers.ATTENTION, mixers.SEQUENCE)
    assert "'ssd' in the attention wrapper" in mixers.describe("ssd")
    assert mixers.describe("mamba2") == "sequence model 'mamba2'"
    monkeypatch.setattr(attention, "NAMES", (*attention.NAMES, "s5"))
    with pytest.raises(ValueError, match="s5 name both an attention family and a sequence"):
        importlib.reload(mixers)
    monkeypatch.undo()
    importlib.reload(mixers)
    assert mixers.NAMES.count("s5") == 1


@pytest.mark.parametrize("causal", [True, False])
def test_input_gradient_matches_finite_differences_of_the_reference(causal):
    """d sum(w * out) / dx by autodiff equals central differences of the float64 NumPy
    reference, on the row with a masked first token, a hole and right padding."""
    block = _block(causal=causal)
    mask = _edge_mask()[1:2]
    x = random_x((1, L, E), seed=3)
    weights = np.random.default_rng(4).normal(size=(1, L, E)) * np.asarray(mask)[..., None]
    loss = lambda x: jnp.sum(block(x, mask, deterministic=True) * weights)
    grad = np.asarray(jax.grad(loss)(x), np.float64)[0]

    def reference_loss(x_row):
        out = _reference(block, x_row[None], mask, causal)[0]
        return np.nansum(out * weights[0])

    x64, expected, eps = np.asarray(x, np.float64)[0], np.zeros((L, E)), 1e-6
    for t in np.flatnonzero(np.asarray(mask[0])):
        for e in range(E):
            step = np.zeros_like(x64)
            step[t, e] = eps
            expected[t, e] = (reference_loss(x64 + step) - reference_loss(x64 - step)) / (2 * eps)
    assert_close_relative(grad, expected, rtol=1e-4)  # masked positions: 0 in both


# --- Mamba2's ngroups, learnable_init_states and dt_limit --------------------------------

RICH = {"ngroups": 2, "learnable_init_states": True, "dt_limit": (0.005, 0.05)}


def _with_random_initial_state(block, seed=9):
    """The learned initial state is zero at init; a random one makes the checks bite."""
    if block.init_states_HxNxP is not None:
        shape = block.init_states_HxNxP.shape
        block.init_states_HxNxP[...] = random_x(shape, seed=seed)
    return block


@pytest.mark.parametrize("causal,form,options", [
    (True, "chunked", RICH), (False, "chunked", RICH),
    (True, "recurrent", {**RICH, "ngroups": 4}), (False, "parallel", {"ngroups": 4})])
def test_groups_initial_state_and_dt_limit_match_numpy_reference(causal, form, options):
    """B and C per group of heads, the learned starting state (forward direction only) and
    dt clamped to dt_limit, against the float64 reference; masked tokens dropped (the row
    with a masked first token, a hole and right padding, and the right-padded row)."""
    block = _with_random_initial_state(_block(causal=causal, form=form, **options))
    x, mask = random_x((B, L, E), seed=1), _edge_mask()
    out = np.asarray(block(x, mask), np.float64)
    real = np.asarray(mask)
    assert_close_relative(out[real], _reference(block, x, mask, causal)[real])
    if "dt_limit" in options:  # the clamp binds (the check can fail)
        unclamped = _with_random_initial_state(
            _block(causal=causal, form=form, **{**options, "dt_limit": (0.0, np.inf)}))
        assert np.abs(np.asarray(unclamped(x, mask)) - out)[real].max() > 1e-3


def test_groups_shape_the_projection_and_the_convolution():
    block = _block(causal=True, ngroups=2)
    assert block.in_proj.kernel.shape == (E, 2 * 16 + 2 * 2 * 4 + 4)
    assert block.conv_weight_KxC.shape == (4, 16 + 2 * 2 * 4)
    assert block.init_state(B).conv_BxKxC.shape == (B, 3, 16 + 2 * 2 * 4)
    assert block.init_states_HxNxP is None
    learned = _block(causal=True, learnable_init_states=True)
    names = {path[-1] for path, _ in nnx.to_flat_state(nnx.state(learned, ssm.SsmParam))}
    assert names == {"A_log_H", "dt_bias_H", "D_H", "init_states_HxNxP"}
    np.testing.assert_array_equal(_np(learned.init_states_HxNxP), np.zeros((4, 4, 4)))


def test_learned_initial_state_decodes_and_masks_leak_nothing():
    """`step` starts from the learned state and gives the full causal pass; masked values
    change no real output (right padding, holes, a masked first token), both directions."""
    x, mask = random_x((B, L, E), seed=4), _edge_mask()
    block = _with_random_initial_state(_block(causal=True, **RICH))
    np.testing.assert_array_equal(np.asarray(block.init_state(2).ssd_BxHxNxP[1]),
                                  _np(block.init_states_HxNxP))
    check_step_equals_full_pass(block, x, mask)
    for causal in (True, False):
        check_no_mask_leak(_with_random_initial_state(_block(causal=causal, **RICH)), x, mask)


# --- the grouped SSD core (ssd.grouped_ssd) -------------------------------------------------

H, N, P = 4, 3, 2


def _core_inputs(groups, seed=0):
    """Random C, B [B, L, G, N], x [B, L, H, P], dt, A, D, h0 and the edge mask."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.normal(size=shape)
    return {"C": normal(B, L, groups, N), "B": normal(B, L, groups, N),
            "x": normal(B, L, H, P), "dt": _softplus(normal(B, L, H) - 1.0),
            "A": -rng.uniform(0.2, 2.0, H), "D": normal(H), "h0": normal(H, N, P),
            "mask": np.asarray(_edge_mask())}


def _core(inputs, *, form, causal, initial=True, dtype=jnp.float32):
    """The block's use of the core: zero at masked tokens, log-gate dt A, input dt x."""
    keep = inputs["mask"]
    zero = lambda a: jnp.asarray(np.where(keep.reshape(*keep.shape, *[1] * (a.ndim - 2)),
                                          a, 0.0), jnp.float32)
    x, C, Bm = zero(inputs["x"]), zero(inputs["C"]), zero(inputs["B"])
    dt = jnp.asarray(inputs["dt"], jnp.float32)
    g = zero(inputs["dt"] * inputs["A"])
    h0 = jnp.asarray(inputs["h0"], jnp.float32) if initial else None
    y = ssd.grouped_ssd(C.astype(dtype), Bm.astype(dtype), (x * dt[..., None]).astype(dtype),
                        g, h0, form=form, causal=causal, chunk_size=4)
    return y + jnp.asarray(inputs["D"], jnp.float32)[:, None] * x


def _core_reference(inputs, *, causal, initial=True):
    """float64, token by token over each row's real tokens: h_t = exp(dt_t A) h_{t-1} +
    dt_t B_t^T x_t (h_{-1} = h0), y_t = C_t h_t + D x_t, the heads of group g reading B
    and C of group g; bidirectional adds the reverse exclusive sums from a zero state."""
    groups = inputs["C"].shape[2]
    of_head = np.arange(H) // (H // groups)
    out = np.full((B, L, H, P), np.nan)
    for row in range(B):
        real = inputs["mask"][row]
        x, dt = inputs["x"][row, real], inputs["dt"][row, real]
        Bm, C = inputs["B"][row, real][:, of_head], inputs["C"][row, real][:, of_head]
        a = np.exp(dt * inputs["A"])
        h = inputs["h0"].copy() if initial else np.zeros((H, N, P))
        y = inputs["D"][:, None] * x
        for t in range(len(x)):
            h = a[t][:, None, None] * h + np.einsum("hn,hp->hnp", Bm[t], dt[t][:, None] * x[t])
            y[t] += np.einsum("hn,hnp->hp", C[t], h)
        if not causal:
            r = np.zeros((H, N, P))
            for t in range(len(x) - 2, -1, -1):
                r = a[t + 1][:, None, None] * (
                    r + np.einsum("hn,hp->hnp", Bm[t + 1], dt[t + 1][:, None] * x[t + 1]))
                y[t] += np.einsum("hn,hnp->hp", C[t], r)
        out[row, real] = y
    return out


@pytest.mark.parametrize("groups,form,causal,initial", [
    (1, "chunked", True, True), (1, "recurrent", True, True), (1, "parallel", True, False),
    (2, "chunked", True, True), (1, "chunked", False, True), (2, "recurrent", False, True)])
def test_grouped_core_matches_token_by_token_recurrence(groups, form, causal, initial):
    inputs = _core_inputs(groups)
    out = np.asarray(_core(inputs, form=form, causal=causal, initial=initial), np.float64)
    real = inputs["mask"]
    expected = _core_reference(inputs, causal=causal, initial=initial)
    assert_close_relative(out[real], expected[real])


@pytest.mark.parametrize("form,causal", [("chunked", True), ("chunked", False),
                                         ("parallel", False), ("recurrent", True)])
def test_grouped_core_equals_the_per_head_gated_core(form, causal):
    """ngroups = heads is the per-head computation of gated.retain (q = C, k = B per head),
    and one group is that computation with B and C broadcast to every head (the block's
    path before groups existed)."""
    from lra.models.attention import gated

    rng = np.random.default_rng(3)
    v = jnp.asarray(rng.normal(size=(B, L, H, P)), jnp.float32)
    g = jnp.asarray(-rng.uniform(0.0, 1.0, (B, L, H)), jnp.float32)
    for groups in (H, 1):
        C, Bm = (jnp.asarray(rng.normal(size=(B, L, groups, N)), jnp.float32) for _ in "CB")
        q, k = (jnp.broadcast_to(m, (B, L, H, N)) for m in (C, Bm))  # = m when G = H
        got = ssd.grouped_ssd(C, Bm, v, g, form=form, causal=causal, chunk_size=4)
        want = gated.retain(q, k, v, g[..., None], form=gated.Form(form), causal=causal,
                            chunk_size=4)
        assert_close_relative(got, want)


def _dot_generals(jaxpr):
    """Every dot_general of a jaxpr, its sub-jaxprs (scan, jit, custom_vjp) included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from _dot_generals(sub)


def test_bfloat16_matmuls_take_bf16_with_float32_accumulation_and_states():
    """Under dtype=bfloat16 every matmul of the block (projections, C B^T, the chunk's
    output, the state's read and write) takes bfloat16 operands and accumulates in
    float32; the decoding state stays float32; the core's bf16 output is close to its
    float32 output."""
    block = _with_random_initial_state(_block(causal=True, dtype=jnp.bfloat16, **RICH))
    x, mask = random_x((B, L, E), seed=1, dtype=jnp.bfloat16), _edge_mask()
    dots = list(_dot_generals(jax.make_jaxpr(lambda x: block(x, mask))(x).jaxpr))
    assert len(dots) >= 6
    for eqn in dots:
        assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16] * 2, eqn
        assert eqn.params["preferred_element_type"] == jnp.float32, eqn
    state, out = jax.eval_shape(lambda s, x: block.step(s, x, mask[:, 0], 0),
                                block.init_state(B), x[:, 0])
    assert out.dtype == jnp.bfloat16
    assert {a.dtype for a in state} == {jnp.dtype(jnp.float32)}
    inputs = _core_inputs(2)
    low = np.asarray(_core(inputs, form="chunked", causal=False, dtype=jnp.bfloat16))
    full = np.asarray(_core(inputs, form="chunked", causal=False))
    assert_close_relative(low[inputs["mask"]], full[inputs["mask"]], rtol=2e-2)

"""The S5 mixer (lra/models/mixers/s5.py) and the parallel scan it uses (ssm.py).

The layer must match a float64 NumPy loop written from the S5 paper's equations
(Smith et al., ICLR 2023: ZOH / bilinear discretisation of a diagonal complex SSM,
y = Re(C x) + D u, x2 with conjugate symmetry, a reverse scan with its own C), in
outputs and in input gradients (finite differences of the NumPy loop); its HiPPO-N
initialisation must match the eigen-decomposition of the normal part of the HiPPO-LegS
matrix built here from its formula; and it must stay finite at 16K bfloat16 tokens. The
mixer contract (masks, causality, token-by-token decoding) is tests/test_mixer_contract.py.
"Relative" tolerances are relative to the largest magnitude of the expected array.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from mixer_checks import check_contract, make_mixer, pure, random_x

from lra.models import mixers
from lra.models.mixers import s5, ssm

B, L, E, P = 3, 11, 6, 8


def _s5(*, emb_dim=E, max_len=L, causal=False, seed=0, **options):
    return make_mixer("s5", emb_dim=emb_dim, max_len=max_len, causal=causal, seed=seed,
                      **{"state_size": P, **options})


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
    actual, expected = np.asarray(actual), np.asarray(expected)  # complex stays complex
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * np.abs(expected).max())


# --- a float64 NumPy S5 from the paper's equations -------------------------------------


def _gelu(x):  # S5's code: flax's nn.gelu, the tanh approximation
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _dense(x, linear):
    return x @ _np(linear.kernel) + _np(linear.bias)


def _output_gate(y, model, activation):
    """S5's SequenceLayer nonlinearities (no dropout)."""
    g = _gelu(y)
    if activation == "gelu":
        return g
    if activation == "full_glu":
        return _dense(g, model.gate.out1) * _sigmoid(_dense(g, model.gate.out2))
    if activation == "half_glu1":
        return g * _sigmoid(_dense(g, model.gate.out2))
    return y * _sigmoid(_dense(g, model.gate.out2))  # half_glu2


def _complex(re, im):
    return _np(re) + 1j * _np(im)


def _discrete(model, discretization, clip_eigs):
    """Lambda_bar [N], B_bar [N, E] from the parameters (paper eq. 6 / appendix)."""
    re = _np(model.Lambda_re_N)
    Lam = (np.minimum(re, -1e-4) if clip_eigs else re) + 1j * _np(model.Lambda_im_N)
    dt = np.exp(_np(model.log_step_N))
    Bt = _complex(model.B_re_NxE, model.B_im_NxE)
    if discretization == "zoh":
        Lam_bar = np.exp(Lam * dt)
        return Lam_bar, ((Lam_bar - 1.0) / Lam)[:, None] * Bt
    den = 1.0 - dt / 2.0 * Lam
    return (1.0 + dt / 2.0 * Lam) / den, (dt / den)[:, None] * Bt


def _reference(model, x, mask, *, activation="half_glu1", discretization="zoh",
               clip_eigs=False, conj_sym=True, bidirectional=True, causal=False, **init):
    """Token by token: masked tokens have zero input and leave the state unchanged;
    y_k = c Re(C1 x_k) [+ c Re(C2 x'_k), x' the same recursion from the end] + D u_k,
    c = 2 with conjugate symmetry, then the output nonlinearity. `init`: options that
    only change the initial parameters (read from the model)."""
    del init
    x, mask = np.asarray(x, np.float64), np.asarray(mask)
    Lam_bar, B_bar = _discrete(model, discretization, clip_eigs)
    C1 = _complex(model.C_re_ExN, model.C_im_ExN)
    factor = 2.0 if conj_sym else 1.0
    u = np.where(mask[..., None], x, 0.0)
    y = u * _np(model.D_E)
    for b in range(x.shape[0]):
        directions = [(range(x.shape[1]), C1)]
        if bidirectional and not causal:
            directions.append((range(x.shape[1] - 1, -1, -1),
                               _complex(model.C2_re_ExN, model.C2_im_ExN)))
        for order, C in directions:
            state = np.zeros(len(Lam_bar), complex)
            for t in order:
                if mask[b, t]:
                    state = Lam_bar * state + B_bar @ u[b, t]
                y[b, t] += factor * (C @ state).real
    return _output_gate(y, model, activation)


CONFIGS = [
    {},  # the defaults: bidirectional, conj_sym, zoh, half_glu1
    {"causal": True},
    {"conj_sym": False, "blocks": 2, "discretization": "bilinear", "activation": "gelu"},
    {"bidirectional": False, "clip_eigs": True, "activation": "full_glu",
     "c_init": "complex_normal"},
    {"causal": True, "blocks": 2, "activation": "half_glu2", "c_init": "lecun_normal"},
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in
                                                                    c.items()) or "defaults")
def test_matches_numpy_reference(config):
    model = _s5(seed=1, **config)
    if config.get("clip_eigs"):  # some eigenvalues in the right half plane: clipped
        model.Lambda_re_N.set_value(model.Lambda_re_N[...].at[::2].set(0.3))
    x, mask = random_x((B, L, E), seed=1), _edge_mask()
    out = model(x, mask, deterministic=True)
    expected = _reference(model, x, mask, **config)
    real = np.asarray(mask)
    assert_close_relative(np.asarray(out)[real], expected[real])


def test_input_gradients_match_finite_differences():
    """d sum(w * out) / dx of the JAX layer against central differences of the NumPy S5
    (bidirectional, a hole and right padding)."""
    batch, length, emb_dim = 1, 6, 3
    model = _s5(emb_dim=emb_dim, max_len=length, seed=2, state_size=4)
    x = np.random.default_rng(2).normal(size=(batch, length, emb_dim))
    mask = jnp.asarray([[True, True, False, True, True, False]])
    w = np.random.default_rng(3).normal(size=x.shape) * np.asarray(mask)[..., None]
    grad = jax.grad(lambda x: jnp.sum(pure(model, mask)(x) * w))(jnp.asarray(x, jnp.float32))
    loss = lambda x: np.sum(_reference(model, x, mask) * w)
    eps, numeric = 1e-6, np.zeros(x.shape)
    for index in np.ndindex(x.shape):
        dx = np.zeros(x.shape)
        dx[index] = eps
        numeric[index] = (loss(x + dx) - loss(x - dx)) / (2 * eps)
    assert np.abs(numeric).max() > 0.1
    assert_close_relative(grad, numeric, 1e-4)


def test_parallel_scan_equals_sequential_loop():
    """ssm.linear_recurrence: h_t = a_t h_{t-1} + b_t (and reversed), complex and real,
    with a per-row a and with one a broadcast over the batch."""
    rng = np.random.default_rng(4)
    batch, length, width = 2, 9, 3

    def draw(shape, dtype, draw_real):
        if dtype == np.complex64:
            return draw_real(size=shape) + 1j * draw_real(size=shape)
        return draw_real(size=shape)

    for dtype in (np.complex64, np.float32):
        b = draw((batch, length, width), dtype, rng.normal)
        for a_rows in (1, batch):
            a = draw((a_rows, length, width), dtype, lambda size: rng.uniform(-0.9, 0.9, size))
            for reverse in (False, True):
                expected, h = np.zeros(b.shape, b.dtype), np.zeros((batch, width), b.dtype)
                for t in (range(length - 1, -1, -1) if reverse else range(length)):
                    h = a[:, t] * h + b[:, t]
                    expected[:, t] = h
                got = ssm.linear_recurrence(jnp.asarray(a, dtype), jnp.asarray(b, dtype),
                                            reverse=reverse)
                assert got.dtype == dtype
                assert_close_relative(got, expected, 1e-5)


# --- HiPPO-N initialisation --------------------------------------------------------------


def _hippo_legs(n):
    """A_nk = -sqrt(2n+1) sqrt(2k+1) (n > k), -(n+1) (n = k), 0 (n < k) (S4 / S5 papers)."""
    A = np.zeros((n, n))
    for i in range(n):
        for k in range(n):
            if i > k:
                A[i, k] = -math.sqrt(2 * i + 1) * math.sqrt(2 * k + 1)
            elif i == k:
                A[i, k] = -(i + 1)
    return A


def _hippo_normal(n):
    """HiPPO-N: A + p p^T, p_k = sqrt(k + 1/2) (S5 paper, appendix B.1.1)."""
    p = np.sqrt(np.arange(n) + 0.5)
    normal = _hippo_legs(n) + np.outer(p, p)
    assert np.allclose(normal @ normal.T, normal.T @ normal)  # it is normal
    return normal


@pytest.mark.parametrize("state_size, blocks, conj_sym",
                         [(8, 1, True), (8, 2, False), (12, 3, True), (6, 1, False)])
def test_hippo_n_initialisation(state_size, blocks, conj_sym):
    emb_dim = 64  # enough samples for the distribution checks
    model = _s5(emb_dim=emb_dim, state_size=state_size, blocks=blocks, conj_sym=conj_sym,
                seed=5)
    size = state_size // blocks
    values = np.linalg.eigvals(_hippo_normal(size))
    np.testing.assert_allclose(values.real, -0.5, atol=1e-9)  # HiPPO-N: Re = -1/2
    if conj_sym:  # one of each conjugate pair: negative imaginary parts
        values = values[values.imag < 0]
    n = len(values) * blocks
    Lam = _complex(model.Lambda_re_N, model.Lambda_im_N)
    assert Lam.shape == (n,)
    np.testing.assert_array_equal(Lam.real, -0.5)
    for j in range(blocks):  # each block: the eigenvalues of the formula's matrix
        block = Lam[j * len(values):(j + 1) * len(values)]
        by_imag = lambda v: v[np.argsort(v.imag)]
        assert_close_relative(by_imag(block), by_imag(values), 1e-6)
    # The module's eigenvectors V [P, N] (unique up to a phase each, so not comparable
    # with numpy's): orthonormal eigenvectors of the block-diagonal formula matrix.
    _, V = s5.init_eigenbasis(state_size, blocks, conj_sym)
    normal = np.kron(np.eye(blocks), _hippo_normal(size))  # block-diagonal
    np.testing.assert_allclose(normal @ V, V * Lam, atol=1e-5 * np.abs(Lam).max())
    np.testing.assert_allclose(V.conj().T @ V, np.eye(n), atol=1e-12)
    # B~ = V^-1 B for a real B [P, E] with LeCun-normal entries (fan-in P, truncated at
    # 2 sigma), C~ = C V for C with truncated-normal parts of variance 1/P
    Bt = _complex(model.B_re_NxE, model.B_im_NxE)
    Ct = _complex(model.C_re_ExN, model.C_im_ExN)
    sigma, bound = 1.0 / math.sqrt(state_size), 2.0 / 0.8796 / math.sqrt(state_size)
    if conj_sym:  # B = 2 Re(V B~): the dropped pairs add the complex conjugate
        B_real = 2.0 * (V @ Bt).real
        # (C is not recoverable from C V with half of V: the statistics of C~ only)
        for part in (Ct.real, Ct.imag):
            assert abs(part.std() / sigma - 1.0) < 0.15
        checked = [B_real]
    else:
        B_real = V @ Bt
        np.testing.assert_allclose(B_real.imag, 0.0, atol=1e-5)
        C = Ct @ V.conj().T
        checked = [B_real.real, C.real, C.imag]
    for part in checked:
        assert np.abs(part).max() <= bound * (1 + 1e-4)  # a unitary mix would exceed it
        assert abs(part.std() / sigma - 1.0) < 0.15
    log_step = _np(model.log_step_N)
    assert log_step.shape == (n,)
    assert (log_step >= math.log(0.001)).all() and (log_step <= math.log(0.1)).all()


def test_c_init_options_and_d_init():
    """complex_normal: C~ itself N(0, 1/2) per part, two independent C~ when
    bidirectional; lecun_normal: C = C~ V^-1 with variance 1/(P E) per part; D ~ N(0, 1)."""
    model = _s5(emb_dim=64, state_size=16, c_init="complex_normal", seed=6)
    for part in (model.C_re_ExN, model.C2_re_ExN, model.C_im_ExN, model.C2_im_ExN):
        assert abs(_np(part).std() - math.sqrt(0.5)) < 0.1
    assert not np.allclose(_np(model.C_re_ExN), _np(model.C2_re_ExN))
    assert abs(_np(model.D_E).std() - 1.0) < 0.3
    model = _s5(emb_dim=64, state_size=16, c_init="lecun_normal", conj_sym=False, seed=6)
    _, V = s5.init_eigenbasis(16, 1, False)
    C = _complex(model.C_re_ExN, model.C_im_ExN) @ V.conj().T
    for part in (C.real, C.imag):
        assert abs(part.std() * math.sqrt(16 * 64) - 1.0) < 0.15


# --- decoding and padding (masks, causality, decoding: tests/test_mixer_contract.py) ------


def test_decoding_state_and_only_causal_layers_decode():
    x, mask = random_x((B, L, E), seed=8), _edge_mask()
    model = _s5(causal=True, seed=8, blocks=2)
    assert model.decodes and model.init_state(B).x_BxN.dtype == jnp.complex64
    bidirectional = _s5(causal=False)
    assert not bidirectional.decodes
    with pytest.raises(ValueError, match="causal=True"):
        bidirectional.step(bidirectional.init_state(B), x[:, 0], mask[:, 0], 0)


def test_padding_is_removed_from_the_sequence():
    """Bidirectional: the real outputs of a padded row (left, middle and right padding)
    equal those of its real tokens alone, so the reverse scan starts at the last one."""
    model = _s5(seed=9)
    x, mask = random_x((B, L, E), seed=9), _edge_mask()
    padded = np.asarray(model(x, mask, deterministic=True))
    real = np.asarray(mask[1])
    alone = np.asarray(model(x[1:2, real], None, deterministic=True))
    assert_close_relative(padded[1, real], alone[0])


def test_bfloat16_16k_tokens_finite():
    x = random_x((1, 16_384, 4), seed=10, dtype=jnp.bfloat16)
    mask = jnp.arange(16_384)[None] < 16_000
    for causal in (False, True):
        model = _s5(emb_dim=4, max_len=16_384, causal=causal, dtype=jnp.bfloat16, seed=10)
        check_contract(model, x, mask)


# --- options and parameters -------------------------------------------------------------


def test_options_registry_and_ssm_params():
    assert "s5" in mixers.SEQUENCE_NAMES and not mixers.is_attention("s5")
    assert mixers.default_options("s5") == {
        "state_size": 64, "blocks": 1, "conj_sym": True, "bidirectional": True,
        "dt_min": 0.001, "dt_max": 0.1, "discretization": "zoh",
        "c_init": "trunc_standard_normal", "clip_eigs": False, "activation": "half_glu1"}
    ssm_names = {"Lambda_re_N", "Lambda_im_N", "B_re_NxE", "B_im_NxE", "log_step_N"}
    model = _s5()
    names = lambda kind: {path[0] for path, _ in nnx.to_flat_state(nnx.state(model, kind))}
    assert names(ssm.SsmParam) == ssm_names
    plain = names(nnx.Param) - ssm_names
    assert plain == {"C_re_ExN", "C_im_ExN", "C2_re_ExN", "C2_im_ExN", "D_E", "gate"}
    for causal, bidirectional in [(True, True), (False, False)]:  # one direction: one C
        model = _s5(causal=causal, bidirectional=bidirectional)
        assert model.C2_re_ExN is None and not model.bidirectional
    abstract = nnx.eval_shape(lambda: _s5())  # training builds the model abstractly
    assert abstract.B_re_NxE.shape == (P // 2, E)


@pytest.mark.parametrize(
    "options, setting",
    [
        ({"state_size": 0}, "state_size"),
        ({"state_size": 8.0}, "state_size"),
        ({"blocks": 0}, "blocks"),
        ({"blocks": 3}, "blocks"),
        ({"state_size": 6, "blocks": 2}, "conj_sym"),
        ({"dt_min": 0.0}, "dt_min"),
        ({"dt_min": 0.1, "dt_max": 0.01}, "dt_max"),
        ({"discretization": "euler"}, "discretization"),
        ({"c_init": "zeros"}, "c_init"),
        ({"activation": "relu"}, "activation"),
        ({"bogus": 1}, "bogus.*state_size"),
    ],
)
def test_bad_options_raise(options, setting):
    with pytest.raises(ValueError, match=setting):
        _s5(**options)

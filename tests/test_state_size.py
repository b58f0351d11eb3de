"""The decoding state size of the mixer registry (`lra.models.mixers.state_size`).

Every expected size is computed here by hand from the shapes the mixers' docstrings give
(float32 = 4 bytes, complex64 = 8), for E = qkv_dim = 32, H = 4 heads (D = 8) and
max_len = 64 unless a test varies them: a KV cache grows with the length; every
recurrent state is the same at any length and scales with the widths as its shapes say.
"""

from __future__ import annotations

import jax.numpy as jnp
import pytest
from flax import nnx

from lra.models import mixers

E, QKV, H, MAX_LEN = 32, 32, 4, 64
D = QKV // H
F32, C64 = 4, 8  # bytes


def size(name, *, emb_dim=E, qkv_dim=QKV, max_len=MAX_LEN, **options):
    return mixers.state_size(name, emb_dim=emb_dim, qkv_dim=qkv_dim, num_heads=H,
                             max_len=max_len, options=options)


def linear_state(qkv_dim):
    """linear.py's State with the elu map (F = D): S [H, F, D], z [H, F], c [H]."""
    d = qkv_dim // H
    return (H * d * d + H * d + H) * F32


def matrix_state(qkv_dim):
    """gated.py's and delta.py's State: S [H, D, D]."""
    d = qkv_dim // H
    return H * d * d * F32


@pytest.mark.parametrize("name", ["softmax", "memory_efficient"])
def test_exact_attention_carries_a_kv_cache(name):
    assert size(name) == (2 * 64 * 32 * 4, True) == (16384, True)
    assert size(name, max_len=128) == (2 * 128 * 32 * 4, True)


def test_local_attention_carries_its_window():
    assert size("local") == (2 * 50 * QKV * F32, False)  # block_size 50
    assert size("local", block_size=16) == (2 * 16 * QKV * F32, False)
    assert size("local", block_size=16, overlap=True) == (2 * 32 * QKV * F32, False)
    assert size("local", max_len=1024) == size("local")


def test_linear_attention_state():
    assert size("linear") == (linear_state(QKV), False) == (1168, False)
    assert size("cosformer").bytes == (H * 2 * D * D + H * 2 * D + H) * F32  # F = 2 D
    assert size("performer").bytes == (H * 256 * D + H * 256 + H) * F32  # F = m = 256


@pytest.mark.parametrize("name", ["retnet", "gla", "ssd", "deltanet", "gated_deltanet"])
def test_gated_and_delta_state(name):
    assert size(name) == (matrix_state(QKV), False) == (1024, False)


@pytest.mark.parametrize("name, state", [("linear", linear_state), ("gla", matrix_state),
                                         ("deltanet", matrix_state)])
def test_short_conv_adds_its_history(name, state):
    """The last short_conv - 1 inputs of q, k and v, [short_conv - 1, qkv_dim] each."""
    assert size(name, short_conv=4).bytes == state(QKV) + 3 * 3 * QKV * F32
    assert size(name, short_conv=1).bytes == state(QKV)


def test_s5_state_is_complex():
    state = nnx.eval_shape(lambda: mixers.make(
        "s5", emb_dim=E, qkv_dim=QKV, num_heads=H, max_len=MAX_LEN, dropout=0.0,
        attention_dropout=0.0, causal=True, dtype=jnp.float32, rngs=nnx.Rngs(0))).init_state(1)
    assert state.x_BxN.dtype == jnp.complex64
    assert size("s5") == (64 // 2 * C64, False) == (256, False)  # P = 64, conjugate pairs
    assert size("s5", conj_sym=False).bytes == 64 * C64


def test_lru_s4d_and_mamba2_states():
    assert size("lru") == (256 * C64, False)  # N = 256 complex states
    assert size("s4d") == (E * 64 // 2 * C64, False)  # N / 2 complex states per channel
    d_inner, d_state, conv = 2 * E, 64, 4  # expand 2; head_dim 64 = d_inner: one head
    window = (conv - 1) * (d_inner + 2 * d_state) * F32
    assert size("mamba2") == (window + 1 * d_state * d_inner * F32, False)


@pytest.mark.parametrize("name", ["linear", "performer", "cosformer", "taylor", "retnet",
                                  "gla", "ssd", "deltanet", "gated_deltanet", "local",
                                  "s4d", "s5", "lru", "mamba2"])
def test_recurrent_states_do_not_grow_with_length(name):
    assert size(name, max_len=16) == size(name, max_len=4096)
    assert not size(name).grows_with_length


def test_states_scale_with_the_widths():
    for name, state in [("linear", linear_state), ("retnet", matrix_state),
                        ("gated_deltanet", matrix_state)]:
        assert size(name, qkv_dim=64).bytes == state(64)
        assert size(name, emb_dim=64) == size(name)  # the core sees qkv_dim only
    assert matrix_state(64) == 4 * matrix_state(32)  # D doubles: S [H, D, D] quadruples
    assert size("s4d", emb_dim=64).bytes == 2 * size("s4d").bytes
    assert size("lru", emb_dim=64) == size("lru")  # N states whatever E
    assert size("s5", emb_dim=64) == size("s5")
    assert size("softmax", qkv_dim=64).bytes == 2 * size("softmax").bytes


@pytest.mark.parametrize("name", ["linformer", "nystromformer", "bigbird", "sinkhorn"])
def test_mixers_without_a_causal_form_raise(name):
    with pytest.raises(ValueError, match=f"mixer {name!r} cannot be built causal"):
        size(name)


@pytest.mark.parametrize("name", ["sparse", "longformer", "synthesizer", "reformer"])
def test_causal_mixers_without_a_decoding_state_raise(name):
    with pytest.raises(ValueError, match=f"mixer {name!r} defines no decoding state"):
        size(name)


def test_bad_option_and_unknown_mixer_raise():
    with pytest.raises(ValueError, match="'linear' cannot be built causal.*short_conv"):
        size("linear", short_conv=-1)
    with pytest.raises(ValueError, match="unknown mixer 'bogus'"):
        size("bogus")

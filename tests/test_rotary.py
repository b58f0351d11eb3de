"""Rotary positions (RoFormer): the rotation against the paper's matrix, the relative-
position property, and every attention family with `positions='rope'` (mask, future and
decoding checks; the families where it does not apply refuse it)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lra.models import mixers
from lra.models.rotary import apply_rotary
from mixer_checks import (check_no_future_leak, check_no_mask_leak,
                          check_step_equals_full_pass, make_mixer, random_x)
from test_zoo import check_padding_never_changes_logits


def roformer_matrix(position: int, dim: int) -> np.ndarray:
    """R^d_{Theta,m} of RoFormer eq. 15: 2x2 rotations by m * theta_i on the diagonal,
    theta_i = 10000^(-2(i-1)/d), i = 1 .. d/2, acting on adjacent pairs (x_1, x_2), ..."""
    matrix = np.zeros((dim, dim))
    for i in range(1, dim // 2 + 1):
        angle = position * 10000.0 ** (-2 * (i - 1) / dim)
        a, b = 2 * (i - 1), 2 * (i - 1) + 1
        matrix[a, a], matrix[a, b] = np.cos(angle), -np.sin(angle)
        matrix[b, a], matrix[b, b] = np.sin(angle), np.cos(angle)
    return matrix


def test_rotation_is_roformers_matrix_up_to_the_pair_layout():
    dim, length = 8, 5
    x = np.random.default_rng(0).normal(size=(1, length, 1, dim))
    # Our pairs are (x[i], x[i + D/2]); the paper's are adjacent: interleave the halves.
    to_adjacent = np.stack([np.arange(dim // 2), np.arange(dim // 2) + dim // 2], 1).ravel()
    rotated = np.asarray(apply_rotary(jnp.asarray(x, jnp.float32), jnp.arange(length)))
    for m in range(length):
        expected = roformer_matrix(m, dim) @ x[0, m, 0, to_adjacent]
        np.testing.assert_allclose(rotated[0, m, 0, to_adjacent], expected, atol=1e-5)


def test_logits_depend_on_relative_positions_only():
    rng = np.random.default_rng(1)
    q, k = (jnp.asarray(rng.normal(size=(2, 6, 3, 8)), jnp.float32) for _ in range(2))
    positions = jnp.arange(6)

    def logits(shift):
        rq, rk = apply_rotary(q, positions + shift), apply_rotary(k, positions + shift)
        return np.asarray(jnp.einsum("blhd,bmhd->bhlm", rq, rk))

    np.testing.assert_allclose(logits(37), logits(0), rtol=1e-4, atol=1e-4)
    unrotated = np.asarray(jnp.einsum("blhd,bmhd->bhlm", q, k))
    assert np.abs(logits(0) - unrotated).max() > 1e-2  # the rotation does something


@pytest.mark.parametrize("name", ["softmax", "memory_efficient"])
def test_exact_attention_with_rope_ignores_where_the_sequence_starts(name):
    """Padding in front shifts every real position by 3: with RoPE (and no other positions)
    an exact attention's outputs at the real tokens do not change."""
    mixer = make_mixer(name, emb_dim=8, max_len=12, rotary=True)
    x = random_x((2, 9, 8), seed=2)
    shifted = jnp.concatenate([random_x((2, 3, 8), seed=3), x], 1)
    mask = jnp.ones((2, 9), bool)
    padded_mask = jnp.concatenate([jnp.zeros((2, 3), bool), mask], 1)
    out = np.asarray(mixer(x, mask, deterministic=True))
    out_shifted = np.asarray(mixer(shifted, padded_mask, deterministic=True))[:, 3:]
    np.testing.assert_allclose(out_shifted, out, rtol=1e-4, atol=1e-5)
    plain = make_mixer(name, emb_dim=8, max_len=12)  # the same weights without rotation
    assert np.abs(np.asarray(plain(x, mask, deterministic=True)) - out).max() > 1e-3


# Rotation happens before the core, so the cores' masking is what is checked again: one
# family per way of reading q and k (blocks, random blocks, global tokens, projections
# along the length, hashing with shared q/k, feature maps, decays, the delta rule).
ROTARY_ATTENTIONS = ["softmax", "local", "bigbird", "longformer", "linformer",
                     "nystromformer", "reformer", "sinkhorn", "performer", "cosformer",
                     "retnet", "gated_deltanet"]


@pytest.mark.parametrize("name", ROTARY_ATTENTIONS)
def test_padding_never_changes_encoder_logits_with_rope(name):
    check_padding_never_changes_logits(name, positions="rope")


@pytest.mark.parametrize("name", ["linear", "performer", "retnet", "deltanet", "softmax"])
def test_causal_rope_mixers_mask_future_and_decode(name):
    mixer = make_mixer(name, emb_dim=8, max_len=10, causal=True, rotary=True)
    x = random_x((2, 10, 8), seed=4)
    mask = jnp.asarray(np.arange(10)[None, :] < np.array([[10], [6]]))
    check_no_mask_leak(mixer, x, mask)
    check_no_future_leak(mixer, x, mask)
    if mixer.decodes:
        check_step_equals_full_pass(mixer, x, mask)


def test_where_rope_does_not_apply_the_error_says_why():
    with pytest.raises(ValueError, match="dense synthetic logits"):
        make_mixer("synthesizer", rotary=True)
    with pytest.raises(ValueError, match="do not use q or k"):
        make_mixer("synthesizer", rotary=True, mode="random")
    make_mixer("synthesizer", rotary=True, mode="random", with_dot_product=True)
    for name in mixers.SEQUENCE_NAMES:
        with pytest.raises(ValueError, match="encode order themselves"):
            make_mixer(name, rotary=True)
    with pytest.raises(ValueError, match="even head_dim"):
        mixers.make("softmax", emb_dim=6, qkv_dim=6, num_heads=2, max_len=8, dropout=0.0,
                    attention_dropout=0.0, rotary=True, dtype=jnp.float32, rngs=nnx.Rngs(0))

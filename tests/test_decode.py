"""Transformers as RNNs: a causal kernelized classifier decoded token by token."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from lra.models import build_model, classify_stepwise

B, L, VOCAB, CLASSES = 3, 9, 11, 3


def _model(attention, *, causal=True, pooling="last", positions="sinusoidal", **options):
    config = ml_collections.ConfigDict(dict(
        num_layers=2, emb_dim=8, qkv_dim=8, num_heads=2, mlp_dim=16, dropout=0.0,
        attention_dropout=0.0, pooling=pooling, positions=positions,
        attention_options=options, causal=causal, embedding_init="flax",
    ))
    return build_model(config, attention=attention, vocab_size=VOCAB, num_classes=CLASSES,
                       max_len=L, rngs=nnx.Rngs(params=0, dropout=1))


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, VOCAB, (B, L)), jnp.int32)
    mask = np.ones((B, L), bool)
    mask[1, 4:] = False  # a prefix, as the data pipeline makes
    mask[2] = rng.random(L) < 0.6  # real tokens anywhere, the last one masked
    mask[2, [0, L - 1]] = [True, False]
    return tokens, jnp.asarray(mask)


@pytest.mark.parametrize(
    "attention, options, positions",
    [
        ("linear", {"chunk_size": 4}, "sinusoidal"),
        ("performer", {"num_features": 16}, "learned"),
        ("cosformer", {}, "none"),
        ("taylor", {"feature_dim": 2, "form": "recurrent"}, "sinusoidal"),
        ("retnet", {"chunk_size": 4}, "rope"),  # rotary q, k at each step's position
    ],
)
def test_stepwise_logits_equal_parallel_pass(attention, options, positions):
    model = _model(attention, positions=positions, **options)
    tokens, mask = _batch()
    parallel = model(tokens, mask)
    stepwise = nnx.jit(classify_stepwise)(model, tokens, mask)
    assert stepwise.shape == (B, CLASSES) and stepwise.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(stepwise), np.asarray(parallel), rtol=1e-5, atol=1e-5)


def test_state_size_does_not_depend_on_length():
    encoder = _model("linear").encoder
    state = encoder.init_decode(B)
    assert len(state) == 2  # one per block
    shapes = {leaf.shape for leaf in jax.tree.leaves(state)}
    assert shapes == {(B, 2, 4, 4), (B, 2, 4), (B, 2)}  # S [B,H,F,D], z [B,H,F], scale [B,H]


@pytest.mark.parametrize(
    "attention, causal, message",
    [("softmax", True, "'softmax' has no step"), ("linear", False, "causal=True")],
)
def test_stepwise_needs_a_causal_kernelized_encoder(attention, causal, message):
    model = _model(attention, causal=causal)
    tokens, mask = _batch()
    with pytest.raises(ValueError, match=message):
        classify_stepwise(model, tokens, mask)


def test_stepwise_rejects_too_long_input():
    tokens = jnp.zeros((1, L + 1), jnp.int32)
    with pytest.raises(ValueError, match="max_len"):
        classify_stepwise(_model("linear"), tokens, jnp.ones((1, L + 1), bool))


def test_causal_model_trains():
    model = _model("linear", chunk_size=4)
    tokens, mask = _batch()
    targets = jnp.asarray([0, 1, 2])
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer):
        def loss_fn(model):
            logits = model(tokens, mask, deterministic=False)
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(train_step(model, optimizer)) for _ in range(10)]
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0], losses

"""The encoder and classifier: shapes, masking, settings, dropout randomness."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from lra.models import Classifier, Encoder, build_model

B, L, VOCAB, CLASSES = 2, 6, 11, 3


def _config(**overrides):
    config = ml_collections.ConfigDict(
        dict(
            num_layers=1,
            emb_dim=8,
            qkv_dim=8,
            num_heads=2,
            mlp_dim=16,
            dropout=0.0,
            attention_dropout=0.0,
            pooling="cls",
            positions="sinusoidal",
            attention_options={},
            causal=False,
            embedding_init="flax",
        )
    )
    config.update(overrides)
    return config


def _model(attention="softmax", seed=0, **overrides):
    return build_model(
        _config(**overrides),
        attention=attention,
        vocab_size=VOCAB,
        num_classes=CLASSES,
        max_len=L,
        rngs=nnx.Rngs(params=seed, dropout=seed + 1),
    )


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, VOCAB, (B, L)), jnp.int32)
    mask = jnp.arange(L)[None, :] < jnp.asarray([[L], [3]])  # row 1 has 3 real tokens
    return tokens, mask


@pytest.mark.parametrize("pooling", ["cls", "mean", "last"])
@pytest.mark.parametrize("positions", ["sinusoidal", "learned", "none"])
def test_logits_shape_dtype(pooling, positions):
    model = _model(pooling=pooling, positions=positions)
    assert isinstance(model, Classifier) and isinstance(model.encoder, Encoder)
    tokens, mask = _batch()
    logits = model(tokens, mask)
    assert logits.shape == (B, CLASSES)
    assert logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
    assert model.encoder(tokens, mask).shape == (B, 8)


@pytest.mark.parametrize("pooling", ["cls", "mean", "last"])
@pytest.mark.parametrize("deterministic", [True, False])
def test_tokens_at_masked_positions_do_not_change_logits(pooling, deterministic):
    model = _model(
        pooling=pooling,
        positions="learned",
        num_layers=2,  # a leak into padded rows would reach real rows in layer 2
        dropout=0.1,
        attention_dropout=0.1,
    )
    tokens, mask = _batch()
    other = jnp.where(mask, tokens, (tokens + 1 + jnp.arange(L)) % VOCAB)
    assert (other != tokens).any()
    nnx.reseed(model, dropout=5)
    logits = model(tokens, mask, deterministic=deterministic)
    nnx.reseed(model, dropout=5)
    logits_other = model(other, mask, deterministic=deterministic)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(logits_other))


def test_fully_masked_sequence_is_finite():
    model = _model(pooling="mean")
    tokens, mask = _batch()
    logits = model(tokens, mask.at[1].set(False))
    assert np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_token_zero_at_real_position_is_real(pooling):
    model = _model(pooling=pooling)
    tokens = jnp.zeros((B, L), jnp.int32).at[:, 0].set(1)
    full = jnp.ones((B, L), bool)
    shorter = full.at[:, L - 2 :].set(False)
    assert not np.allclose(model(tokens, full), model(tokens, shorter))


@pytest.mark.parametrize("positions", ["sinusoidal", "learned", "none"])
def test_positions_make_order_matter(positions):
    model = _model(pooling="mean", positions=positions)
    tokens = jnp.asarray([[1, 2, 3, 4, 5, 6]] * B, jnp.int32)
    mask = jnp.ones((B, L), bool)
    logits = model(tokens, mask)
    reversed_logits = model(tokens[:, ::-1], mask)
    order_invariant = np.allclose(logits, reversed_logits, atol=1e-5)
    assert order_invariant == (positions == "none")


@pytest.mark.parametrize(
    "overrides, setting",
    [
        (dict(qkv_dim=10, num_heads=4), "qkv_dim"),
        (dict(pooling="max"), "pooling"),
        (dict(positions="rotary"), "positions"),
        (dict(attention_options={"bogus": 1}), "bogus"),
        (dict(causal=True), "pooling='cls' with causal=True"),
        (dict(causal=True, pooling="mean"), "pooling='mean' with causal=True"),
    ],
)
def test_invalid_settings_raise(overrides, setting):
    with pytest.raises(ValueError, match=setting):
        _model(**overrides)


def test_unknown_attention_raises():
    with pytest.raises(ValueError, match="softmax"):
        _model(attention="nonexistent")


def test_attention_options_reach_the_core():
    model = _model(attention_options={"implementation": "xla"})
    assert model.encoder.blocks[0].attention.core.implementation.value == "xla"


def test_too_long_input_raises():
    tokens = jnp.zeros((B, L + 1), jnp.int32)
    with pytest.raises(ValueError, match="max_len"):
        _model()(tokens, jnp.ones((B, L + 1), bool))


def test_deterministic_calls_repeat():
    model = _model(dropout=0.3, attention_dropout=0.3)
    tokens, mask = _batch()
    np.testing.assert_array_equal(model(tokens, mask), model(tokens, mask))


def test_reseed_controls_dropout():
    model = _model(dropout=0.3, attention_dropout=0.3, pooling="mean")
    tokens, mask = _batch()
    deterministic = model(tokens, mask)
    outputs = {}
    for name, key in [("a", 1), ("a_again", 1), ("b", 2)]:
        nnx.reseed(model, dropout=jax.random.key(key))
        outputs[name] = np.asarray(model(tokens, mask, deterministic=False))
    np.testing.assert_array_equal(outputs["a"], outputs["a_again"])
    assert not np.allclose(outputs["a"], outputs["b"])
    assert not np.allclose(outputs["a"], deterministic)


def test_jit_matches_eager():
    model = _model(positions="learned")
    tokens, mask = _batch()
    jitted = nnx.jit(lambda model, tokens, mask: model(tokens, mask))
    np.testing.assert_allclose(jitted(model, tokens, mask), model(tokens, mask), atol=1e-6)


def test_last_pooling_takes_the_last_real_token():
    encoder = _model(pooling="last").encoder
    x_BxLxE = jnp.arange(B * L * 8, dtype=jnp.float32).reshape(B, L, 8)
    mask = jnp.asarray([[True] * L, [False, True, True, False, True, False]])
    pooled = encoder._pool(x_BxLxE, mask)
    np.testing.assert_array_equal(pooled, x_BxLxE[jnp.arange(B), jnp.asarray([L - 1, 4])])


@pytest.mark.parametrize("attention", ["softmax", "linear", "performer", "cosformer", "taylor"])
def test_causal_reaches_every_block(attention):
    model = _model(attention, causal=True, pooling="last", num_layers=2)
    assert model.encoder.causal
    assert all(block.attention.core.causal for block in model.encoder.blocks)
    tokens, mask = _batch()
    assert np.isfinite(np.asarray(model(tokens, mask))).all()


def test_causal_flag_changes_the_computation():
    """Same parameters: causal and bidirectional differ unless there is nothing to hide."""
    causal = _model("linear", causal=True, pooling="last", num_layers=2)
    bidirectional = _model("linear", causal=False, pooling="last", num_layers=2)
    tokens, _ = _batch()
    full = jnp.ones((B, L), bool)
    assert not np.allclose(causal(tokens, full), bidirectional(tokens, full))
    first_only = full.at[:, 1:].set(False)
    np.testing.assert_allclose(causal(tokens, first_only), bidirectional(tokens, first_only),
                               atol=1e-6)


def test_config_default_reaches_the_model():
    from configs import listops

    config = listops.get_config("runlocal,attention=linear")
    assert config.model.causal is False
    config.model.causal, config.model.pooling = True, "last"
    model = build_model(config.model, attention=config.attention, vocab_size=VOCAB,
                        num_classes=CLASSES, max_len=L, rngs=nnx.Rngs(0))
    assert model.encoder.blocks[0].attention.core.causal


def test_embedding_init_unit_normal_is_lras_and_flax_is_nnx_default():
    """unit_normal draws N(0, 1) (LRA's nn.Embed init); flax keeps nnx.Embed's default."""
    vocab, width = 512, 64
    tables = {}
    for init in ("unit_normal", "flax"):
        encoder = Encoder(vocab_size=vocab, max_len=L, num_layers=1, emb_dim=width, qkv_dim=8,
                          num_heads=2, mlp_dim=16, dropout=0.0, attention_dropout=0.0,
                          pooling="cls", positions="none", attention="softmax",
                          attention_options={}, embedding_init=init, rngs=nnx.Rngs(0))
        tables[init] = np.asarray(encoder.embed.embedding[...])
    assert abs(tables["unit_normal"].std() - 1.0) < 0.02 and abs(tables["unit_normal"].mean()) < 0.02
    reference = nnx.Embed(vocab, width, rngs=nnx.Rngs(0)).embedding[...].std()
    assert abs(tables["flax"].std() - float(reference)) < 0.1 * float(reference)
    assert tables["flax"].std() < 0.5  # fan-in scaled: far from LRA's unit variance
    with pytest.raises(ValueError, match="embedding_init must be one of 'flax', 'unit_normal'"):
        _model(embedding_init="xavier")


def test_reformer_blocks_build_no_key_projection():
    """Shared QK: the encoder gives Reformer no key projection (no unused parameters)."""
    options = {"bucket_size": 4}
    reformer, softmax = _model("reformer", attention_options=options), _model("softmax")
    assert reformer.encoder.blocks[0].attention.key is None
    assert softmax.encoder.blocks[0].attention.key is not None
    count = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
    assert count(softmax) - count(reformer) == 8 * 8 + 8  # one E x HD kernel and its bias
    tokens, mask = _batch()
    assert np.isfinite(np.asarray(reformer(tokens, mask))).all()

"""The mixer registry (attention families and sequence models under one name), the
`mixer` / `attention` config alias, and the state-space parameter group of the optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import listops as listops_config
from lra.training import train, validation
from lra.models import attention, mixers
from lra.models.mixers.ssm import SsmParam


def test_one_name_space_holds_every_attention_and_the_sequence_models():
    assert set(mixers.NAMES) == set(attention.NAMES) | set(mixers.SEQUENCE_NAMES)
    assert len(set(mixers.NAMES)) == len(mixers.NAMES)
    for name in mixers.ATTENTION_NAMES:
        assert mixers.is_attention(name)
        assert mixers.family_options(name) == attention.family_options(name)
    for name in mixers.SEQUENCE_NAMES:
        assert not mixers.is_attention(name)
        assert set(mixers.default_options(name)) == set(mixers.family_options(name))


def test_unknown_names_and_options_list_the_known_ones():
    common = dict(emb_dim=8, qkv_dim=8, num_heads=2, max_len=8, dropout=0.0,
                  attention_dropout=0.0, dtype=jnp.float32, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown mixer 'nonesuch'; known mixers: softmax"):
        mixers.make("nonesuch", **common)
    with pytest.raises(ValueError, match="unknown option"):
        mixers.make("linear", nonesuch=1, **common)
    for name in mixers.SEQUENCE_NAMES:
        with pytest.raises(ValueError, match=f"mixer {name!r} got unknown option"):
            mixers.make(name, nonesuch=1, **common)


def test_attention_mixer_maps_x_to_x_shape():
    mixer = mixers.make("linear", emb_dim=8, qkv_dim=8, num_heads=2, max_len=5, dropout=0.0,
                        attention_dropout=0.0, dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = jnp.ones((2, 5, 8))
    assert mixer(x, jnp.ones((2, 5), bool), deterministic=True).shape == (2, 5, 8)


def test_mixer_and_attention_are_one_config_field():
    config = listops_config.get_config("runlocal,mixer=linear")
    assert config.attention == config.mixer == "linear"
    assert set(config.model.attention_options) == set(attention.family_options("linear"))
    config.mixer = "performer"  # as --config.mixer=performer
    assert config.attention == "performer"
    config.attention = "local"  # as --config.attention=local
    assert config.mixer == "local"
    with pytest.raises(ValueError, match="unknown attention 'nonesuch'"):
        listops_config.get_config("runlocal,mixer=nonesuch")


def test_a_config_whose_mixer_and_attention_differ_is_refused():
    config = listops_config.get_config("runlocal").to_dict()  # the alias is gone
    import ml_collections
    config = ml_collections.ConfigDict(config)
    config.mixer = "linear"
    with pytest.raises(ValueError, match="config.mixer='linear' and config.attention='softmax'"):
        validation.validate_config(config, 1)


class _TwoGroups(nnx.Module):
    def __init__(self):
        self.ssm = SsmParam(jnp.full((3,), 2.0))
        self.dense = nnx.Param(jnp.full((3,), 2.0))


def test_ssm_parameters_get_their_learning_rate_and_no_weight_decay():
    config = listops_config.get_config("runlocal")
    config.update(learning_rate=0.01, ssm_learning_rate=0.001, weight_decay=0.5,
                  warmup_steps=0, schedule="constant", grad_clip=0.0)
    model = _TwoGroups()
    labels = train.ssm_labels(model)
    assert sorted(jax.tree.leaves(labels)) == ["regular", "ssm"]
    optimizer = nnx.Optimizer(model, train.make_optimizer(config, labels), wrt=nnx.Param)
    grads = nnx.state(model, nnx.Param)
    grads = jax.tree.map(lambda x: jnp.ones_like(x), grads)
    optimizer.update(model, grads)
    # Adam's first bias-corrected step is lr * g/|g| = lr; AdamW adds lr * wd * param.
    np.testing.assert_allclose(model.ssm[...], 2.0 - 0.001, rtol=1e-6)
    np.testing.assert_allclose(model.dense[...], 2.0 - 0.01 - 0.01 * 0.5 * 2.0, rtol=1e-6)
    assert train.ssm_labels(nnx.Linear(2, 2, rngs=nnx.Rngs(0))) is None  # plain AdamW
    config.ssm_weight_decay = 0.5  # a key like the others: AdamW's decay on the SSM group
    model = _TwoGroups()
    optimizer = nnx.Optimizer(model, train.make_optimizer(config, labels), wrt=nnx.Param)
    optimizer.update(model, grads)
    np.testing.assert_allclose(model.ssm[...], 2.0 - 0.001 - 0.001 * 0.5 * 2.0, rtol=1e-6)


def test_make_schedule_peaks_at_the_given_rate():
    config = listops_config.get_config("runlocal")
    config.update(warmup_steps=10, schedule="constant")
    assert float(train.make_schedule(config, 0.25)(10)) == pytest.approx(0.25)
    assert float(train.make_schedule(config)(10)) == pytest.approx(config.learning_rate)
    assert isinstance(train.make_optimizer(config), optax.GradientTransformation)


def test_masked_batchnorm_uses_real_tokens_and_running_averages_at_evaluation():
    from lra.models.norm import make_norm

    norm = make_norm("batch", 3, momentum=0.9, dtype=jnp.float32, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], bool)
    x_padded = np.where(mask[..., None], x, 1e3)  # padding values must not count
    y = np.asarray(norm(jnp.asarray(x_padded), jnp.asarray(mask), deterministic=False))
    real = x[mask]  # [7, 3]
    mean, var = real.mean(0), real.var(0)
    np.testing.assert_allclose(y[mask], (real - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(norm.mean[...], 0.1 * mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(norm.var[...], 0.9 + 0.1 * var, rtol=1e-5)
    y_eval = np.asarray(norm(jnp.asarray(x), jnp.asarray(mask), deterministic=True))
    np.testing.assert_allclose(
        y_eval, (x - 0.1 * mean) / np.sqrt(0.9 + 0.1 * var + 1e-5), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="norm_momentum"):
        make_norm("batch", 3, momentum=1.0, dtype=jnp.float32, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="'layer', 'batch'|layer"):
        make_norm("group", 3, dtype=jnp.float32, rngs=nnx.Rngs(0))

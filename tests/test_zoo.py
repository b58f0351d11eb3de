"""Every registered attention trains inside the encoder with the runlocal ListOps config."""

import jax
import numpy as np
import pytest
from flax import nnx

from configs import listops as listops_config
from lra import data, models, sharding, tasks, train
from lra.models import attention


@pytest.mark.parametrize("name", attention.NAMES)
def test_attention_trains_in_the_runlocal_encoder(name):
    config = listops_config.get_config(f"attention={name},runlocal")
    config.model.num_layers = 1  # the runlocal sizes otherwise, sequence length included
    config.batch_size = 4
    task = tasks.get("listops")
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, config.max_length + 1, size=config.batch_size)
    arrays = {
        "inputs": rng.integers(1, task.vocab_size, (config.batch_size, config.max_length)),
        "lengths": lengths,
        "targets": rng.integers(0, task.num_classes, config.batch_size),
    }
    mesh = sharding.make_mesh(0)
    with jax.set_mesh(mesh):
        graphdef, rng_state, state, shardings = train.create_state(config, task, mesh)
        step = train.make_train_step(graphdef, shardings, config)
        batch = data.gather(arrays, np.arange(config.batch_size), config.max_length)
        losses = []
        for _ in range(3):  # the first step has learning rate 0 (warmup)
            state, metrics = step(state, rng_state, data.to_global(batch, mesh))
            losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all(), losses
    assert losses[2] != losses[0]  # parameters moved


@pytest.mark.parametrize("name", attention.NAMES)
def test_padding_tokens_never_change_encoder_logits(name):
    config = listops_config.get_config(f"attention={name},runlocal")
    config.model.num_layers = 1
    task = tasks.get("listops")
    model = models.build_model(config.model, attention=name, vocab_size=task.vocab_size,
                               num_classes=task.num_classes, max_len=config.max_length,
                               rngs=nnx.Rngs(params=0, dropout=1))
    rng = np.random.default_rng(1)
    length = config.max_length
    tokens = rng.integers(0, task.vocab_size, (3, length))
    mask = np.arange(length)[None, :] < np.array([[length], [37], [5]])
    other = np.where(mask, tokens, rng.integers(0, task.vocab_size, tokens.shape))
    logits = np.asarray(model(tokens, mask))
    assert np.isfinite(logits).all()
    np.testing.assert_allclose(np.asarray(model(other, mask)), logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", attention.NAMES)
def test_every_option_can_be_set_from_the_command_line(name):
    """ml_collections overrides only these types (not None): options need real defaults."""
    for option, default in attention.default_options(name).items():
        assert isinstance(default, (bool, int, float, str, tuple)), (option, default)

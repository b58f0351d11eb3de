"""Every registered attention family inside the encoder (runlocal ListOps config): padding
never changes the logits, and every option can be set from the command line.

That every family trains through the real train step on the 4 test devices, and learns a
task that needs tokens far apart, is tests/test_learning.py.
"""

import numpy as np
import pytest
from flax import nnx

from configs import listops as listops_config
from lra import models, tasks
from lra.models import attention


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

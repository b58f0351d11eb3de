"""Mixers inside the encoder (runlocal ListOps config): padding never changes the logits
(one mixer of each kind: the encoder around the mixer is shared), every registered
mixer's options can be set from the command line, and every sequence model's config
validates for every task, with the block its paper has (`model.block_mlp` from the
mixer's own default).

The mixer contract (masks with holes, gradients, causality, decoding, dtypes) of every
mixer alone is tests/test_mixer_contract.py; that every family trains through the real
train step on the 4 test devices, and learns a task that needs tokens far apart, is
tests/test_learning.py.
"""

import numpy as np
import pytest
from flax import nnx

from configs import listops as listops_config
from lra import models, tasks
from lra.models import mixers


# The encoder around the mixer (embedding, positions, pooling, head) is the same code for
# every mixer: one of each kind here; each mixer's own masking, with holes and gradients,
# is the mixer contract (tests/test_mixer_contract.py).
@pytest.mark.parametrize("name", [mixers.ATTENTION_NAMES[0], mixers.SEQUENCE_NAMES[0]])
def test_padding_tokens_never_change_encoder_logits(name):
    check_padding_never_changes_logits(name)


def check_padding_never_changes_logits(name: str, positions: str | None = None) -> None:
    """Mixer `name` in the 1-layer runlocal ListOps encoder (with `positions` if given):
    tokens at padded positions never change the logits."""
    config = listops_config.get_config(f"attention={name},runlocal")
    config.model.num_layers = 1
    config.model.positions = positions or config.model.positions
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


@pytest.mark.parametrize("name", mixers.NAMES)
def test_every_option_can_be_set_from_the_command_line(name):
    """ml_collections overrides only these types (not None): options need real defaults."""
    for option, default in mixers.default_options(name).items():
        assert isinstance(default, (bool, int, float, str, tuple)), (option, default)


@pytest.mark.parametrize("name", mixers.SEQUENCE_NAMES)
def test_sequence_models_validate_for_every_task(name):
    """Each task's runlocal and full configs build the model (traced, not computed)."""
    import importlib

    from lra.training import validation

    for task in ("listops", "text", "retrieval", "image", "pathfinder", "pathx"):
        module = importlib.import_module(f"configs.{task}")
        for arg in (f"runlocal,mixer={name}", f"mixer={name}"):
            config = module.get_config(arg)
            assert config.attention == name
            assert config.model.block_mlp is mixers.default_block_mlp(name)
            validation.validate_config(config, 1)

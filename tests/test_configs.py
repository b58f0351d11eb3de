"""Config files: arguments, the LRA preset's numbers, the learning-rate schedules."""

import jax
import numpy as np
import pytest
from flax import nnx

from configs import listops
from lra import tasks
from lra.training import train


def test_lra_preset_is_the_released_listops_config():
    config = listops.get_config("preset=lra")
    model = config.model
    assert (model.num_layers, model.emb_dim, model.qkv_dim, model.num_heads, model.mlp_dim) == (
        4, 512, 512, 8, 1024)
    assert (config.max_length, config.batch_size, config.num_train_steps) == (2000, 32, 5000)
    assert (config.adam_b2, config.weight_decay, config.warmup_steps) == (0.98, 0.1, 1000)
    assert config.schedule == "rsqrt" and model.pooling == "cls"
    assert config.prepare.to_dict() == {"num_train": 96_000, "num_val": 2_000, "num_test": 2_000,
                                        "seed": 0, "min_length": 500, "max_length": 2000}
    train.validate_config(config, num_devices=4)
    abstract = nnx.eval_shape(lambda: train._build(config, tasks.get("listops"))[0])
    # The CLS position makes the attention see 2001 tokens; the classifier is 512 -> 1024 -> 10.
    assert abstract.encoder.blocks[0].attention.query.kernel.shape == (512, 512)
    assert abstract.head.logits.kernel.shape == (1024, 10)


def test_rsqrt_schedule_follows_lra_constant_linear_warmup_rsqrt_decay():
    config = listops.get_config("preset=lra")
    schedule = train.make_schedule(config)
    for step in (0, 1, 500, 999, 1000, 1001, 2500, 4000, 4999):
        lra = 0.05 * min(1.0, step / 1000) / np.sqrt(max(step, 1000))  # LRA's factors
        assert float(schedule(step)) == pytest.approx(lra, rel=1e-5, abs=1e-9), step


def test_cosine_schedule_warms_up_then_decays_to_zero():
    config = listops.get_config("runlocal")
    config.schedule = "cosine"
    schedule = train.make_schedule(config)
    peak, warmup, total = config.learning_rate, config.warmup_steps, config.num_train_steps
    assert float(schedule(warmup)) == pytest.approx(peak)
    assert float(schedule(warmup // 2)) == pytest.approx(peak / 2)
    assert float(schedule(total)) == pytest.approx(0.0, abs=1e-9)


def test_runlocal_is_small_and_valid():
    config = listops.get_config("runlocal,seed=3")
    assert config.seed == 3 and config.max_length <= 256 and config.num_train_steps <= 2000
    train.validate_config(config, num_devices=jax.device_count())


@pytest.mark.parametrize("arg, message", [
    ("runlocal=1", "takes no value"),
    ("seed=abc", "is not a int"),
    ("preset=paper", "unknown preset 'paper'; known: lra"),
    ("attention=nonesuch", "unknown attention 'nonesuch'; known: .*softmax"),
    ("runlocl", "unknown config argument 'runlocl'"),
    ("preset=s5,mixer=lru", "preset=s5 holds S5's released settings, for mixer s5 alone"),
])
def test_bad_config_arguments_list_what_is_known(arg, message):
    with pytest.raises(ValueError, match=message):
        listops.get_config(arg)

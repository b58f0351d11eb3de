"""Per-layer mixer patterns (`model.mixer_pattern`, lra/models/pattern.py): hybrid stacks.

A one-name pattern is today's model bit for bit; a hybrid equals a stack built here by
hand from `Block`s of the named mixers with the same parameters; scanned repeats give the
unrolled outputs and gradients; configs, launch flags, sweeps, validation, decoding,
results.json and the report's label all know the pattern.
"""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import listops as listops_config
from lra.experiments import launch, sweep
from lra.models import build_model, mixers, pattern
from lra.models.encoder import Block
from lra.training import train

B, L, VOCAB, CLASSES = 2, 10, 13, 3
HYBRID = ("linear", "softmax")  # one repeat: a linear-attention layer, then exact attention


def _model_config(attention, mixer_pattern="", num_layers=4, **overrides):
    names = pattern.parse(mixer_pattern)
    others = [name for name in dict.fromkeys(names) if name != attention]
    config = ml_collections.ConfigDict(dict(
        num_layers=num_layers, emb_dim=8, qkv_dim=8, num_heads=2, mlp_dim=16, dropout=0.0,
        attention_dropout=0.0, pooling="last", positions="none", causal=True,
        attention_options=mixers.default_options(attention), embedding_init="flax",
        block_mlp=mixers.default_block_mlp(attention), scan_layers=False,
        mixer_pattern=mixer_pattern,
        pattern_options={name: mixers.default_options(name) for name in others},
        pattern_block_mlp={name: mixers.default_block_mlp(name) for name in others}))
    config.update(overrides)
    return config


def _model(config, attention, seed=0):
    return build_model(config, attention=attention, vocab_size=VOCAB, num_classes=CLASSES,
                       max_len=L, rngs=nnx.Rngs(params=seed, dropout=seed + 1))


def _batch():
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(1, VOCAB, (B, L)), jnp.int32)
    mask = jnp.arange(L)[None, :] < jnp.asarray([[L], [6]])
    return tokens, mask


def _leaves(model):
    return jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def test_a_one_name_pattern_is_todays_model_bit_for_bit():
    tokens, mask = _batch()
    today = _model(_model_config("linear"), "linear")
    named = _model(_model_config("linear", "linear"), "linear")
    assert jax.tree.structure(nnx.to_pure_dict(nnx.state(today))) == \
        jax.tree.structure(nnx.to_pure_dict(nnx.state(named)))
    for a, b in zip(_leaves(today), _leaves(named)):
        np.testing.assert_array_equal(a, b)
    forward = nnx.jit(lambda model, tokens, mask: model(tokens, mask))
    np.testing.assert_array_equal(forward(today, tokens, mask), forward(named, tokens, mask))


def test_a_hybrid_equals_a_hand_built_stack_of_the_same_layers():
    tokens, mask = _batch()
    config = _model_config("linear", "linear+softmax")
    model = _model(config, "linear")
    encoder = model.encoder
    assert encoder.layer_names == HYBRID * 2
    x, mask_full = encoder._embed(tokens, mask)
    for index, name in enumerate(HYBRID * 2):
        block = Block(emb_dim=8, qkv_dim=8, num_heads=2, mlp_dim=16, max_len=L, dropout=0.0,
                      attention_dropout=0.0, attention=name,
                      attention_options=mixers.default_options(name), causal=True,
                      block_mlp=True, rngs=nnx.Rngs(100 + index))
        nnx.update(block, nnx.state(encoder.blocks[index]))  # fails if the mixer differs
        x = block(x, mask_full, deterministic=True)
    expected = model.head(encoder._pool(encoder.final_norm(x), mask_full))
    np.testing.assert_allclose(model(tokens, mask), expected, rtol=1e-6, atol=1e-6)


def _stacked(unrolled_pure: dict, period: int) -> dict:
    """An unrolled pattern model's pure state in the scanned layout: layer r * P + j is
    repeat r of group block j (encoder/scanned_blocks/blocks/j/..., axis 0 = r)."""
    encoder = dict(unrolled_pure["encoder"])
    blocks = encoder.pop("blocks")
    layers = [blocks[i] for i in sorted(blocks)]
    group = {j: jax.tree.map(lambda *v: jnp.stack(v), *layers[j::period])
             for j in range(period)}
    encoder["scanned_blocks"] = {"blocks": group}
    return {**unrolled_pure, "encoder": encoder}


def test_scanned_repeats_give_the_unrolled_outputs_and_gradients():
    tokens, mask = _batch()
    unrolled = _model(_model_config("linear", "linear+softmax"), "linear")
    scanned = _model(_model_config("linear", "linear+softmax", scan_layers=True), "linear",
                     seed=5)
    state = nnx.state(scanned)
    nnx.replace_by_pure_dict(state, _stacked(nnx.to_pure_dict(nnx.state(unrolled)), 2))
    nnx.update(scanned, state)
    forward = nnx.jit(lambda model: model(tokens, mask))
    np.testing.assert_allclose(forward(scanned), forward(unrolled), rtol=1e-5, atol=1e-6)
    gradient = nnx.jit(nnx.grad(lambda model: model(tokens, mask).sum()))
    grads_unrolled = nnx.to_pure_dict(gradient(unrolled))
    grads_scanned = nnx.to_pure_dict(gradient(scanned))
    expected = _stacked(grads_unrolled, 2)
    for (path, value), (_, want) in zip(jax.tree.leaves_with_path(grads_scanned),
                                        jax.tree.leaves_with_path(expected)):
        scale = float(np.abs(np.asarray(want)).max(initial=0.0))  # float rounding of sums
        np.testing.assert_allclose(value, want, rtol=1e-5, atol=max(1e-5 * scale, 1e-7),
                                   err_msg=jax.tree_util.keystr(path))


def test_decoding_runs_when_every_layer_decodes_and_names_the_one_that_does_not():
    from lra.models import classify_stepwise

    tokens, mask = _batch()
    model = _model(_model_config("linear", "linear+retnet"), "linear")
    np.testing.assert_allclose(classify_stepwise(model, tokens, mask), model(tokens, mask),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="'softmax' has no step"):
        _model(_model_config("linear", "linear+softmax"), "linear").encoder.init_decode(B)


@pytest.mark.parametrize("names, num_layers, expected", [
    (("gated_deltanet",) * 3 + ("softmax",), 4, "gated_deltanet x3 + softmax"),
    (HYBRID, 4, "(linear + softmax) x2"),
    (("softmax",), 4, "softmax"),
])
def test_label(names, num_layers, expected):
    assert pattern.label(names, num_layers) == expected


def test_config_argument_and_flag_build_each_names_options():
    config = listops_config.get_config("runlocal,pattern=gla+softmax")
    assert config.attention == "gla" and config.model.mixer_pattern == "gla+softmax"
    assert dict(config.model.pattern_options.softmax) == mixers.default_options("softmax")
    assert set(config.model.pattern_options) == {"softmax"}
    argv = launch.move_mixer_flags(["--config", "configs/listops.py:runlocal",
                                    "--config.model.mixer_pattern=gla,softmax"])
    assert argv == ["--config", "configs/listops.py:runlocal,pattern=gla+softmax"]
    one = listops_config.get_config("runlocal,pattern=gla+gla")
    assert one.model.mixer_pattern == "" and one.attention == "gla"  # today's model
    with pytest.raises(ValueError, match="first name"):
        listops_config.get_config("runlocal,mixer=softmax,pattern=gla+softmax")
    with pytest.raises(ValueError, match="unknown mixer 'nope'"):
        listops_config.get_config("runlocal,pattern=gla+nope")


def test_a_sweep_over_patterns_gives_one_run_each():
    runs = sweep.expand("configs/listops.py:runlocal",
                           ["model.mixer_pattern=gla+softmax,gla+gla+gla+softmax"], [])
    assert [run.name for run in runs] == ["model.mixer_pattern=gla+softmax",
                                          "model.mixer_pattern=gla+gla+gla+softmax"]
    moved = launch.move_mixer_flags(["--config", runs[0].config_arg, *runs[0].overrides])
    assert moved == ["--config", "configs/listops.py:runlocal,pattern=gla+softmax"]


@pytest.mark.parametrize("change, message", [
    ({"model.num_layers": 3}, "does not divide model.num_layers=3"),
    ({"model.pattern_options.softmax.nope": 1}, "pattern_options.softmax has unknown"),
    ({"model.pattern_options.linear": {}}, "not one of model.mixer_pattern's other"),
])
def test_bad_patterns_are_refused_naming_the_key(change, message):
    from lra.common import set_path

    config = listops_config.get_config("runlocal,pattern=gla+softmax")
    config.model.num_layers = 2
    for key, value in change.items():
        set_path(config, key, value)
    with pytest.raises(ValueError, match=message):
        train.validate_config(config, 1)


def test_results_record_the_pattern_every_layer_and_the_label(tmp_path):
    from tests.test_mqar import tiny_mqar_run

    results = tiny_mqar_run("linear", tmp_path, **{
        "model.mixer_pattern": "linear+softmax", "model.pattern_options": {
            "softmax": mixers.default_options("softmax")},
        "model.pattern_block_mlp": {"softmax": False}, "num_train_steps": 10,
        "eval_every": 10, "warmup_steps": 2, "checkpoint_every": 10,
        "prepare.num_train": 200, "prepare.num_val": 50, "prepare.num_test": 50})
    assert results["mixer_pattern"] == "linear+softmax"
    assert results["layer_mixers"] == ["linear", "softmax"]
    assert results["mixer_label"] == "linear + softmax"
    assert results["state_grows_with_length"] is True  # the softmax layer's cache
    assert set(results["state_bytes_by_mixer"]) == {"linear", "softmax"}
    recorded = json.loads((tmp_path / "linear" / "results.json").read_text())
    assert recorded["layer_mixers"] == ["linear", "softmax"]

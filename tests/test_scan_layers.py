"""Scanned layers (`model.scan_layers`): one stacked block run by `nnx.scan`.

Given the same parameters (the unrolled model's, mapped into the stacked layout by this
file's own code), the scanned encoder gives the unrolled one's outputs, gradients and
BatchNorm statistics; it runs with remat, dropout, masks and the fsdp rule, whose
sharding never splits the layer axis.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from configs import listops as listops_config
from lra import tasks
from lra.parallel import sharding
from lra.training import data, train
from lra.models import build_model, classify_stepwise, mixers

B, L, VOCAB, CLASSES, LAYERS = 3, 12, 11, 3, 3


def _model_config(attention="softmax", **overrides):
    config = ml_collections.ConfigDict(dict(
        num_layers=LAYERS, emb_dim=8, qkv_dim=8, num_heads=2, mlp_dim=16, dropout=0.0,
        attention_dropout=0.0, pooling="cls", positions="sinusoidal",
        attention_options=mixers.default_options(attention), causal=False,
        embedding_init="flax", scan_layers=False))
    config.update(overrides)
    return config


def _model(attention="softmax", *, seed=0, remat=False, **overrides):
    return build_model(_model_config(attention, **overrides), attention=attention,
                       vocab_size=VOCAB, num_classes=CLASSES, max_len=L,
                       rngs=nnx.Rngs(params=seed, dropout=seed + 1), remat=remat)


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(1, VOCAB, (B, L)), jnp.int32)
    mask = jnp.arange(L)[None, :] < jnp.asarray([[L], [5], [1]])  # padded rows
    return tokens, mask


def _stacked(unrolled_pure: dict) -> dict:
    """An unrolled model's pure state dict in the scanned layout: encoder/blocks/i/<path>
    for every i becomes encoder/scanned_blocks/<path> with layer i at index i of axis 0."""
    encoder = dict(unrolled_pure["encoder"])
    blocks = encoder.pop("blocks")
    layers = [blocks[i] for i in sorted(blocks)]
    encoder["scanned_blocks"] = jax.tree.map(lambda *values: jnp.stack(values), *layers)
    return {**unrolled_pure, "encoder": encoder}


def _load_unrolled_into(scanned, unrolled) -> None:
    state = nnx.state(scanned)
    nnx.replace_by_pure_dict(state, _stacked(nnx.to_pure_dict(nnx.state(unrolled))))
    nnx.update(scanned, state)


def _assert_trees_close(actual, expected):
    flat_actual = dict(jax.tree.leaves_with_path(actual))
    flat_expected = dict(jax.tree.leaves_with_path(expected))
    assert flat_actual.keys() == flat_expected.keys()
    for path, value in flat_expected.items():
        # To 1e-5 of each array's largest value; gradients that are 0 up to rounding (the
        # key bias: softmax ignores it) to 1e-6.
        scale = float(np.abs(np.asarray(value, np.float32)).max(initial=0.0))
        np.testing.assert_allclose(flat_actual[path], value, rtol=1e-5,
                                   atol=max(1e-5 * scale, 1e-6),
                                   err_msg=jax.tree_util.keystr(path))


def _loss(model, tokens, mask):
    return model(tokens, mask, deterministic=False).sum()


@nnx.jit
def _logits(model, tokens, mask):
    return model(tokens, mask)


_gradient = nnx.jit(nnx.grad(_loss))  # compiled (measured: 36 s for both cases, 47 s op by op)


@pytest.mark.parametrize("attention, norm, remat", [  # outputs alone: test_mixers_scan
    ("softmax", "batch", True), ("s5", "batch", False)])
def test_scanned_layers_give_the_unrolled_outputs_gradients_and_statistics(attention, norm,
                                                                          remat):
    unrolled = _model(attention, norm=norm, remat=remat)
    scanned = _model(attention, seed=1, norm=norm, remat=remat, scan_layers=True)
    assert scanned.encoder.blocks is None and len(unrolled.encoder.blocks) == LAYERS
    _load_unrolled_into(scanned, unrolled)
    tokens, mask = _batch()

    np.testing.assert_allclose(_logits(scanned, tokens, mask), _logits(unrolled, tokens, mask),
                               rtol=1e-5, atol=1e-6)
    # Training mode (BatchNorm uses and updates batch statistics): gradients and the
    # updated state match too.
    gradient = lambda model: _gradient(model, tokens, mask)
    expected = nnx.to_pure_dict(gradient(unrolled))
    _assert_trees_close(nnx.to_pure_dict(gradient(scanned)), _stacked(expected))
    if norm == "batch":
        _assert_trees_close(nnx.to_pure_dict(nnx.state(scanned, nnx.BatchStat)),
                            _stacked(nnx.to_pure_dict(nnx.state(unrolled, nnx.BatchStat))))
        # The statistics moved, so the check above compared something.
        assert not np.allclose(scanned.encoder.scanned_blocks.mlp_norm.mean[...], 0)


# One mixer per kind of state a scanned stack must carry: parameters only, non-trainable
# random features (performer), fixed random logits (synthesizer), hashing rngs (reformer),
# sorting (sinkhorn), length projections (linformer), gated and delta-rule cores, and every
# sequence model (SsmParams, BatchNorm-free blocks, the Mamba2 block's convolution).
SCANNED_MIXERS = ("softmax", "local", "performer", "synthesizer", "reformer", "sinkhorn",
                  "linformer", "gla", "deltanet", *mixers.SEQUENCE_NAMES)


@pytest.mark.parametrize("attention", SCANNED_MIXERS)
def test_mixers_scan(attention):
    tokens, mask = _batch(1)
    options = {"block_mlp": mixers.default_block_mlp(attention), "num_layers": 2}
    unrolled = _model(attention, **options)
    scanned = _model(attention, seed=1, scan_layers=True, **options)
    _load_unrolled_into(scanned, unrolled)
    np.testing.assert_allclose(_logits(scanned, tokens, mask), _logits(unrolled, tokens, mask),
                               rtol=1e-5, atol=1e-6, err_msg=attention)


def test_scanned_dropout_is_one_stream_per_layer_and_remat_recomputes_the_same_masks():
    plain = _model(dropout=0.2, attention_dropout=0.2, scan_layers=True)
    remat = _model(dropout=0.2, attention_dropout=0.2, scan_layers=True, remat=True)
    nnx.update(remat, nnx.state(plain))
    keys = jax.random.key_data(plain.encoder.scanned_blocks.mlp.dropout.rngs.key[...])
    assert keys.shape[0] == LAYERS and len({tuple(k) for k in np.asarray(keys)}) == LAYERS
    tokens, mask = _batch(2)
    # From the same rng state, remat recomputes the masks of the forward pass.
    _assert_trees_close(nnx.to_pure_dict(nnx.grad(_loss)(remat, tokens, mask)),
                        nnx.to_pure_dict(nnx.grad(_loss)(plain, tokens, mask)))
    assert not np.allclose(plain(tokens, mask, deterministic=False), plain(tokens, mask))


def test_fsdp_rule_never_splits_the_layer_axis():
    assert sharding.fsdp_spec((4, 64, 32), 2, stacked=True) == PartitionSpec(None, "fsdp", None)
    assert sharding.fsdp_spec((64, 16, 16), 2) == PartitionSpec("fsdp", None, None)
    # 16 x 16 per layer is under FSDP_MIN_ELEMENTS: replicated, whatever the depth.
    assert sharding.fsdp_spec((64, 16, 16), 2, stacked=True) == PartitionSpec(None)


TASK = tasks.get("listops")


def _train_losses(num_devices: int, **overrides):
    config = listops_config.get_config("runlocal")
    config.update(max_length=32, batch_size=8, num_train_steps=10, warmup_steps=1,
                  learning_rate=3e-3, **{k: v for k, v in overrides.items() if "." not in k})
    for key, value in overrides.items():
        if key.startswith("model."):
            config.model[key.split(".", 1)[1]] = value
    mesh = sharding.make_mesh(num_devices, config.mesh_fsdp)
    train.validate_config(config, mesh.size)
    rng = np.random.default_rng(0)
    arrays = {"inputs": rng.integers(1, TASK.vocab_size, (24, 32)),
              "lengths": rng.integers(8, 33, 24), "targets": rng.integers(0, TASK.num_classes, 24)}
    with jax.set_mesh(mesh):
        graphdef, rng_state, state, shardings = train.create_state(config, TASK, mesh)
        step = train.make_train_step(graphdef, shardings, config)
        losses = []
        for index in range(3):
            batch = data.gather(arrays, np.arange(index * 8, index * 8 + 8), 32)
            state, metrics = step(state, rng_state, data.to_global(batch, mesh))
            losses.append(float(metrics["loss"]))
    return losses, state


def test_scanned_fsdp_run_matches_the_data_parallel_run_and_keeps_the_layer_axis_whole():
    scanned = {"model.scan_layers": True, "model.num_layers": 2, "model.emb_dim": 32,
               "model.qkv_dim": 32, "model.mlp_dim": 64, "model.dropout": 0.1, "remat": True}
    expected, _ = _train_losses(0, **scanned)
    losses, state = _train_losses(0, mesh_fsdp=2, **scanned)
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    assert losses[-1] != losses[0]
    kernel = state[0]["encoder"]["scanned_blocks"]["attention"]["query"]["kernel"][...]
    assert kernel.shape == (2, 32, 32)
    assert kernel.sharding.spec == PartitionSpec(None, "fsdp", None)
    assert {shard.data.shape for shard in kernel.addressable_shards} == {(2, 16, 32)}


def test_decoding_needs_unrolled_layers():
    model = _model("linear", scan_layers=True, causal=True, pooling="last")
    tokens, mask = _batch()
    with pytest.raises(ValueError, match=r"unrolled layers \(model.scan_layers=False\)"):
        classify_stepwise(model, tokens, mask)


def test_scan_layers_is_a_checked_config_key():
    config = listops_config.get_config("runlocal")
    assert config.model.scan_layers is False
    config.model.scan_layers = None
    with pytest.raises(ValueError, match="config.model.scan_layers must be True or False"):
        train.validate_config(config, num_devices=4)

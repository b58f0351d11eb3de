"""Every mixer's training step lowers for GPU and TPU, checked on a CPU-only machine.

For each name of the mixer registry (lra.models.mixers.NAMES), a tiny ListOps config
(1 layer, width 16, qkv 16, 2 heads, MLP 32, 32 tokens, batch 2, dropout 0, mean pooling,
the mixer's default options and block) gives the real training step,
`lra.training.train.make_train_step` (forward, backward, AdamW update, donated state), on
the abstract state of `train.create_state` (traced under `jax.eval_shape`: nothing is
initialised or run). The step is exported with `jax.export` for `PLATFORMS`, both in one
call: every primitive must have a lowering for CUDA and for TPU, and every custom call must
be one that jax.export accepts (a target with a compatibility guarantee). Lowering only: no
device, no plugin (neither jax-cuda12-plugin nor libtpu), no compilation, no execution.

Each mixer is built bidirectional, the configs' default (every mixer can be; none is
causal-only). Causal forms are not exported separately, to keep this file short: the
bidirectional forms of the recurrent families (gated.py, delta.py, rwkv7) run their causal
pass over the sequence and its reversal, so that pass is lowered too; exporting every causal
form as well would cost ~15 s more CPU (this file: ~20 s).

More cases: dropout > 0 (the dropout masks' random bits); softmax's
`implementation="cudnn"` in bfloat16 for CUDA alone, which needs the CUDA plugin and the
cuDNN library at lowering time (jax asks cuDNN for its version) and is skipped without
the plugin; softmax's `implementation="pallas"`, whose export must hold each platform's own
Pallas kernel (flash.py chooses it with jax.lax.platform_dependent). docs/clusters.md says how to run these checks.

A mixer whose step fails to lower fails its case, naming the mixer and the error.
"""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import pytest
from jax import export

from configs import listops as listops_config
from lra import tasks
from lra.models import mixers
from lra.parallel import sharding
from lra.training import train

PLATFORMS = ("cuda", "tpu")
B, L = 2, 32
# Custom calls that jax.export refuses by default (no compatibility guarantee), allowed in
# the cases that use them: cuDNN's fused attention, and a Pallas GPU (Triton) kernel.
CUDNN_TARGETS = ("__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward",
                 "__cudnn$fmhaScaleBiasSoftmax", "__cudnn$fmhaScaleBiasSoftmaxBackward")
TRITON_TARGET = "__gpu$xla.gpu.triton"
MOSAIC_TARGET = "tpu_custom_call"  # a Pallas TPU (Mosaic) kernel; jax.export accepts it


def tiny_config(name: str, *, dtype: str = "float32", dropout: float = 0.0,
                attention_dropout: float = 0.0, **options):
    """`configs/listops.py:runlocal,mixer=<name>` (the mixer's default options and block),
    made tiny; `options` change the mixer's options."""
    config = listops_config.get_config(f"runlocal,mixer={name}")
    config.max_length = config.prepare.max_length = L
    config.batch_size = config.eval_batch_size = B
    config.num_devices = 1
    config.dtype = dtype
    model = config.model
    model.num_layers, model.emb_dim, model.qkv_dim, model.num_heads, model.mlp_dim = (
        1, 16, 16, 2, 32)
    model.dropout, model.attention_dropout = dropout, attention_dropout
    model.pooling = "mean"  # the mixer sees exactly L tokens (no CLS position)
    model.attention_options.update(options)
    return config


def export_train_step(config, platforms=PLATFORMS, disabled_checks=()) -> export.Exported:
    """`make_train_step` of `config` on abstract state and batch, exported for `platforms`.

    The state's shapes, and the graph definition and shardings the step is built from,
    come from `train.create_state` traced under `jax.eval_shape`, on a 1-device mesh of
    this machine: its shardings are replicated, which the export records as such.
    """
    mesh = sharding.make_mesh(1)
    built = {}

    def abstract_state():
        graphdef, rng_state, state, state_shardings = train.create_state(
            config, tasks.get(config.task), mesh)
        built.update(graphdef=graphdef, shardings=state_shardings)
        return state, rng_state

    state, rng_state = jax.eval_shape(abstract_state)
    step = train.make_train_step(built["graphdef"], built["shardings"], config)
    batch = {"inputs": jax.ShapeDtypeStruct((B, L), jnp.int32),
             "mask": jax.ShapeDtypeStruct((B, L), jnp.bool_),
             "targets": jax.ShapeDtypeStruct((B,), jnp.int32)}
    return export.export(step, platforms=platforms, disabled_checks=disabled_checks)(
        state, rng_state, batch)


def check_lowers(label: str, config, platforms=PLATFORMS, disabled_checks=()) -> str:
    """Exports `config`'s training step for `platforms`; fails naming `label` if it does
    not lower. Returns the exported module's MLIR text."""
    try:
        exported = export_train_step(config, platforms, disabled_checks)
    except Exception as error:  # noqa: BLE001 (any lowering error fails, with the name)
        pytest.fail(f"the training step of {label} does not lower for {', '.join(platforms)}: "
                    f"{type(error).__name__}: {error}", pytrace=False)
    assert exported.platforms == platforms
    assert exported.nr_devices == 1
    text = exported.mlir_module()
    assert text.strip(), f"{label}: empty MLIR module"
    return text


@pytest.mark.parametrize("name", mixers.NAMES)
def test_train_step_lowers_for_gpu_and_tpu(name):
    check_lowers(f"mixer {name!r}", tiny_config(name))


def test_train_step_with_dropout_lowers_for_gpu_and_tpu():
    """Dropout masks (random bits from the step's key) lower on both platforms."""
    config = tiny_config("softmax", dropout=0.1, attention_dropout=0.1)
    train.validate_config(config, 1)
    check_lowers("mixer 'softmax' with dropout 0.1", config)


CUDA_PLUGIN = any(importlib.util.find_spec(plugin) is not None
                  for plugin in ("jax_cuda12_plugin", "jax_cuda13_plugin"))


@pytest.mark.skipif(not CUDA_PLUGIN, reason=(
    "cuDNN attention lowers only with the CUDA plugin and the cuDNN library installed "
    "(jax-cuda12-plugin and nvidia-cudnn-cu12; see docs/clusters.md)"))
def test_cudnn_softmax_lowers_for_gpu():
    """softmax with implementation='cudnn' (bfloat16, no attention dropout), CUDA only."""
    config = tiny_config("softmax", dtype="bfloat16", implementation="cudnn")
    train.validate_config(config, 1)
    text = check_lowers("mixer 'softmax' (implementation='cudnn')", config,
                        platforms=("cuda",),
                        disabled_checks=[export.DisabledSafetyCheck.custom_call(target)
                                         for target in CUDNN_TARGETS])
    assert "__cudnn$fmha" in text


KERNEL_CALLS = {"cuda": TRITON_TARGET, "tpu": MOSAIC_TARGET}  # each platform's Pallas kernel


def test_pallas_softmax_lowers_each_platforms_kernel():
    """softmax with implementation='pallas': exported for CUDA the step runs the Triton
    kernel, for TPU the Mosaic (splash) kernel, not Pallas' interpret mode. One export per
    platform: a pallas_call lowers for every platform of its module, so one module for
    both fails (JAX 0.10), platform_dependent or not."""
    config = tiny_config("softmax", implementation="pallas")
    train.validate_config(config, 1)
    for platform, kernel_call in KERNEL_CALLS.items():
        text = check_lowers("mixer 'softmax' (implementation='pallas')", config,
                            platforms=(platform,), disabled_checks=[
                                export.DisabledSafetyCheck.custom_call(TRITON_TARGET)])
        assert kernel_call in text, (
            f"softmax (implementation='pallas') exported for {platform} has no {kernel_call} "
            "custom call: its Pallas kernel ran in interpret mode")

"""Measures what `model.scan_layers` and the one-pass dual encoder buy (README figures).

  python scripts/bench_layers_and_pairs.py compile   # train-step compile time, 8/16 layers
  python scripts/bench_layers_and_pairs.py pairs     # retrieval runlocal step: 1 vs 2 calls

`compile`: ListOps runlocal with 8 and 16 blocks (width 128, MLP 512, 512 tokens, batch 8)
on one device; seconds to trace + lower and to compile the jitted train step, unrolled vs
scanned. `pairs`: the retrieval runlocal config on every local device, the median time of a
train step with both documents in one tower call of 2B rows vs the tower called once per
document (the previous code, patched in here for the comparison).
"""

from __future__ import annotations

import sys
import time

import jax
import numpy as np

from configs import listops as listops_config
from configs import retrieval as retrieval_config
from lra import tasks
from lra.parallel import sharding
from lra.training import data, train
from lra.models import encoder


def _step_and_inputs(config, task):
    """(jitted train step, state, rng_state, a random batch) on the config's mesh."""
    mesh = sharding.make_mesh(config.num_devices, config.mesh_fsdp, config.get("mesh_seq", 1))
    rng = np.random.default_rng(0)
    rows, length = config.batch_size, config.max_length
    arrays = {"inputs": rng.integers(1, task.vocab_size, (rows, length)),
              "lengths": rng.integers(length // 2, length + 1, rows),
              "targets": rng.integers(0, task.num_classes, rows)}
    if task.paired:
        arrays.update(inputs2=rng.integers(1, task.vocab_size, (rows, length)),
                      lengths2=rng.integers(length // 2, length + 1, rows))
    graphdef, rng_state, state, shardings = train.create_state(config, task, mesh)
    step = train.make_train_step(graphdef, shardings, config)
    batch = data.to_global(data.gather(arrays, np.arange(rows), length), mesh)
    return mesh, step, state, rng_state, batch


def compile_times() -> None:
    task = tasks.get("listops")
    for num_layers in (8, 16):
        for scan in (False, True):
            config = listops_config.get_config("runlocal")
            config.update(num_devices=1, max_length=512, batch_size=8)
            config.model.update(num_layers=num_layers, emb_dim=128, qkv_dim=128, mlp_dim=512,
                                scan_layers=scan)
            mesh, step, state, rng_state, batch = _step_and_inputs(config, task)
            with jax.set_mesh(mesh):
                started = time.perf_counter()
                lowered = step.lower(state, rng_state, batch)
                traced = time.perf_counter()
                lowered.compile()
                done = time.perf_counter()
            print(f"{num_layers} layers, {'scanned' if scan else 'unrolled'}: trace+lower "
                  f"{traced - started:.1f} s, compile {done - traced:.1f} s", flush=True)


def _two_calls(self, tokens_BxL, mask_BxL, tokens2_BxL, mask2_BxL, *, deterministic=True):
    u_BxE = self.encoder(tokens_BxL, mask_BxL, deterministic=deterministic)
    v_BxE = self.encoder(tokens2_BxL, mask2_BxL, deterministic=deterministic)
    return self.head(u_BxE, v_BxE)


def _median_step_seconds(repeats: int = 20) -> float:
    config = retrieval_config.get_config("runlocal")
    mesh, step, state, rng_state, batch = _step_and_inputs(config, tasks.get("retrieval"))
    with jax.set_mesh(mesh):
        compiled = step.lower(state, rng_state, batch).compile()
        for _ in range(3):
            state, metrics = compiled(state, rng_state, batch)
        jax.block_until_ready(metrics)
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            state, metrics = compiled(state, rng_state, batch)
            jax.block_until_ready(metrics)
            seconds.append(time.perf_counter() - started)
    return float(np.median(seconds))


def pair_speedup() -> None:
    one_pass = _median_step_seconds()
    one_pass_call = encoder.DualEncoderClassifier.__call__
    encoder.DualEncoderClassifier.__call__ = _two_calls
    try:
        two_calls = _median_step_seconds()
    finally:
        encoder.DualEncoderClassifier.__call__ = one_pass_call
    print(f"retrieval runlocal train step on {jax.device_count()} device(s): one pass "
          f"{one_pass * 1e3:.1f} ms, two calls {two_calls * 1e3:.1f} ms, speed-up "
          f"{two_calls / one_pass:.2f}x")


if __name__ == "__main__":
    {"compile": compile_times, "pairs": pair_speedup}[sys.argv[1]]()

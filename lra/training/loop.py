"""The training loop's metrics, kept on the devices: summed per step, read once per interval.

The loop runs `make_loop_step`: the jitted train step fused with `accumulate`, which adds
each step's metrics to replicated device scalars (`Totals`) and records the first step whose
loss or gradient norm is not finite. The host reads them only where it needs them (a log,
eval or checkpoint step, the last step, a stop), so it never waits on the devices in
between: the step of the next batch is queued while the current one runs.

`Totals` (a dict of replicated scalars):
  sums       {metric: float32}: the sums over the interval's steps of `METRICS`
  steps      int32: how many steps the sums hold
  step       int32: the number of the last step added (steps count from 1)
  bad_step   int32: the first step with a non-finite loss or gradient norm; 0 = none
  bad_loss, bad_grad_norm  float32: that step's values
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

# What the train step returns per step, in the order they are logged.
METRICS = ("loss", "accuracy", "grad_norm", "learning_rate")


@dataclasses.dataclass
class Interval:
    """Host copy of the `Totals` of one log interval."""

    steps: int
    sums: dict[str, float]
    bad_step: int = 0
    bad_loss: float = math.nan
    bad_grad_norm: float = math.nan

    def means(self) -> dict[str, float]:
        """The mean of each metric over the interval's steps."""
        return {k: self.sums[k] / self.steps for k in METRICS}

    def unlogged(self) -> dict:
        """What `Progress.unlogged` keeps of it, so a resumed run logs the same means;
        {} for an interval without steps."""
        return {"steps": self.steps, "sums": dict(self.sums)} if self.steps else {}


def start_totals(step: int, unlogged, mesh: jax.sharding.Mesh) -> dict:
    """Device `Totals` after `step`, holding a checkpoint's `Progress.unlogged`.

    `unlogged` is {"steps": n, "sums": {...}}, {} or [] (none), or the list of per-step
    metric dicts that checkpoints written before the totals moved to the devices hold.
    """
    if isinstance(unlogged, list):  # the older form: one dict per step
        unlogged = {"steps": len(unlogged),
                    "sums": {k: sum(r[k] for r in unlogged) for k in METRICS}} if unlogged else {}
    sums = unlogged.get("sums", {})
    totals = {"sums": {k: np.float32(sums.get(k, 0.0)) for k in METRICS},
              "steps": np.int32(unlogged.get("steps", 0)), "step": np.int32(step),
              "bad_step": np.int32(0), "bad_loss": np.float32(math.nan),
              "bad_grad_norm": np.float32(math.nan)}
    replicated = NamedSharding(mesh, PartitionSpec())  # every process passes the same values
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(replicated, x), totals)


def accumulate(totals: dict, metrics: dict) -> dict:
    """`totals` with one step's `metrics` (scalars) added; traced inside the loop step."""
    step = totals["step"] + 1
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    first_bad = (totals["bad_step"] == 0) & ~finite
    keep_or = lambda new, old: jnp.where(first_bad, new, old)
    return {"sums": {k: totals["sums"][k] + metrics[k].astype(jnp.float32) for k in METRICS},
            "steps": totals["steps"] + 1, "step": step,
            "bad_step": keep_or(step, totals["bad_step"]),
            "bad_loss": keep_or(metrics["loss"].astype(jnp.float32), totals["bad_loss"]),
            "bad_grad_norm": keep_or(metrics["grad_norm"].astype(jnp.float32),
                                     totals["bad_grad_norm"])}


def make_loop_step(train_step, state, rng_state, state_shardings, mesh: jax.sharding.Mesh):
    """One dispatch per step: (state leaves, rng leaves, batch, totals) -> (state leaves,
    totals), for `train_step` of `lra.training.train.make_train_step` and `state`, `rng_state` of
    `lra.training.train.create_state` (`jax.tree.leaves` of them; the state's leaves and `totals`
    are donated).

    The loop passes leaves, not the nnx States: jit flattens a State's Variables in Python
    on every call, which costs a small model's loop a fifth of its time.
    """
    state_def, rng_def = jax.tree.structure(state), jax.tree.structure(rng_state)

    def loop_step(state_leaves, rng_leaves, batch, totals):
        state, metrics = train_step(state_def.unflatten(state_leaves),
                                    rng_def.unflatten(rng_leaves), batch)
        return jax.tree.leaves(state), accumulate(totals, metrics)

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(loop_step, donate_argnums=(0, 3),
                   out_shardings=(jax.tree.leaves(state_shardings), replicated))


def read(totals: dict, checkpoints) -> Interval:
    """Waits for the device `totals` and copies them to the host.

    Raises:
      FloatingPointError: a step of the interval had a non-finite loss or gradient norm;
        the message names the first such step and the newest checkpoint of `checkpoints`
        (`lra.training.checkpoints.Checkpoints`), the last good one when the loop reads before saving.
    """
    host = jax.device_get(totals)
    interval = Interval(steps=int(host["steps"]),
                        sums={k: float(host["sums"][k]) for k in METRICS},
                        bad_step=int(host["bad_step"]), bad_loss=float(host["bad_loss"]),
                        bad_grad_norm=float(host["bad_grad_norm"]))
    if interval.bad_step:
        last = checkpoints.latest_step()
        kept = ("no checkpoint was saved yet" if last is None else
                f"the last good checkpoint, step {last}, is kept in {checkpoints.directory}")
        raise FloatingPointError(
            f"loss is {interval.bad_loss} (gradient norm {interval.bad_grad_norm}) at step "
            f"{interval.bad_step}; {kept} (lower config.learning_rate or set config.grad_clip)")
    return interval

"""Self-pretraining (SPT): fine-tuning from another run, and the two-phase protocol.

Amos, Berant and Gupta ("Never Train from Scratch", ICLR 2024) pretrain a model on the
task's own training inputs (`config.objective` causal_lm or masked_lm, lra/training/objectives.py),
then fine-tune it on the labels. Two pieces make that a config option here:

* `config.init_from=WORKDIR` starts a run from another run's encoder (embeddings, blocks,
  final norm: the `encoder` node of both the classifier and the language model), taken
  from its best (`config.init_from_checkpoint="best"`, highest validation accuracy, as
  Amos et al. fine-tune; pretraining runs keep it in `checkpoints_best/`) or last
  checkpoint, with a freshly initialised head and optimizer. Shapes must match, parameter by parameter; a mismatch fails before training
  and names the parameter. Only a fresh run is initialised so: a fine-tune that resumes
  from its own checkpoint continues it.
* `config.spt.pretrain_steps=P > 0` runs the protocol in one workdir tree:
  WORKDIR/pretrain (P steps of the pretraining objective at `config.spt.learning_rate`),
  then WORKDIR/finetune (`num_train_steps` steps of classification, init_from the
  pretraining run). Each phase resumes by itself, so the same command picks the protocol
  up wherever it stopped; WORKDIR/results.json is the fine-tune's results with the
  pretraining's summary under "spt".
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_collections
from flax import nnx

from lra.tasks import storage
from lra.training.checkpoints import Checkpoints

CHECKPOINT_FOLDERS = {"best": "checkpoints_best", "last": "checkpoints"}
PHASES = ("pretrain", "finetune")
START_FILE = "init_from.json"  # in a run started from another: where its encoder came from


# ---------------------------------------------------------------------------------------
# Which run a config starts from


def source_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """The config.json of the run in `workdir` (the source of `init_from`)."""
    path = Path(workdir).expanduser() / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"config.init_from={str(workdir)!r} holds no run ({path} "
                                "is missing); give the workdir of a pretraining run")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def uses_mask_token(config: ml_collections.ConfigDict) -> bool:
    """True when the embedding needs the mask token's row: a masked_lm run, or a run that
    starts from one (directly or through its own `init_from`), so the shapes match."""
    if config.get("objective", "classify") == "masked_lm":
        return True
    source = config.get("init_from", "")
    return bool(source) and uses_mask_token(source_config(source))


def load_encoder(state, config: ml_collections.ConfigDict, build_abstract_state,
                 ) -> tuple[nnx.State, dict]:
    """`state` (model, optimizer) with the model's encoder replaced by `init_from`'s.

    Args:
      state: this run's freshly initialised state (nnx.State of (model, optimizer)).
      config: this run's config (`init_from`, `init_from_checkpoint`).
      build_abstract_state: source config -> (abstract state, its shardings), the state
        the source run checkpointed.

    Returns:
      (new state, a record for results.json: source workdir, checkpoint, step, config hash).

    Raises:
      FileNotFoundError: no run or no such checkpoint in `init_from`.
      ValueError: an encoder parameter's shape differs (named) or is missing.
    """
    source = Path(config.init_from).expanduser().absolute()
    source_cfg = source_config(source)
    which = config.get("init_from_checkpoint", "best")
    abstract, shardings = build_abstract_state(source_cfg)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    checkpoints = Checkpoints(source / CHECKPOINT_FOLDERS[which], keep=1)
    try:
        restored = checkpoints.restore_latest(target)
    finally:
        checkpoints.close()
    if restored is None:
        hint = ("only pretraining runs keep one; set config.init_from_checkpoint=last"
                if which == "best" else "has it trained?")
        raise FileNotFoundError(f"config.init_from={str(source)!r} has no {which} checkpoint "
                                f"(in {source / CHECKPOINT_FOLDERS[which]}); {hint}")
    source_state, _, progress = restored
    encoder = _matching_encoder(source_state[0]["encoder"], state[0]["encoder"], source)
    state[0]["encoder"] = encoder
    record = {"workdir": str(source), "checkpoint": which, "step": progress.step,
              "config_hash": _config_hash(source)}
    return state, record


def start_from(state, config: ml_collections.ConfigDict, workdir: Path, build_abstract_state):
    """`load_encoder`, with its record kept in WORKDIR/init_from.json for results.json."""
    state, record = load_encoder(state, config, build_abstract_state)
    if jax.process_index() == 0:
        storage.replace_atomically(workdir / START_FILE,
                                   lambda file: file.write(json.dumps(record).encode()))
    return state


def start_record(workdir: Path) -> dict | None:
    """Where a run's encoder came from (`start_from`'s record), None for a fresh start."""
    path = workdir / START_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _matching_encoder(source: nnx.State, target: nnx.State, where: Path) -> nnx.State:
    """The source encoder's arrays, laid out (sharded) as the target's; shapes must match."""
    source_flat = dict(nnx.to_flat_state(source))
    new = []
    for path, target_value in nnx.to_flat_state(target):
        name = ".".join(str(key) for key in path)
        if path not in source_flat:
            raise ValueError(f"config.init_from={str(where)!r}: its encoder has no parameter "
                             f"{name} (the model configs differ)")
        value = source_flat[path].get_value()
        expected = target_value.get_value()
        if value.shape != expected.shape:
            raise ValueError(f"config.init_from={str(where)!r}: encoder parameter {name} has "
                             f"shape {tuple(value.shape)} there but {tuple(expected.shape)} here")
        new.append((path, target_value.replace(jax.device_put(value, expected.sharding))))
    return nnx.from_flat_state(new)


def _config_hash(source: Path) -> str | None:
    results = source / "results.json"
    if results.exists():
        return json.loads(results.read_text()).get("config_hash")
    return None


# ---------------------------------------------------------------------------------------
# The protocol: pretrain, then fine-tune


def spt_enabled(config: ml_collections.ConfigDict) -> bool:
    return config.get("spt", {}).get("pretrain_steps", 0) > 0


def pretrain_objective(config: ml_collections.ConfigDict) -> str:
    """causal_lm for a causal encoder, masked_lm for a bidirectional one (Amos et al. §2),
    unless `config.spt.objective` names one."""
    chosen = config.spt.get("objective", "")
    return chosen or ("causal_lm" if config.model.causal else "masked_lm")


def phase_configs(config: ml_collections.ConfigDict, workdir: Path
                  ) -> list[tuple[Path, ml_collections.ConfigDict]]:
    """[(WORKDIR/pretrain, its config), (WORKDIR/finetune, its config)].

    Pretraining: `spt.pretrain_steps` steps of the pretraining objective at
    `spt.learning_rate` (warmup `spt.warmup_steps`), everything else as `config`. Fine-
    tuning: `config` itself with the protocol off and `init_from` the pretraining run.
    """
    spt = config.spt
    pretrain = _unlocked_copy(config)
    pretrain.objective = pretrain_objective(config)
    pretrain.num_train_steps = spt.pretrain_steps
    pretrain.learning_rate = spt.learning_rate
    pretrain.warmup_steps = spt.warmup_steps
    pretrain.init_from = ""
    pretrain.spt.pretrain_steps = 0
    finetune = _unlocked_copy(config)
    finetune.objective = "classify"
    finetune.init_from = str(workdir / PHASES[0])
    finetune.spt.pretrain_steps = 0
    return [(workdir / PHASES[0], pretrain), (workdir / PHASES[1], finetune)]


def _unlocked_copy(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(config.to_dict())


def protocol_results(pretrain: dict, finetune: dict) -> dict:
    """The fine-tune's results, with the pretraining phase's summary under "spt"."""
    summary = {key: pretrain[key] for key in (
        "objective", "step", "best_val_accuracy", "best_step", "val_accuracy",
        "train_seconds", "compile_seconds", "config_hash") if key in pretrain}
    both = lambda key: finetune.get(key, 0.0) + pretrain.get(key, 0.0)
    return {**finetune, "spt": summary, "train_seconds": both("train_seconds"),
            "compile_seconds": both("compile_seconds")}


def run_protocol(config: ml_collections.ConfigDict, workdir: Path, train_fn, *, check,
                 write_results, config_hash: str) -> dict | None:
    """Pretrains in WORKDIR/pretrain, then fine-tunes in WORKDIR/finetune.

    Args:
      config: the protocol's config (`spt.pretrain_steps` > 0).
      workdir: the protocol's folder (its config.json is already written).
      train_fn: `lra.training.train.train_and_evaluate`, run once per phase (each resumes itself).
      check: config -> None, raising for a bad phase config (both are checked first).
      write_results: (workdir, results) -> None.
      config_hash: the protocol config's hash, the results' `config_hash` (the fine-tune's
        own hash holds the pretraining run's folder).

    Returns:
      The fine-tune's results with the pretraining's summary under "spt" (also in
      WORKDIR/results.json), or None when a signal stopped a phase.
    """
    phases = phase_configs(config, workdir)
    for _, phase_config in phases:
        check(phase_config)
    results = []
    for phase_workdir, phase_config in phases:
        result = train_fn(phase_config, phase_workdir)
        if result is None:
            return None
        results.append(result)
    combined = {**protocol_results(*results), "config_hash": config_hash}
    write_results(workdir, combined)
    return combined

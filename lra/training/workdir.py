"""The run folder's files: config.json (checked on resume), results.json, versions.

A run folder holds one config: relaunching on it resumes only if the config is the same up
to `RESUMABLE_CHANGES` (settings that cannot change the results). Keys added to the
configs after a run was started (`ADDED_DEFAULTS`) count as unchanged while they keep
their default, so runs started by an earlier version of lra resume, and their
`config_hash` (what sweeps compare to skip finished runs) stays the same.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import sys
from pathlib import Path

import ml_collections

import lra
from lra.parallel import distributed
from lra.tasks import storage

RESULTS_FILE = "results.json"
CONFIG_FILE = "config.json"
# Keys that may change between a run and its resumption without changing its results
# (`mixer` is `attention` under a second name, compared as `attention`; runs from before
# the alias existed have no `mixer` key and still resume).
RESUMABLE_CHANGES = ("num_devices", "log_every", "keep_checkpoints", "checkpoint_every",
                     "data_dir", "eval_batch_size", "mesh_fsdp", "mesh_seq", "kv_strategy",
                     "seq_layout",
                     "grad_accum_steps",
                     "remat",
                     "mixer", "compilation_cache_dir", "data_threads", "data_workers",
                     "shared_filesystem", "prepare_wait_seconds")
# Keys added after runs could have been started, with the default that means "as before".
ADDED_DEFAULTS = {
    "objective": "classify", "mask_rate": 0.15, "init_from": "", "init_from_checkpoint": "best",
    "spt": {"pretrain_steps": 0, "objective": "", "learning_rate": 1e-3, "warmup_steps": 100},
    "model.scan_layers": False,
    "mesh_seq": 1,  # the mesh's seq axis (sequence parallelism); 1 = none, as before
    "kv_strategy": "ring",  # exact attention over the seq axis (only used when mesh_seq > 1)
    "seq_layout": "contiguous",  # token order over the seq axis (only used when mesh_seq > 1)
    # model.attention_options of the gated and delta-rule families ("auto" = the per-chunk
    # scan on CPU, as before) and of the Mamba2 block (Mamba2's defaults: as before)
    "model.attention_options.chunk_strategy": "auto",
    "model.attention_options.ngroups": 1,
    "model.attention_options.learnable_init_states": False,
    "model.attention_options.dt_limit": [0.0, float("inf")],
}


def config_dict(config: ml_collections.ConfigDict) -> dict:
    """The config as plain JSON data (what config.json holds)."""
    return json.loads(config.to_json_best_effort(sort_keys=True))


def canonical(values: dict) -> dict:
    """A config dict without the `ADDED_DEFAULTS` keys that hold their default (so configs
    written before and after such a key existed compare equal)."""
    values = json.loads(json.dumps(values))  # a deep copy
    for path, default in ADDED_DEFAULTS.items():
        *parents, name = path.split(".")
        node = values
        for parent in parents:
            node = node.get(parent, {})
        if name in node and node[name] == default:
            del node[name]
    return values


def config_hash(config: ml_collections.ConfigDict) -> str:
    """A short hash of everything that can change a run's results."""
    relevant = {k: v for k, v in canonical(config_dict(config)).items()
                if k not in RESUMABLE_CHANGES}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def check_and_write_config(workdir: Path, config: ml_collections.ConfigDict) -> None:
    """Writes config.json, refusing a folder that holds a run of another config.

    Raises:
      ValueError: the folder's config differs beyond `RESUMABLE_CHANGES`; names the keys.
    """
    path = workdir / CONFIG_FILE
    new = config_dict(config)
    if path.exists():
        old, current = canonical(json.loads(path.read_text())), canonical(new)
        changed = sorted(k for k in set(old) | set(current)
                         if old.get(k) != current.get(k) and k not in RESUMABLE_CHANGES)
        if changed:
            raise ValueError(
                f"{workdir} holds a run with a different config (changed: {', '.join(changed)}); "
                "use another --workdir to start a new run"
            )
    if distributed.is_primary():
        write_atomically(path, json.dumps(new, indent=2, sort_keys=True) + "\n")


def write_results(workdir: Path, results: dict) -> None:
    """results.json, written by process 0."""
    if distributed.is_primary():
        write_atomically(workdir / RESULTS_FILE, json.dumps(results, indent=2) + "\n")


def write_atomically(path: Path, text: str) -> None:
    storage.replace_atomically(path, lambda file: file.write(text.encode()))


def versions() -> dict[str, str]:
    """Python's, lra's and the main libraries' versions (results.json `versions`)."""
    names = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy")
    found = {"python": sys.version.split()[0], "lra": lra.__version__}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def read_finished_results(workdir: str | Path, config) -> dict | None:
    """The folder's results if its run finished (all `num_train_steps`), else None."""
    path = Path(workdir) / RESULTS_FILE
    if not path.exists():
        return None
    results = json.loads(path.read_text())
    return results if results.get("step") == config.num_train_steps else None

"""S5's released LRA settings: what `preset=s5` sets, each value with its source.

Transcribed by hand from lindermanlab/S5 (Smith, Warrington & Linderman, "Simplified
State Space Layers for Sequence Modeling", ICLR 2023; commit 3c18fdb):
``bin/run_experiments/run_lra_<task>.sh`` give each task's flags, ``run_train.py`` the
defaults of the flags a script leaves out, ``s5/train.py`` how they combine (global
learning rate = lr_factor * ssm_lr_base; steps per epoch = train size // batch; linear
warmup for ``warmup_end`` epochs, then cosine annealing to ``lr_min`` = 0). Train sizes
are those of the S4/S5 LRA data loaders (``s5/dataloaders/lra.py``): ListOps 96,000, IMDB
25,000, AAN 147,086, CIFAR 45,000 (10% of 50,000 held out), Pathfinder and Path-X 160,000
(80% of 200,000).

What S5 ran that these settings do not reproduce (`NOT_REPRODUCED`, also in the
config's comments):
  * which parameters share the SSM learning rate: S5's "ssm" group also holds the norm
    layers' scale and bias, and ``opt_config`` / ``dt_global`` move B or the timesteps
    to the weight-decayed global group for some tasks; lra's SSM group is Lambda, B and
    the timesteps of every layer (S5's ``opt_config=standard`` without ``dt_global``);
  * inputs: S5 feeds pixels (CIFAR, Pathfinder) as real values through a Dense encoder;
    lra embeds 256 pixel tokens, as LRA's Transformers do;
  * sequence lengths: S5's loaders pad ListOps to 2,048 and IMDB to 4,096; lra keeps
    its tasks' 2,000 and 4,000;
  * dropout: S5 drops whole feature channels (``broadcast_dims=[0]``); lra drops units.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lra.common import set_path
from lra.presets import long_range_arena

SOURCE = "lindermanlab/S5 bin/run_experiments/run_lra_{}.sh"
DEFAULTS_SOURCE = "lindermanlab/S5 run_train.py (flag default)"

# Our task -> (S5's script suffix, train size of S5's loader).
TASKS = {
    "listops": ("listops", 96_000),
    "text": ("imdb", 25_000),
    "retrieval": ("aan", 147_086),
    "image": ("cifar", 45_000),
    "pathfinder": ("pathfinder", 160_000),
    "pathx": ("pathx", 160_000),
}

# S5's flags per task (run_lra_<task>.sh); flags absent here take DEFAULTS.
FLAGS: dict[str, dict[str, Any]] = {
    "listops": dict(C_init="lecun_normal", activation_fn="half_glu2", batchnorm=True,
                    bidirectional=True, blocks=8, bsz=50, d_model=128, epochs=40, lr_factor=3,
                    n_layers=8, opt_config="BfastandCdecay", p_dropout=0.0, ssm_lr_base=0.001,
                    ssm_size_base=16, warmup_end=1, weight_decay=0.04),
    "text": dict(C_init="lecun_normal", activation_fn="half_glu2", batchnorm=True,
                 bidirectional=True, blocks=12, bsz=50, d_model=256, dt_global=True, epochs=35,
                 lr_factor=4, n_layers=6, opt_config="standard", p_dropout=0.1,
                 ssm_lr_base=0.001, ssm_size_base=192, warmup_end=0, weight_decay=0.07),
    "retrieval": dict(C_init="trunc_standard_normal", batchnorm=True, bidirectional=True,
                      blocks=16, bsz=32, d_model=128, dt_global=True, epochs=20, lr_factor=2,
                      n_layers=6, opt_config="standard", p_dropout=0.0, ssm_lr_base=0.001,
                      ssm_size_base=256, warmup_end=1, weight_decay=0.05),
    "image": dict(C_init="lecun_normal", batchnorm=True, bidirectional=True, blocks=3, bsz=50,
                  clip_eigs=True, d_model=512, epochs=250, lr_factor=4.5, n_layers=6,
                  opt_config="BfastandCdecay", p_dropout=0.1, ssm_lr_base=0.001,
                  ssm_size_base=384, warmup_end=1, weight_decay=0.07),
    "pathfinder": dict(C_init="trunc_standard_normal", batchnorm=True, bidirectional=True,
                       blocks=8, bn_momentum=0.9, bsz=64, d_model=192, epochs=200, lr_factor=5,
                       n_layers=6, opt_config="standard", p_dropout=0.05, ssm_lr_base=0.0009,
                       ssm_size_base=256, warmup_end=1, weight_decay=0.03),
    "pathx": dict(C_init="complex_normal", batchnorm=True, bidirectional=True, blocks=16,
                  bn_momentum=0.9, bsz=32, d_model=128, dt_min=0.0001, epochs=75, lr_factor=3,
                  n_layers=6, opt_config="BandCdecay", p_dropout=0.0, ssm_lr_base=0.0006,
                  ssm_size_base=256, warmup_end=1, weight_decay=0.06),
}
# run_train.py's defaults of the flags the scripts leave out (and that matter here).
DEFAULTS: dict[str, Any] = dict(activation_fn="half_glu1", bn_momentum=0.95, clip_eigs=False,
                                conj_sym=True, dt_global=False, dt_max=0.1, dt_min=0.001,
                                discretization="zoh", mode="pool", prenorm=True)
# Adam's moments: s5/train_helpers.py builds optax.adam / optax.adamw with optax's defaults.
ADAM = {"adam_b1": 0.9, "adam_b2": 0.999, "adam_eps": 1e-8}

NOT_REPRODUCED = (
    "SSM learning-rate group: S5's holds the norm layers too, and opt_config / dt_global "
    "move B or the timesteps to the global group for some tasks (lra: Lambda, B, timesteps)",
    "pixel inputs: S5 encodes CIFAR/Pathfinder pixels as real values with a Dense layer; "
    "lra embeds 256 pixel tokens",
    "lengths: S5 pads ListOps to 2048 and IMDB to 4096 tokens; lra keeps 2000 and 4000",
    "dropout: S5 drops whole feature channels (broadcast over the sequence); lra drops units",
)


def flag(task: str, name: str) -> tuple[Any, str]:
    """(value, source) of S5's flag `name` for `task`."""
    script = SOURCE.format(TASKS[task][0])
    if name in FLAGS[task]:
        return FLAGS[task][name], script
    return DEFAULTS[name], DEFAULTS_SOURCE


def settings(task: str) -> dict[str, tuple[Any, str]]:
    """Config path -> (value, source) of S5's released run of `task`."""
    if task not in FLAGS:
        raise ValueError(f"preset=s5 has no settings for task {task!r}; known: "
                         f"{', '.join(FLAGS)}")
    get = lambda name: flag(task, name)[0]
    script = SOURCE.format(TASKS[task][0])
    steps_per_epoch = TASKS[task][1] // get("bsz")
    option = "model.attention_options."
    out = {
        "attention": ("s5", script),
        "batch_size": (get("bsz"), script + ": --bsz"),
        "num_train_steps": (get("epochs") * steps_per_epoch,
                            f"{script}: --epochs x ({TASKS[task][1]:,} // --bsz) steps"),
        "warmup_steps": (get("warmup_end") * steps_per_epoch,
                         f"{script}: --warmup_end epochs of linear warmup"),
        "schedule": ("cosine", DEFAULTS_SOURCE + ": --cosine_anneal=True, --lr_min=0"),
        "learning_rate": (get("lr_factor") * get("ssm_lr_base"),
                          "s5/train.py: lr = lr_factor * ssm_lr_base"),
        "ssm_learning_rate": (get("ssm_lr_base"), script + ": --ssm_lr_base"),
        "weight_decay": (get("weight_decay"), script + ": --weight_decay"),
        "grad_clip": (0.0, "s5/train_helpers.py: no clipping"),
        "model.num_layers": (get("n_layers"), script + ": --n_layers"),
        "model.emb_dim": (get("d_model"), script + ": --d_model"),
        "model.block_mlp": (False, "s5/layers.py: SequenceLayer has no MLP"),
        "model.norm": ("batch" if get("batchnorm") else "layer", script + ": --batchnorm"),
        "model.norm_momentum": flag(task, "bn_momentum"),
        "model.dropout": (get("p_dropout"), script + ": --p_dropout"),
        "model.attention_dropout": (0.0, "S5 has no attention"),
        "model.pooling": ("mean", DEFAULTS_SOURCE + ": --mode=pool"),
        "model.positions": ("none", "s5/seq_model.py: no position encoding"),
        option + "state_size": (get("ssm_size_base"), script + ": --ssm_size_base"),
        option + "blocks": (get("blocks"), script + ": --blocks"),
        option + "bidirectional": (get("bidirectional"), script + ": --bidirectional"),
        option + "c_init": (get("C_init"), script + ": --C_init"),
        option + "activation": flag(task, "activation_fn"),
        option + "clip_eigs": flag(task, "clip_eigs"),
        option + "conj_sym": flag(task, "conj_sym"),
        option + "dt_min": flag(task, "dt_min"),
        option + "dt_max": flag(task, "dt_max"),
        option + "discretization": flag(task, "discretization"),
    }
    out.update({key: (value, "s5/train_helpers.py: optax.adam(w) defaults")
                for key, value in ADAM.items()})
    return out


def differences(config: Mapping) -> list[str] | None:
    """The keys in which a resolved config (a run's config.json) differs from S5's release.

    Args:
      config: nested dict with `task`, `attention` and the keys of `settings`.

    Returns:
      None unless the config is an s5 run of a task S5 released a script for; else the
      config paths whose values differ from `settings(task)`, in its order ([]: the run used
      S5's released settings, so S5's published row is comparable, up to `NOT_REPRODUCED`).
    """
    task = config.get("task")
    if config.get("attention") != "s5" or task not in FLAGS:
        return None
    return long_range_arena.differing_paths(
        config, {path: value for path, (value, _) in settings(task).items()})


def apply(config) -> None:
    """Sets S5's released settings on a config built by configs/<task>.py."""
    for path, (value, _) in settings(config.task).items():
        set_path(config, path, value)

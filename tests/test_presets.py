"""preset=lra runs the settings of LRA's released config for each task and attention.

The expected values come from tests/fixtures/lra_released_configs.json, transcribed by
hand from the released files of google-research/long-range-arena (each entry names its
file and key), not from lra/presets/long_range_arena.py.
"""

import functools
import json
import math
from pathlib import Path

import pytest

from configs import image, listops, pathfinder, retrieval, text
from lra.experiments import report, sweep
from lra.presets import long_range_arena, s5 as s5_preset
from lra.training import train
from lra.models import attention, mixers

FIXTURE = Path(__file__).parent / "fixtures" / "lra_released_configs.json"
CONFIGS = {"listops": listops, "text": text, "retrieval": retrieval, "image": image,
           "pathfinder": pathfinder}
# Attentions with a published LRA Table 1 row; memory_efficient is reported against the
# Transformer row, so it runs the Transformer's released settings.
PUBLISHED = sorted(report.PUBLISHED_ROW)
SAME_ROW = {"memory_efficient": "softmax"}
PAIRS = [(task, name) for task in CONFIGS for name in PUBLISHED]


@functools.cache
def _entries():
    return json.loads(FIXTURE.read_text())["entries"]


def _applies(entry, task, name):
    return entry["task"] in ("*", task) and entry["attention"] in ("*", SAME_ROW.get(name, name))


def _expected(task, name):
    """Config path -> fixture entry; an attention's entry replaces the "*" one."""
    chosen = {}
    for entry in sorted(_entries(), key=lambda e: e["attention"] != "*"):
        if entry["ours"] and _applies(entry, task, name):
            chosen[entry["ours"]] = entry
    return chosen


def _get(config, path):
    node = config
    for part in path.split("."):
        node = node[part]
    return node


def _num_buckets(config):
    """Reformer's buckets: the attention length (+1 for CLS) padded to 2 * bucket_size."""
    size = config.model.attention_options.bucket_size
    length = config.max_length + (config.model.pooling == "cls")
    return 2 * math.ceil(length / (2 * size))


@pytest.mark.parametrize("task, name", PAIRS)
def test_preset_runs_the_released_settings(task, name):
    config = CONFIGS[task].get_config(f"preset=lra,attention={name}")
    expected = _expected(task, name)
    for path, entry in expected.items():
        where = f"{task}/{name} {path} ({entry['file']}: {entry['key']})"
        if entry.get("not_transcribed"):
            assert path not in long_range_arena.settings(task, name, max_length=config.max_length)
        elif isinstance(entry["value"], dict):
            assert _num_buckets(config) == entry["value"]["num_buckets"], where
        else:
            actual = json.loads(json.dumps(_get(config, path)))
            assert actual == entry["value"], where
    # Options the fixture does not name keep the family default (the paper's method).
    defaults = attention.default_options(name)
    for option, value in config.model.attention_options.items():
        if f"model.attention_options.{option}" not in expected:
            assert value == defaults[option], f"{task}/{name} {option}"
    train.validate_config(config, num_devices=1)  # the constructors accept the options
    assert long_range_arena.differences(json.loads(config.to_json_best_effort())) == [
        f"{e['released_only']} (released only)" for e in _entries()
        if e.get("released_only") and _applies(e, task, name)]


@pytest.mark.parametrize("task, name", PAIRS)
def test_settings_name_the_released_file(task, name):
    config = CONFIGS[task].get_config(f"preset=lra,attention={name}")
    found = long_range_arena.settings(task, name, max_length=config.max_length)
    for path, entry in _expected(task, name).items():
        if entry.get("not_transcribed") or (entry["attention"] == "*"
                                            and entry["file"].startswith("models/")):
            continue  # encoder defaults: the table names the attention's own encoder
        assert found[path].source.startswith(f"lra_benchmarks/{entry['file']}: "), path
    assert set(found) == set(_expected(task, name)) - {
        p for p, e in _expected(task, name).items() if e.get("not_transcribed")}
    only = {e["released_only"] for e in _entries() if e.get("released_only")
            and _applies(e, task, name)}
    assert set(long_range_arena.released_only(task, name)) == only


def test_attentions_without_a_published_row_keep_their_defaults():
    for name in sorted(set(mixers.NAMES) - set(PUBLISHED)):  # ssd, the sequence models, ...
        config = text.get_config(f"attention={name}")
        assert config.model.attention_options.to_dict() == mixers.default_options(name)
        assert long_range_arena.differences(json.loads(config.to_json_best_effort())) is None
    config = listops.get_config("attention=performer")
    config.task = "pathx"  # no released per-attention config for Path-X
    assert long_range_arena.differences(json.loads(config.to_json_best_effort())) is None


def test_runlocal_keeps_the_family_defaults():
    config = pathfinder.get_config("runlocal,attention=performer")
    assert config.model.num_layers == 1 and config.model.num_heads == 2  # runlocal's model
    assert config.model.attention_options.to_dict() == attention.default_options("performer")
    differ = long_range_arena.differences(json.loads(config.to_json_best_effort()))
    assert {"model.num_layers", "model.attention_options.kernel"} <= set(differ)


def test_command_line_overrides_the_released_options():
    config = sweep.resolve_config(sweep.Run(  # as launch.py parses --config.<key> flags
        "x", "configs/listops.py:attention=performer",
        ("--config.model.attention_options.kernel=relu",
         "--config.model.attention_options.num_features=16")))
    options = config.model.attention_options
    assert (options.kernel, options.num_features) == ("relu", 16)
    differ = long_range_arena.differences(json.loads(config.to_json_best_effort()))
    assert differ == ["model.attention_options.kernel", "model.attention_options.num_features",
                      "redraw_features (released only)"]
    config = sweep.resolve_config(sweep.Run(
        "x", "configs/listops.py:attention=longformer",
        ("--config.model.attention_options.global_positions=(0,)",
         "--config.model.attention_options.global_projections=True")))
    assert config.model.attention_options.global_positions == (0,)
    assert long_range_arena.differences(json.loads(config.to_json_best_effort())) == [
        "model.attention_options.global_positions"]


# --- preset=s5: S5's released settings ----------------------------------------------------

# Transcribed here by hand from lindermanlab/S5 (commit 3c18fdb), independently of
# lra/presets/s5.py: the flags of bin/run_experiments/run_lra_{listops,pathx}.sh, with
# steps = epochs x (train size // bsz) and learning_rate = lr_factor x ssm_lr_base.
S5_EXPECTED = {
    "listops": {  # run_lra_listops.sh; ListOps train size 96,000
        "model.num_layers": 8, "model.emb_dim": 128, "batch_size": 50,
        "num_train_steps": 40 * (96_000 // 50), "warmup_steps": 1 * (96_000 // 50),
        "learning_rate": 3 * 0.001, "ssm_learning_rate": 0.001, "weight_decay": 0.04,
        "model.dropout": 0.0, "model.norm": "batch", "model.norm_momentum": 0.95,
        "model.attention_options.state_size": 16, "model.attention_options.blocks": 8,
        "model.attention_options.activation": "half_glu2",
        "model.attention_options.c_init": "lecun_normal",
        "model.attention_options.bidirectional": True,
    },
    "pathx": {  # run_lra_pathx.sh; Path-X train size 160,000
        "model.num_layers": 6, "model.emb_dim": 128, "batch_size": 32,
        "num_train_steps": 75 * (160_000 // 32), "warmup_steps": 1 * (160_000 // 32),
        "learning_rate": 3 * 0.0006, "ssm_learning_rate": 0.0006, "weight_decay": 0.06,
        "model.norm_momentum": 0.9, "model.attention_options.dt_min": 0.0001,
        "model.attention_options.state_size": 256, "model.attention_options.blocks": 16,
        "model.attention_options.c_init": "complex_normal",
        "model.attention_options.activation": "half_glu1",  # run_train.py's default
    },
}


@pytest.mark.parametrize("task", sorted(S5_EXPECTED))
def test_s5_preset_runs_the_released_flags(task):
    from configs import pathx

    module = {**CONFIGS, "pathx": pathx}[task]
    config = module.get_config("preset=s5")
    assert config.attention == config.mixer == "s5"
    assert not config.model.block_mlp and config.model.pooling == "mean"
    for path, expected in S5_EXPECTED[task].items():
        value = functools.reduce(lambda node, key: node[key], path.split("."), config)
        assert value == pytest.approx(expected), path
    train.validate_config(config, 2)


def test_s5_preset_is_comparable_with_s5s_published_row_and_other_runs_are_not():
    """The report's "S5's released settings?" line: [] for preset=s5 on every task, the
    differing keys otherwise, None for runs that are not S5's."""
    from configs import pathx

    for module in (*CONFIGS.values(), pathx):
        config = json.loads(module.get_config("preset=s5").to_json_best_effort())
        assert s5_preset.differences(config) == [], config["task"]
    config = json.loads(listops.get_config("preset=s5").to_json_best_effort())
    config["model"]["attention_options"]["state_size"] = 32
    config["weight_decay"] = 0.0
    assert s5_preset.differences(config) == ["weight_decay",
                                               "model.attention_options.state_size"]
    assert s5_preset.differences(json.loads(
        listops.get_config("attention=s4d").to_json_best_effort())) is None


def test_s5_preset_validates_for_every_task_and_refuses_another_mixer():
    for module in CONFIGS.values():
        train.validate_config(module.get_config("preset=s5"), 1)
    with pytest.raises(ValueError, match="preset=s5 .* not 'lru'"):
        listops.get_config("preset=s5,attention=lru")
    assert listops.get_config("preset=s5,runlocal").attention == "s5"  # runlocal sizes


# --- preset=spt: Amos et al.'s self-pretraining --------------------------------------------

# Transcribed here by hand, independently of lra/presets/spt.py: Amos, Berant & Gupta,
# ICLR 2024 (section 2 masking ratios; Table 4 "Rotary + Masked SPT" learning rates as
# (FT, PT)) and IdoAmos/not-from-scratch (commit f919137)
# configs/experiment/lra/transformer-lra-{listops,aan}[-mlm].yaml.
SPT_EXPECTED = {
    "listops": {  # 96,000 training lists, batch 32; max_epochs 100 (FT) and 100 (PT)
        "mask_rate": 0.10, "learning_rate": 1e-4, "spt.learning_rate": 1e-3,
        "model.num_layers": 6, "model.emb_dim": 512, "model.num_heads": 8,
        "model.mlp_dim": 2048, "batch_size": 32, "weight_decay": 0.0,
        "warmup_steps": 2000, "spt.warmup_steps": 2000,
        "num_train_steps": 100 * 3000, "spt.pretrain_steps": 100 * 3000,
    },
    "retrieval": {  # 147,086 training pairs, batch 32; max_epochs 32 (FT) and 32 (PT)
        "mask_rate": 0.15, "learning_rate": 5e-4, "spt.learning_rate": 5e-3,
        "model.num_layers": 4, "model.emb_dim": 128, "model.num_heads": 4,
        "model.mlp_dim": 512, "warmup_steps": 5000, "spt.warmup_steps": 2000,
        "num_train_steps": 32 * (147_086 // 32), "spt.pretrain_steps": 32 * (147_086 // 32),
    },
}


@pytest.mark.parametrize("task", sorted(SPT_EXPECTED))
def test_spt_preset_runs_amos_et_al_settings(task):
    config = CONFIGS[task].get_config("preset=spt")
    assert config.model.positions == "rope" and config.model.pooling == "mean"
    assert config.spt.objective == "masked_lm" and config.schedule == "constant"
    for path, expected in SPT_EXPECTED[task].items():
        value = functools.reduce(lambda node, key: node[key], path.split("."), config)
        assert value == pytest.approx(expected), path
    train.validate_config(config, 2)


def test_spt_preset_validates_for_every_task():
    from configs import pathx

    for module in (*CONFIGS.values(), pathx):
        config = module.get_config("preset=spt")
        assert config.mask_rate in (0.10, 0.15, 0.50)  # the paper's three rates
        train.validate_config(config, 1)

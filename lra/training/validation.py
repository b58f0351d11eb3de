"""Config checks: bad values are rejected before anything is compiled, naming the key.

`lra.training.train.train_and_evaluate` calls `validate_config` first (it is importable from
`lra.training.train` too); `lra.bench` uses it to check the sizes of its step scope.
"""

from __future__ import annotations

import functools

import ml_collections
from flax import nnx

from lra import models
from lra.models import mixers, pattern
from lra.models.attention.sequence_parallel import STRIPED_MIXERS, KvStrategy, Layout
from lra.parallel.sharding import SEQUENCE_PARALLEL_MIXERS
from lra.training.objectives import Objective
from lra.training.pretraining import CHECKPOINT_FOLDERS

SCHEDULES = ("rsqrt", "cosine", "constant")
DTYPES = ("float32", "bfloat16")


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Rejects bad values before anything is compiled, naming the config key."""
    positive = ("batch_size", "eval_batch_size", "num_train_steps", "max_length", "eval_every",
                "checkpoint_every", "log_every", "keep_checkpoints", "mesh_fsdp",
                "grad_accum_steps", "model.num_layers", "model.emb_dim", "model.qkv_dim",
                "model.num_heads", "model.mlp_dim")
    for key in positive:
        value = functools.reduce(getattr, key.split("."), config)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"config.{key} must be a positive integer, got {value!r}")
    for key in ("learning_rate", "ssm_learning_rate"):
        if not config.get(key, 1.0) > 0:
            raise ValueError(f"config.{key} must be > 0, got {config[key]}")
    if not 0 <= config.warmup_steps < config.num_train_steps:
        raise ValueError(
            f"config.warmup_steps={config.warmup_steps} must be in [0, num_train_steps="
            f"{config.num_train_steps}): a warmup longer than training never reaches the peak"
        )
    precisions = ("default", "high", "highest")
    if config.get("matmul_precision", "default") not in precisions:
        raise ValueError(f"config.matmul_precision={config.matmul_precision!r}; known: "
                         f"{', '.join(precisions)}")
    if config.schedule not in SCHEDULES:
        raise ValueError(f"config.schedule={config.schedule!r}; known: {', '.join(SCHEDULES)}")
    for key in ("weight_decay", "grad_clip", "model.dropout", "model.attention_dropout",
                "ssm_weight_decay"):
        value = functools.reduce(getattr, key.split("."), config)
        if value < 0:
            raise ValueError(f"config.{key} must be >= 0, got {value}")
    if config.get("mixer", config.attention) != config.attention:
        raise ValueError(f"config.mixer={config.mixer!r} and config.attention="
                         f"{config.attention!r} name one field; set one of them")
    if config.attention not in mixers.NAMES:
        raise ValueError(
            f"config.attention={config.attention!r} is unknown; known: {', '.join(mixers.NAMES)}"
        )
    if config.model.qkv_dim % config.model.num_heads:
        raise ValueError(
            f"config.model.qkv_dim={config.model.qkv_dim} is not divisible by "
            f"config.model.num_heads={config.model.num_heads}"
        )
    _validate_scaling(config, num_devices)
    _validate_input_pipeline(config)
    _validate_data_preparation(config)
    _validate_option_names(config)
    _validate_pattern(config)
    _validate_objective(config)
    _validate_fused_softmax(config)  # before the constructors, whose message names no config key
    _validate_model(config)


# softmax's fused implementations, each with what has no dropout on the probabilities.
_FUSED_SOFTMAX = {"cudnn": "cuDNN has", "pallas": "the Pallas kernels have"}


def _validate_fused_softmax(config: ml_collections.ConfigDict) -> None:
    """softmax's fused kernels (`cudnn`, `pallas`) have no dropout on the probabilities and
    cuDNN needs 16-bit compute: say so before training, naming the keys, for softmax as the
    mixer and as another layer of a per-layer pattern."""
    for key, options in _softmax_options(config):
        implementation = options.get("implementation", "xla")
        implementation = getattr(implementation, "value", implementation)  # a Choice member
        if implementation not in _FUSED_SOFTMAX:
            continue
        problems = []
        if config.model.attention_dropout > 0:
            problems.append(f"config.model.attention_dropout={config.model.attention_dropout} "
                            f"({_FUSED_SOFTMAX[implementation]} no dropout on the "
                            "probabilities: set it to 0)")
        if implementation == "cudnn" and config.dtype != "bfloat16":
            problems.append(f"config.dtype={config.dtype!r} (cuDNN runs in 16-bit: set "
                            "config.dtype=bfloat16)")
        if problems:
            raise ValueError(
                f"{key}.implementation={implementation!r} cannot run with "
                + "; ".join(problems) + ", or use implementation='xla'"
            )


def _softmax_options(config: ml_collections.ConfigDict) -> list[tuple[str, dict]]:
    """(config key, options) of every softmax layer: the mixer's options and, when softmax
    is another name of the per-layer pattern, its `pattern_options` entry."""
    found = []
    if config.attention == "softmax":
        found.append(("config.model.attention_options", config.model.attention_options))
    pattern_options = config.model.get("pattern_options") or {}
    if ("softmax" in pattern.parse(config.model.get("mixer_pattern", ""))
            and config.attention != "softmax" and "softmax" in pattern_options):
        found.append(("config.model.pattern_options.softmax", pattern_options["softmax"]))
    return found


def _validate_scaling(config: ml_collections.ConfigDict, num_devices: int) -> None:
    if num_devices % config.mesh_fsdp:
        raise ValueError(f"config.mesh_fsdp={config.mesh_fsdp} must divide the {num_devices} devices")
    seq = config.get("mesh_seq", 1)  # (a config built in Python before the key existed)
    if not isinstance(seq, int) or isinstance(seq, bool) or seq <= 0:
        raise ValueError(f"config.mesh_seq must be a positive integer, got {seq!r}")
    if num_devices % (config.mesh_fsdp * seq):
        raise ValueError(f"config.mesh_seq={seq} must divide the {num_devices} devices together "
                         f"with config.mesh_fsdp={config.mesh_fsdp} (their product divides them)")
    # Rows are split over the devices that do not share a sequence.
    shards = num_devices // seq
    where = (f"{shards} devices" if seq == 1 else
             f"{shards} batch shards ({num_devices} devices / config.mesh_seq={seq})")
    for key in ("batch_size", "eval_batch_size"):
        if config[key] % shards:
            raise ValueError(f"config.{key}={config[key]} is not divisible by {where}")
    accum = config.grad_accum_steps
    if config.batch_size % (accum * shards):
        raise ValueError(
            f"config.grad_accum_steps={accum} must divide config.batch_size={config.batch_size} "
            f"into micro-batches divisible by {where}"
        )
    if seq > 1:
        _validate_sequence_parallel(config, seq)
    try:
        KvStrategy(config.get("kv_strategy", KvStrategy.RING))
    except ValueError as error:  # "kv_strategy must be one of 'ring', ...; got ..."
        raise ValueError(f"config.{error}") from None
    layout = config.get("seq_layout", Layout.CONTIGUOUS)
    if layout not in [member.value for member in Layout]:
        raise ValueError(f"config.seq_layout must be one of "
                         f"{', '.join(repr(member.value) for member in Layout)}; got {layout!r}")
    if seq > 1 and Layout(layout) is Layout.STRIPED:
        _validate_striped(config)
    if config.dtype not in DTYPES:
        raise ValueError(f"config.dtype={config.dtype!r}; known: {', '.join(DTYPES)}")
    if config.remat not in (True, False):
        raise ValueError(f"config.remat must be True or False, got {config.remat!r}")
    scan_layers = config.model.get("scan_layers", False)
    if scan_layers not in (True, False):
        raise ValueError(f"config.model.scan_layers must be True or False, got {scan_layers!r}")


def _validate_sequence_parallel(config: ml_collections.ConfigDict, seq: int) -> None:
    """config.mesh_seq > 1 splits every sequence over `seq` devices: the inputs' length
    splits evenly, the encoder's sequence is the inputs' (no CLS position), and every
    layer's mixer is one that runs so split (`sharding.SEQUENCE_PARALLEL_MIXERS`)."""
    where = f"under sequence parallelism (config.mesh_seq={seq})"
    if config.max_length % seq:
        raise ValueError(f"config.max_length={config.max_length} must be divisible by "
                         f"config.mesh_seq={seq}: each device holds max_length / mesh_seq "
                         "positions of a sequence")
    if config.model.get("pooling", "cls") == "cls":
        raise ValueError(
            f"config.model.pooling='cls' prepends a CLS position, so the encoder's sequence "
            f"(max_length + 1 = {config.max_length + 1}) and the inputs' (max_length = "
            f"{config.max_length}) cannot both split evenly over config.mesh_seq={seq}; "
            "use config.model.pooling='mean' or 'last'")
    supported = ", ".join(
        name + "".join(f" ({option} {' or '.join(map(repr, values))})"
                       for option, values in needs.items())
        for name, needs in SEQUENCE_PARALLEL_MIXERS.items())
    specs = pattern.layer_mixers(config.model, config.attention)
    for spec in specs:
        key = ("config.model.attention_options" if spec.name == config.attention
               else f"config.model.pattern_options.{spec.name}")
        layer = "mixer" if spec.name == config.attention else "per-layer pattern's mixer"
        if spec.name not in SEQUENCE_PARALLEL_MIXERS:
            raise ValueError(f"{layer} {spec.name!r} is not yet supported {where}; "
                             f"supported mixers: {supported}; or set config.mesh_seq=1")
        for option, values in SEQUENCE_PARALLEL_MIXERS[spec.name].items():
            value = spec.options.get(option, mixers.default_options(spec.name).get(option))
            value = getattr(value, "value", value)  # a Choice member
            if value not in values:
                raise ValueError(
                    f"{key}.{option}={value!r} of {layer} {spec.name!r} is not yet supported "
                    f"{where}; supported mixers: {supported}; or set config.mesh_seq=1")


def _validate_striped(config: ml_collections.ConfigDict) -> None:
    """config.seq_layout='striped' runs only the exact attentions (`STRIPED_MIXERS`),
    without attention dropout (softmax's explicit path masks by index)."""
    for spec in pattern.layer_mixers(config.model, config.attention):
        if spec.name not in STRIPED_MIXERS:
            raise ValueError(
                f"config.seq_layout='striped' runs only {', '.join(STRIPED_MIXERS)}: mixer "
                f"{spec.name!r} needs the tokens of its sequence in order; use "
                "config.seq_layout='contiguous'")
    if config.model.attention_dropout > 0:
        raise ValueError(
            f"config.seq_layout='striped' needs config.model.attention_dropout=0 (got "
            f"{config.model.attention_dropout}): attention dropout runs softmax's explicit "
            "path, which needs the tokens in order")


def _validate_input_pipeline(config: ml_collections.ConfigDict) -> None:
    for key in ("data_threads", "data_workers"):
        value = config[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"config.{key} must be an integer >= 0, got {value!r}")


def _validate_objective(config: ml_collections.ConfigDict) -> None:
    """The objective fits the encoder; fine-tuning and SPT settings are coherent."""
    objective = config.get("objective", "classify")
    names = tuple(o.value for o in Objective)
    if objective not in names:
        raise ValueError(f"config.objective={objective!r}; known: {', '.join(names)}")
    causal = config.model.causal
    if objective == "causal_lm" and not causal:
        raise ValueError("config.objective='causal_lm' predicts the next token, so it needs a "
                         "causal encoder (config.model.causal=True, model.pooling='last'); "
                         "a bidirectional one pretrains with objective='masked_lm'")
    if objective == "masked_lm" and causal:
        raise ValueError("config.objective='masked_lm' needs a bidirectional encoder "
                         "(config.model.causal=False); a causal one pretrains with "
                         "objective='causal_lm'")
    if objective == "token_classify" and not causal:
        raise ValueError(f"config.objective='token_classify' scores the task {config.task!r} "
                         "position by position from the tokens before each one, so it needs a "
                         "causal encoder: set config.model.causal=True")
    if objective == "masked_lm" and not 0 < config.mask_rate < 1:
        raise ValueError(f"config.mask_rate must be in (0, 1), got {config.mask_rate}")
    if config.get("init_from_checkpoint", "best") not in CHECKPOINT_FOLDERS:
        raise ValueError(f"config.init_from_checkpoint={config.init_from_checkpoint!r}; "
                         f"known: {', '.join(CHECKPOINT_FOLDERS)}")
    _validate_spt(config)


def _validate_spt(config: ml_collections.ConfigDict) -> None:
    spt = config.get("spt")
    if spt is None:
        return
    steps = spt.pretrain_steps
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"config.spt.pretrain_steps must be an integer >= 0, got {steps!r}")
    if steps == 0:
        return
    if config.get("objective", "classify") != "classify" or config.get("init_from"):
        raise ValueError("config.spt.pretrain_steps > 0 runs pretraining and fine-tuning "
                         "itself: leave config.objective='classify' and config.init_from=''")
    if spt.objective not in ("", "causal_lm", "masked_lm"):
        raise ValueError(f"config.spt.objective={spt.objective!r}; known: '' (by the "
                         "encoder: causal_lm if causal, else masked_lm), causal_lm, masked_lm")
    if not spt.learning_rate > 0:
        raise ValueError(f"config.spt.learning_rate must be > 0, got {spt.learning_rate}")
    if not 0 <= spt.warmup_steps < steps:
        raise ValueError(f"config.spt.warmup_steps={spt.warmup_steps} must be in [0, "
                         f"spt.pretrain_steps={steps})")


def _validate_data_preparation(config: ml_collections.ConfigDict) -> None:
    if config.shared_filesystem not in (True, False):
        raise ValueError(f"config.shared_filesystem must be True or False, got "
                         f"{config.shared_filesystem!r}")
    if not config.prepare_wait_seconds > 0:
        raise ValueError(f"config.prepare_wait_seconds must be > 0, got "
                         f"{config.prepare_wait_seconds!r}")


def _validate_pattern(config: ml_collections.ConfigDict) -> None:
    """A per-layer pattern (lra/models/pattern.py): known names, the config's mixer first,
    whole repeats, options and blocks for exactly its other names, each option known."""
    model = config.model
    names = pattern.parse(model.get("mixer_pattern", ""))
    if not names:
        return
    pattern.layer_mixers(model, config.attention)  # the first name is config.attention
    pattern.layer_names(names, model.num_layers)  # the pattern divides num_layers
    others = set(names) - {config.attention}
    for key in ("pattern_options", "pattern_block_mlp"):
        extra = sorted(set(model.get(key) or {}) - others)
        if extra:
            raise ValueError(f"config.model.{key} has {', '.join(extra)}, which is not one of "
                             f"model.mixer_pattern's other mixers ({', '.join(sorted(others))})")
    for name, options in (model.get("pattern_options") or {}).items():
        accepted = mixers.family_options(name)
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ValueError(
                f"config.model.pattern_options.{name} has unknown option(s) "
                f"{', '.join(unknown)}; mixer {name!r} accepts: {', '.join(accepted) or 'none'}")


def _validate_option_names(config: ml_collections.ConfigDict) -> None:
    accepted = mixers.family_options(config.attention)
    unknown = sorted(set(config.model.attention_options) - set(accepted))
    if unknown:
        raise ValueError(
            f"config.model.attention_options has unknown option(s) {', '.join(unknown)} for "
            f"mixer {config.attention!r}; it accepts: {', '.join(accepted) or 'no options'} "
            f"(options of another mixer? name the mixer when the config is built, as "
            f"configs/<task>.py:mixer={config.attention} or --config.mixer={config.attention})"
        )


def _validate_model(config: ml_collections.ConfigDict) -> None:
    """Any setting the model constructors reject (traced only, nothing is computed)."""
    try:
        nnx.eval_shape(lambda: models.build_model(
            config.model, attention=config.attention, vocab_size=2, num_classes=2,
            max_len=config.max_length, rngs=nnx.Rngs(0), dtype=config.dtype, remat=config.remat,
        ))
    except ValueError as error:
        task_note = ""
        if config.get("objective", "classify") == "token_classify" and "causal" in str(error):
            task_note = (f"; the task {config.task!r} is scored left to right and needs a mixer "
                         "with a causal form")
        raise ValueError(
            f"config.model (attention {config.attention!r}, max_length {config.max_length}): "
            f"{error}{task_note}"
        ) from None

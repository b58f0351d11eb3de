"""Shared pieces of the config files: the argument string, default sizes, data folders.

A config file is `get_config(arg)`, where `arg` is the text after the colon in
`--config configs/<task>.py:<arg>`: comma-separated `runlocal`, `attention=<name>` (or
its alias `mixer=<name>`), `pattern=<name>+<name>+...` (per-layer mixers, the first one the
mixer; lra/models/pattern.py), `seed=<int>`, `preset=<name>`. Every key the training loop
reads gets its default here or in the task's file, each with a comment; `lra.training.train` never
falls back to defaults of its own.

The mixer is chosen in the argument, before anything else is built, because it decides
other keys: `model.attention_options` holds its options with their defaults,
`model.block_mlp` its paper's block, and a preset its values. launch.py moves
`--config.mixer=NAME` and `--config.attention=NAME` into the argument (lra/experiments/launch.py), so
those flags build the same config as `mixer=NAME`. The rule for presets: a preset is applied
for the run's final mixer, wherever it was named, never for the mixer the file would have
picked: preset=lra gives it LRA's released settings for that mixer on the task (its
defaults where LRA did not run it), preset=spt the same settings for every mixer, and
preset=s5, S5's settings, runs s5 alone (another mixer is refused). `--config.KEY=VALUE`
flags apply last, over defaults and presets. A mixer changed in Python after `get_config`
keeps the options of the one the file built (`lra.training.validation` rejects the names the new
mixer does not take): build the config for the mixer instead.
"""

from __future__ import annotations

import os

import ml_collections

from lra.models import mixers, pattern
from lra.presets import long_range_arena
from lra.presets import s5 as s5_preset
from lra.presets import spt as spt_preset

# Where prepared data lives unless `config.data_dir` says otherwise.
DATA_ROOT = os.path.expanduser(os.environ.get("LRA_DATA_DIR", "~/.cache/lra"))
# The user's cache folder (XDG), for the compilation cache.
CACHE_ROOT = os.path.join(
    os.path.expanduser(os.environ.get("XDG_CACHE_HOME", "~/.cache")), "lra")

ARG_TYPES = {"runlocal": bool, "attention": str, "mixer": str, "seed": int, "preset": str,
             "pattern": str}
ARG_ALIASES = {"mixer": "attention"}  # an argument set under another name


def parse_arg(arg: str | None, presets: tuple[str, ...], *,
              runlocal_attention: str = "softmax") -> dict:
    """Parses `runlocal,attention=linear,seed=1,preset=lra` into a dict of typed values.

    `mixer=` is `attention=` under the mixer registry's name. Without either, the mixer is
    s5 under preset=s5 (S5's released settings are for S5), `runlocal_attention` under
    runlocal (a task file may name one its length allows) and softmax otherwise.

    Raises:
      ValueError: for an unknown argument, a malformed value, an unknown preset or mixer.
    """
    parsed = {"runlocal": False, "attention": None, "seed": 0, "preset": presets[0],
              "pattern": ""}
    for item in filter(None, (arg or "").split(",")):
        name, has_value, value = item.partition("=")
        name = name.strip()
        if name not in ARG_TYPES:
            raise ValueError(f"unknown config argument {name!r}; known: {', '.join(ARG_TYPES)}")
        kind = ARG_TYPES[name]
        if kind is bool:
            if has_value:
                raise ValueError(f"config argument {name!r} takes no value")
            parsed[name] = True
            continue
        if not has_value or not value:
            raise ValueError(f"config argument {name!r} needs a value, e.g. {name}=...")
        try:
            parsed[ARG_ALIASES.get(name, name)] = kind(value)
        except ValueError:
            raise ValueError(f"config argument {name}={value!r} is not a {kind.__name__}") from None
    layers = pattern.parse(parsed["pattern"])
    if layers and parsed["attention"] not in (None, layers[0]):
        raise ValueError(f"config arguments pattern={parsed['pattern']} and "
                         f"mixer={parsed['attention']}: the pattern's first name is the "
                         "config's mixer; leave mixer= out or make it the first name")
    parsed["pattern"] = pattern.canonical(parsed["pattern"])
    if layers and len(set(layers)) == 1:
        parsed["pattern"] = ""  # one name: today's model, whatever the number of layers
    if layers:
        parsed["attention"] = layers[0]
    if parsed["attention"] is None:
        parsed["attention"] = ("s5" if parsed["preset"] == "s5" else
                               runlocal_attention if parsed["runlocal"] else "softmax")
    if parsed["preset"] == "s5" and parsed["attention"] != "s5":
        raise ValueError(f"preset=s5 holds S5's released settings, for mixer s5 alone, not "
                         f"{parsed['attention']!r}: leave the mixer out or choose another preset")
    if parsed["attention"] not in mixers.NAMES:
        raise ValueError(
            f"unknown attention {parsed['attention']!r}; known: {', '.join(mixers.NAMES)} "
            "(attention= and mixer= name a mixer: an attention family or a sequence model)"
        )
    if parsed["preset"] not in presets:
        raise ValueError(f"unknown preset {parsed['preset']!r}; known: {', '.join(presets)}")
    return parsed


def base_config(task: str, args: dict) -> ml_collections.ConfigDict:
    """The keys every task shares, with LRA-style defaults; task files override sizes."""
    config = ml_collections.ConfigDict()
    config.task = task  # name in the task registry `lra.tasks`
    config.seed = args["seed"]  # model init, dropout and data order all derive from it
    # The token mixer: a name in `lra.models.mixers` (every attention family and the
    # sequence models). `mixer` and `attention` are one field under two names.
    config.attention = args["attention"]
    config.mixer = config.get_ref("attention")
    config.data_dir = os.path.join(DATA_ROOT, task)  # prepared data (official layout accepted)
    # Settings handed to the task's `prepare` when the data has to be generated.
    config.prepare = ml_collections.ConfigDict()
    # Several processes (hosts): True = every host sees the same data_dir (a shared file
    # system): process 0 prepares it and the others wait for its marker file; False = each
    # host prepares its own copy (deterministic; the copies' manifests are compared).
    config.shared_filesystem = True
    # How long the other processes wait for process 0 to prepare the data (seconds).
    config.prepare_wait_seconds = 7200.0
    config.max_length = 1000  # tokens per sequence: longer ones are truncated, shorter padded
    config.batch_size = 32  # global batch, split over the `data` mesh axis
    config.eval_batch_size = 32  # global batch for evaluation; the last one is padded
    config.num_train_steps = 5000
    config.learning_rate = 1e-3  # peak learning rate, reached at the end of warmup
    config.warmup_steps = 1000  # linear warmup from 0; must be shorter than training
    config.schedule = "rsqrt"  # after warmup: rsqrt | cosine | constant
    config.adam_b1 = 0.9
    config.adam_b2 = 0.98
    config.adam_eps = 1e-9
    config.weight_decay = 0.1  # decoupled (AdamW), multiplied by the learning rate
    # Peak learning rate of the state-space parameters (`SsmParam`: Lambda, B, dt, ... of
    # s4d, s5, lru), on the same schedule, and their weight decay (none, as those papers
    # train them); unused by attention mixers.
    config.ssm_learning_rate = 1e-3
    config.ssm_weight_decay = 0.0  # of the SsmParams (the papers: none)
    config.grad_clip = 0.0  # clip gradients to this global norm; 0 = no clipping
    # What is trained (lra/training/objectives.py): classify (the task's labels) | causal_lm (next
    # token, causal encoders) | masked_lm (masked tokens, bidirectional encoders), the last
    # two on the task's own inputs (self-pretraining, Amos et al. 2024).
    config.objective = "classify"
    config.mask_rate = 0.15  # masked_lm: fraction of real tokens masked (Amos et al.: 10-50%)
    # Fine-tuning (lra/training/pretraining.py): start the encoder from the run in this workdir
    # ("" = from scratch), at its best-validation or last checkpoint: best | last.
    config.init_from = ""
    config.init_from_checkpoint = "best"
    # The SPT protocol in one command: spt.pretrain_steps > 0 pretrains that many steps in
    # WORKDIR/pretrain (objective: causal_lm if model.causal else masked_lm, unless
    # spt.objective names one), then fine-tunes num_train_steps steps in WORKDIR/finetune.
    config.spt = ml_collections.ConfigDict()
    config.spt.pretrain_steps = 0
    config.spt.objective = ""
    config.spt.learning_rate = 1e-3  # pretraining's peak learning rate
    config.spt.warmup_steps = 100  # pretraining's warmup
    config.log_every = 50  # train metrics are averaged over this many steps
    config.eval_every = 500  # full validation pass; test too whenever validation improves
    config.checkpoint_every = 500  # also saved at the end and on SIGTERM
    config.keep_checkpoints = 3  # the newest N are kept, so a corrupt latest one has a fallback
    config.num_devices = 0  # 0 = every device; N = the first N (for checks and debugging)
    # Compiled programs are kept here across processes, so a requeued or resumed job does
    # not compile again ("" = no persistent cache).
    config.compilation_cache_dir = os.path.join(CACHE_ROOT, "jax-compilation-cache")
    # Precision of float32 matmuls: default (the platform's: TF32/bf16 passes on GPU/TPU)
    # | high | highest (full float32 everywhere).
    config.matmul_precision = "default"
    # Memory and speed; only `dtype` changes results beyond float rounding (see lra/training/train.py).
    # Devices form a (data, fsdp, seq) mesh: mesh_fsdp devices share each parameter and
    # optimizer array (sharded), mesh_seq devices share each sequence (sequence
    # parallelism: a batch's [B, L] arrays and the block activations are split along L),
    # the data axis gets the other factor; batches' rows are split over data and fsdp.
    config.mesh_fsdp = 1  # must divide the number of devices; 1 = plain data parallelism
    # mesh_fsdp * mesh_seq must divide the devices, and mesh_seq max_length; > 1 only for
    # the mixers of lra.parallel.sharding.SEQUENCE_PARALLEL_MIXERS (the exact attentions
    # and the linear-time mixers) and pooling mean or last. 1 = no sequence parallelism.
    config.mesh_seq = 1
    # How exact attention reaches every key when mesh_seq > 1: ring (keys and values
    # travel around the devices; O(L / mesh_seq) per device) | all_gather (gathered whole;
    # fewer, larger transfers). The same numbers up to float rounding.
    config.kv_strategy = "ring"
    # The order of a split sequence's tokens over the seq devices while the blocks run:
    # contiguous (device i holds one run of L / mesh_seq tokens) | striped (device i holds
    # tokens i, i + mesh_seq, ...: causal attention costs every device the same; softmax
    # and memory_efficient only). The same numbers up to float rounding.
    config.seq_layout = "contiguous"
    config.grad_accum_steps = 1  # micro-batches per step: same steps, 1/N activation memory
    config.dtype = "float32"  # compute: float32 | bfloat16 (parameters, optimizer stay float32)
    config.remat = False  # recompute each block in the backward pass: less memory, more FLOPs
    # The input pipeline (grain); neither changes results, so both may change on resume.
    # Threads that gather batches ahead of the loop (grain's ReadOptions.num_threads; 0 =
    # gather in the thread that puts batches on the devices): half this machine's cores, 1-8.
    config.data_threads = default_data_threads()
    # grain worker processes that gather training batches (mp_prefetch; 0 = none). They pay
    # off only when gathering a batch is slow (GIL-bound); for memory-mapped NumPy rows, as
    # every task here reads, threads suffice, so none by default.
    config.data_workers = 0

    config.model = ml_collections.ConfigDict()
    config.model.num_layers = 4
    config.model.emb_dim = 256  # width of the residual stream
    config.model.qkv_dim = 256  # total width of queries/keys/values over all heads
    config.model.num_heads = 4
    config.model.mlp_dim = 1024  # also the hidden width of the classifier head
    config.model.dropout = 0.1
    config.model.attention_dropout = 0.1  # on attention probabilities, where a family has them
    config.model.pooling = "cls"  # cls | mean | last (last real token; required when causal)
    config.model.positions = "sinusoidal"  # sinusoidal | learned | rope | none
    # Token embedding table: unit_normal = N(0, 1), as every LRA encoder; flax = nnx.Embed's
    # default (variance scaling). runlocal keeps flax (its README figures were measured so).
    config.model.embedding_init = "unit_normal"
    # Causal attention in every block (needs pooling="last"): the model reads left to right;
    # with a kernelized attention it is an RNN (lra.models.classify_stepwise decodes it).
    config.model.causal = False
    # The mixer's options, starting from its defaults (see README).
    config.model.attention_options = mixers.default_options(args["attention"])
    # Each block: x + mixer(N(x)), then x + MLP(N(x)) if True (mlp_dim wide); the default
    # is the mixer's paper's block (Transformers: True; S5, S4D, LRU: False).
    config.model.block_mlp = mixers.default_block_mlp(args["attention"])
    # Per-layer mixers (lra/models/pattern.py): "" = every layer is `attention`; else names
    # separated by "+", the first one `attention`, repeated to fill num_layers (e.g.
    # "gated_deltanet+gated_deltanet+gated_deltanet+softmax"). Set with the config argument
    # pattern=... or --config.model.mixer_pattern=... (launch moves it into the argument).
    # The first name keeps attention_options and block_mlp; each other name N has its
    # options in pattern_options.N and its block in pattern_block_mlp.N.
    config.model.mixer_pattern = args.get("pattern", "")
    others = [name for name in dict.fromkeys(pattern.parse(config.model.mixer_pattern))
              if name != args["attention"]]
    config.model.pattern_options = {name: mixers.default_options(name) for name in others}
    config.model.pattern_block_mlp = {name: mixers.default_block_mlp(name) for name in others}
    config.model.norm = "layer"  # N: layer | batch (masked BatchNorm over real tokens, as S5)
    config.model.norm_momentum = 0.95  # BatchNorm's running averages (S5's default)
    # The blocks as one stacked block run by nnx.scan: compiled once whatever num_layers
    # (same numbers; another parameter layout, so checkpoints do not carry across).
    config.model.scan_layers = False
    return config


def settings_folder(task: str, prepare: ml_collections.ConfigDict,
                    short: dict[str, str] | None = None):
    """DATA_ROOT/<task>/<name><value>-<name><value>-... over every prepare setting: those
    in `short` first, in its order and named as it says (e.g. v16-L128-n12800-s0), then
    the others by name.

    A string reference: a flag that changes a setting (--config.prepare.seq_len=256)
    changes the folder too, so each setting gets data of its own.
    """
    short = short or {}
    names = [name for name in short if name in prepare] + sorted(set(prepare) - set(short))
    folder = os.path.join(DATA_ROOT, task, "")
    for index, name in enumerate(names):
        folder = folder + ("-" if index else "") + short.get(name, name) + prepare.get_ref(
            name).to_str()
    return folder


def default_data_threads() -> int:
    """Half the cores this process may run on (its CPU affinity, e.g. a SLURM allocation),
    at least 1 and at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(8, (cores or 1) // 2))


def set_runlocal_model(model: ml_collections.ConfigDict, *, num_layers: int, emb_dim: int,
                       qkv_dim: int, num_heads: int, mlp_dim: int) -> None:
    """The small model of a `runlocal` config: these sizes and no dropout.

    A run of a few CPU minutes has nothing to regularise yet, so dropout and attention
    dropout are 0. Token embeddings keep flax's default initialisation, with which the
    README's runlocal results were measured.
    """
    model.num_layers = num_layers
    model.emb_dim = emb_dim
    model.qkv_dim = qkv_dim
    model.num_heads = num_heads
    model.mlp_dim = mlp_dim
    model.dropout = 0.0
    model.attention_dropout = 0.0
    model.embedding_init = "flax"


def apply_released(config: ml_collections.ConfigDict, args: dict) -> None:
    """preset=lra: the settings LRA's released code ran for this task and attention;
    preset=s5: S5's released settings for this task (lra/presets/s5.py); preset=spt: Amos
    et al.'s self-pretraining protocol for this task (lra/presets/spt.py).

    These are the attention options (e.g. Performer's kernel, Linformer's proj_len) and,
    where LRA's per-attention config files changed them (Image, Pathfinder), the model
    sizes; see lra/presets/long_range_arena.py for each value's released file and key. Attentions without
    a published LRA row keep their defaults, and so does `runlocal` (a smoke test of the
    pipeline, not the LRA comparison). Called last in get_config; command-line
    `--config.model.attention_options.<option>=...` flags still override.
    """
    if args["runlocal"]:
        return
    if args["preset"] == "lra" and config.task in long_range_arena.TASKS:
        long_range_arena.apply(config)
    elif args["preset"] == "s5":
        s5_preset.apply(config)
    elif args["preset"] == "spt":
        spt_preset.apply(config)

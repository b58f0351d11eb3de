"""MAD's synthetic tasks (lra/tasks/mad.py) with MAD's training setting; the argument
`task=<name>` chooses one of `TASKS` (default in_context_recall).

Launch (from the repository root):
  python launch.py --config configs/mad.py:runlocal,task=in_context_recall --workdir runs/mad-local
  python launch.py --config configs/mad.py:task=selective_copying,mixer=gla --workdir runs/mad-sc
  python launch.py --config configs/mad.py:task=fuzzy_recall --workdir runs/mad-fr \
      --config.prepare.seq_len=512 --config.learning_rate=1e-3 --config.weight_decay=0.1

The data defaults are MAD's baseline settings for the task (its `defaults` in
lra/tasks/mad.py); `--config.prepare.<setting>=...` sets a difficulty (MAD's `changes`), and
max_length, data_dir and the number of steps follow.

Preset `mad` (the only one): MAD's training setting, from athms/mad-lab commit 0f49a45,
``mad/configs.py`` (``MADConfig``), ``train.py`` and ``mad/model/pl_model_wrapper.py``:
width 128, two blocks each a sequence mixer then a channel mixer (MAD's default layers
``mh-attention, swiglu, mh-attention, swiglu``; attention with 16 heads and rotary
positions on the whole 8-wide head, ``configs/layers/mh-attention.yml``; no position
embeddings, LayerNorm before each layer, no dropout), batch 128, 200 epochs, AdamW
(torch's defaults: betas 0.9, 0.999, eps 1e-8) at learning rate 5e-4 and weight decay 0
(MADConfig's defaults; the MAD protocol takes the best of learning rates `LEARNING_RATES`
and weight decays `WEIGHT_DECAYS`, ``make_benchmark_mad_configs``), cosine decay without
warmup, one evaluation per epoch. The training steps follow num_train and batch_size
(200 epochs of ceil(num_train / batch_size) steps: 20,000 at 12,800 examples, 400 for
memorization's 256).

What differs from MAD: its channel mixer is SwiGLU of inner width 352
(``int(2 * 128 * 4 / 3)`` rounded up to a multiple of 16, ``mad/model/layers/mlp.py``),
here the block's GELU MLP of that width; its cosine steps once per epoch down to 1e-6, here
once per step down to 0; it trains in bf16 (here float32) and stops once test accuracy
reaches 99.9% (here all steps run); compression trains MAD's AutoEncoder backbone, here the
same causal model reads the sequence back at later positions (see lra/tasks/mad.py). Each
mixer keeps its own options; sequence models (no q and k to rotate) get no positions.
MAD validates on its test set; here validation is its own split, drawn as the test split.

runlocal: a short CPU run of the chosen task on its MAD data: batch 32, 300 steps.
`task` is this file's argument, not one lra.experiments.sweep knows: sweep each task in a
sweep of its own (e.g. --config configs/mad.py:task=memorization --sweep seed=0,1,2).
"""

from configs import common
from lra.models import mixers
from lra.tasks import mad

TASKS = tuple(mad.TASKS)
PRESETS = ("mad",)
EPOCHS = 200  # MADConfig.epochs
LEARNING_RATES = (1e-4, 5e-4, 1e-3)  # make_benchmark_mad_configs' grid
WEIGHT_DECAYS = (0.0, 0.1)
SWIGLU_WIDTH = 352  # MAD's SwiGLU inner width at width 128
# Data folder names, in this order: v16-L128-mqTrue-nv0-fn0.0-n12800-nval1280-ntest1280-s0.
SHORT = {"vocab_size": "v", "seq_len": "L", "multi_query": "mq", "k_motif_size": "km",
         "v_motif_size": "vm", "num_tokens_to_copy": "c", "noise_vocab_size": "nv",
         "frac_noise": "fn", "num_train": "n", "num_val": "nval", "num_test": "ntest",
         "seed": "s"}


def split_arg(arg: str | None) -> tuple[str, str]:
    """(task, the rest of the argument for common.parse_arg) of `task=<name>,...`.

    Raises:
      ValueError: an unknown task, or more than one.
    """
    items = [item for item in (arg or "").split(",") if item]
    named = [item.partition("=")[2] for item in items if item.partition("=")[0].strip() == "task"]
    if len(named) > 1:
        raise ValueError(f"configs/mad.py takes one task=, got {len(named)}")
    task = named[0].strip() if named else TASKS[0]
    if task not in TASKS:
        raise ValueError(f"unknown MAD task {task!r}; known: {', '.join(TASKS)}")
    rest = ",".join(item for item in items if item.partition("=")[0].strip() != "task")
    return task, rest


def get_config(arg=None):
    task_name, rest = split_arg(arg)
    task = mad.TASKS[task_name]
    args = common.parse_arg(rest, PRESETS)
    config = common.base_config(task_name, args)
    config.objective = "token_classify"
    prepare = config.prepare
    for name, value in task.defaults.items():
        prepare[name] = value
    # compression's examples are seq_len tokens and seq_len - 1 read-out positions
    length = prepare.get_ref("seq_len")
    config.max_length = 2 * length - 1 if task_name == "compression" else 1 * length
    config.data_dir = common.settings_folder(task_name, prepare, SHORT)

    model = config.model
    model.num_layers = 2
    model.emb_dim = 128
    model.qkv_dim = model.get_ref("emb_dim") * 1  # follows emb_dim unless set itself
    model.num_heads = 16
    model.mlp_dim = SWIGLU_WIDTH
    model.block_mlp = True  # every MAD sequence mixer is followed by a channel mixer
    model.causal = True
    model.pooling = "last"
    model.dropout = 0.0
    model.attention_dropout = 0.0
    model.positions = "rope" if mixers.is_attention(args["attention"]) else "none"
    model.norm = "layer"
    model.embedding_init = "flax"  # MAD: N(0, 0.02); flax's is nearer than N(0, 1)

    config.batch_size = 128
    config.eval_batch_size = 128
    epoch = (prepare.get_ref("num_train") + config.get_ref("batch_size") - 1) // config.get_ref(
        "batch_size")  # steps per epoch (MAD's DataLoader keeps the last partial batch)
    config.num_train_steps = EPOCHS * epoch
    config.learning_rate = 5e-4
    config.warmup_steps = 0
    config.schedule = "cosine"
    config.weight_decay = 0.0
    config.adam_b1 = 0.9
    config.adam_b2 = 0.999
    config.adam_eps = 1e-8
    config.grad_clip = 0.0
    # Each key its own reference (1 * epoch), so a flag that sets one leaves the others.
    config.eval_every = 1 * epoch
    config.checkpoint_every = 10 * epoch
    config.log_every = 1 * epoch

    if args["runlocal"]:
        # A short CPU run on MAD's data: smaller batches, fewer steps, the model kept.
        config.batch_size = 32
        config.num_train_steps = 300
        config.eval_every = 100
        config.checkpoint_every = 100
        config.log_every = 50
    return config

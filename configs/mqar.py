"""MQAR (Zoology's multi-query associative recall, lra/tasks/mqar.py): recall each key's value.

A 2-layer causal model trained on the scored positions only (objective token_classify);
accuracy is over query positions. The recall gap between families shows as the number of
pairs grows at a fixed width: attention solves every setting, a fixed-size state runs out.

Launch (from the repository root):
  python launch.py --config configs/mqar.py:runlocal --workdir runs/mqar-local
  python launch.py --config configs/mqar.py:mixer=gla --workdir runs/mqar-gla \
      --config.prepare.seq_len=256 --config.prepare.num_kv_pairs=16 --config.model.emb_dim=64
  python launch.py --config configs/mqar.py:preset=zoology,mixer=softmax --workdir runs/mqar-z

`model.emb_dim` sets the width (qkv_dim follows it unless set itself) and
`prepare.seq_len` the length (max_length follows it; the data folder follows the
settings). Presets:
  cpu      (default) the setting of this repository's CPU evidence (docs/recall.md):
           vocabulary 512, 20,000 training examples, batch 64, 1,000 steps at a learning
           rate of 1e-2 (cosine decay after 100 warmup steps), rotary positions for exact
           attention; everything else as zoology.
  zoology  Zoology's Figure 2 sweep (HazyResearch/zoology, zoology/experiments/
           paper_configs/iclr24_zoology_figure2/configs.py, commit d88d6f5): 100,000
           training and 3,000 test examples, vocabulary 8,192, 2 layers, batch 512 (256 at
           length 256), 64 epochs, AdamW with weight decay 0.1 (zoology/config.py
           TrainConfig) and a cosine decay to 0 without warmup (zoology/train.py:
           CosineAnnealingLR, eta_min 0), one learning rate of its grid
           np.logspace(-4, -2, 4) (`LEARNING_RATES`; the paper reports the best of the
           four), attention with 1 head and dropout 0.1 on its probabilities.
Both: no MLP after the mixer (Zoology's state_mixer is the identity), positions for the
attention mixers only (Zoology gives position embeddings to attention alone; its other
mixers have convolutions or recurrences), and a short convolution (width 4) on q, k and v
of the linear, gated and delta-rule families instead, as the recall literature's
baselines (flash-linear-attention's ShortConvolution); see `set_recall_mixer`.
"""

import numpy as np

from configs import common
from lra.models import mixers

PRESETS = ("cpu", "zoology")
LEARNING_RATES = tuple(float(x) for x in np.logspace(-4, -2, 4))  # Zoology's grid
SHORT_CONV = 4  # the recall baselines' kernel width on q, k, v
# Data folder names (common.settings_folder): v512-L64-K4-n20000-nval1000-ntest3000-s0.
SHORT = {"vocab_size": "v", "seq_len": "L", "num_kv_pairs": "K", "num_train": "n",
         "num_val": "nval", "num_test": "ntest", "seed": "s"}


def set_recall_mixer(model, mixer: str, *, zoology: bool) -> None:
    """The mixer's setting in the recall literature's models.

    The linear, gated and delta-rule families get a short convolution on q, k, v and no
    position embeddings (flash-linear-attention's models); the other attention mixers get
    positions: learned ones (Zoology) or, on the CPU preset, rotary ones, with which a
    2-layer softmax model leaves MQAR's plateau in a few hundred steps; the sequence
    models encode order themselves. Sequence models run one direction (causal); local
    attention also attends to the previous block (a sliding window of 50-100 tokens).
    """
    options = model.attention_options
    if "short_conv" in options:
        options.short_conv = SHORT_CONV
        model.positions = "none"
    elif mixers.is_attention(mixer):
        model.positions = "learned" if zoology else "rope"
    else:
        model.positions = "none"
    if "bidirectional" in options:
        options.bidirectional = False
    if "overlap" in options:
        options.overlap = True


def get_config(arg=None):
    args = common.parse_arg(arg, PRESETS)
    config = common.base_config("mqar", args)
    config.objective = "token_classify"
    prepare = config.prepare
    prepare.vocab_size = 512  # zoology: 8,192
    prepare.seq_len = 64
    prepare.num_kv_pairs = 4
    prepare.num_train = 20_000
    prepare.num_val = 1_000
    prepare.num_test = 3_000
    prepare.seed = 0
    config.max_length = prepare.get_ref("seq_len")
    config.data_dir = common.settings_folder("mqar", prepare, SHORT)

    model = config.model
    model.num_layers = 2
    model.emb_dim = 64
    model.qkv_dim = model.get_ref("emb_dim") * 1  # follows emb_dim unless set itself
    model.num_heads = 1
    model.mlp_dim = 128  # unused: no MLP sub-block (block_mlp False), no classifier head
    model.block_mlp = False
    model.causal = True
    model.pooling = "last"
    model.dropout = 0.0
    model.attention_dropout = 0.0
    set_recall_mixer(model, args["attention"], zoology=args["preset"] == "zoology")

    config.batch_size = 64
    config.eval_batch_size = 200
    config.num_train_steps = 1000
    config.learning_rate = LEARNING_RATES[-1]  # 1e-2, the top of Zoology's grid
    config.warmup_steps = 100
    config.schedule = "cosine"
    config.weight_decay = 0.1  # Zoology's TrainConfig
    config.adam_b2 = 0.999  # torch.optim.AdamW's default, as Zoology
    config.adam_eps = 1e-8
    config.eval_every = 500
    config.checkpoint_every = 500
    config.log_every = 100

    if args["preset"] == "zoology":
        prepare.vocab_size = 8192
        prepare.num_train = 100_000
        prepare.num_test = 3_000
        prepare.num_val = 3_000
        model.attention_dropout = 0.1
        config.batch_size = 512  # 256 at seq_len 256: set --config.batch_size=256
        config.num_train_steps = 64 * 100_000 // 512
        config.learning_rate = LEARNING_RATES[2]
        config.schedule = "cosine"
        config.warmup_steps = 0
        config.eval_every = 100_000 // 512  # once per epoch, as Zoology
        config.checkpoint_every = config.eval_every
    if args["runlocal"]:
        # A one-minute smoke test of the pipeline on the easiest setting.
        prepare.num_train = 4_000
        prepare.num_val = 500
        prepare.num_test = 500
        config.num_train_steps = 300
        config.eval_every = 100
        config.checkpoint_every = 100
        config.log_every = 50
    return config

"""Pathfinder (Linsley et al., 2018) as in LRA: are the two markers on one contour? 32x32 pixels = 1,024 tokens.

Each pixel is one token, its gray level 0-255 (black is a real token; the mask comes from
lengths). The images come from our offline generator with the published 32x32 parameters
at the "hard" level (contours of 14 paddles), half of them positive; they are generated on
first use into `config.data_dir` (160K/20K/20K: 2 min 40 s with 2 worker processes on a
shared 2-core CPU, 119 CPU-seconds, 197 MiB on disk), or by
  python -m lra.data prepare pathfinder --data_dir ~/.cache/lra/pathfinder
A folder holding the LRA release (``pathfinder32/curv_contour_length_14/``) is converted
once instead. ($LRA_DATA_DIR replaces ~/.cache/lra when set.)

Launch (from the repository root):
  python launch.py --config configs/pathfinder.py:runlocal --workdir runs/pathfinder-local
  python launch.py --config configs/pathfinder.py:preset=lra,attention=softmax,seed=0 --workdir runs/pathfinder
Expected test accuracy (chance 50%): preset=lra softmax: the LRA paper (Table 1) reports
71.40% on the release data. runlocal is a smoke test of the whole pipeline: 50.0% measured
(8 min 19 s, generation included, on a shared 2-core CPU at load ~11). The preset=lra model
with linear attention at reduced data and steps (20K images, 3,000 steps of batch 64, the
command in the README) also stayed at 50.0% on a 2-core CPU (44 min): Pathfinder is learned
only after many epochs.
"""

import os

from configs import common

# s5 = S5's released settings for this task (lra/presets/s5.py; runs attention=s5);
# spt = Amos et al. 2024's self-pretraining protocol (lra/presets/spt.py; pretrain + fine-tune)
PRESETS = ("lra", "s5", "spt")  # lra = the LRA paper's Pathfinder hyperparameters

TRAIN_EXAMPLES = 160_000


def get_config(arg=None):
    args = common.parse_arg(arg, PRESETS)
    config = common.base_config("pathfinder", args)
    # Generator settings: LRA's 160K/20K/20K split of 200K images at 32x32.
    config.prepare.num_train = TRAIN_EXAMPLES
    config.prepare.num_val = 20_000
    config.prepare.num_test = 20_000
    config.prepare.seed = 0  # the data, unlike the model, does not change with `seed`
    config.prepare.resolution = 32  # 64 and 256 are options too (set max_length to match)

    # preset=lra: 4 layers, width 32, qkv 16, 4 heads, MLP 32, dropout 0.2, mean pooling,
    # batch 512, 62,400 steps (200 epochs of 312), cosine decay from 1e-3 after a one-epoch
    # warmup, no weight decay, sinusoidal positions. LRA's released
    # image/configs/pathfinder32/transformer_base.py sets that model (4 layers, 4 heads,
    # width 32, qkv 16, MLP 32, dropout 0.2) over base_pathfinder32_config.py, which holds
    # the training settings, attention dropout 0.1, MEAN pooling and learn_pos_emb=False
    # (its own model: 1 layer, 2 heads, dropout 0.1). Other attentions get the sizes of
    # their own released files (lra/presets/long_range_arena.py, applied at the end).
    steps_per_epoch = TRAIN_EXAMPLES // 512
    config.max_length = 1024  # 32 x 32 pixels
    config.batch_size = 512
    config.eval_batch_size = 512
    config.num_train_steps = 200 * steps_per_epoch  # 62,400
    config.learning_rate = 1e-3
    config.warmup_steps = steps_per_epoch  # 312
    config.schedule = "cosine"
    config.weight_decay = 0.0
    config.grad_clip = 0.0
    config.eval_every = 5 * steps_per_epoch  # every 5 epochs on the 20,000 validation images
    config.checkpoint_every = 5 * steps_per_epoch
    config.model.num_layers = 4
    config.model.emb_dim = 32
    config.model.qkv_dim = 16
    config.model.num_heads = 4
    config.model.mlp_dim = 32
    config.model.dropout = 0.2
    config.model.attention_dropout = 0.1
    config.model.pooling = "mean"
    config.model.positions = "sinusoidal"

    if args["runlocal"]:
        # A smoke run of a few CPU minutes, generation included: 5K images, one small layer
        # (softmax over 1,024 pixels is most of the time). Pathfinder is learned only after
        # many epochs: expect chance-level accuracy from this run.
        config.data_dir = os.path.join(common.DATA_ROOT, "pathfinder-runlocal")
        config.prepare.num_train = 4_000
        config.prepare.num_val = 500
        config.prepare.num_test = 500
        config.batch_size = 16
        config.eval_batch_size = 100
        config.num_train_steps = 120
        config.learning_rate = 1e-3
        config.warmup_steps = 12
        config.eval_every = 60
        config.checkpoint_every = 60
        config.log_every = 20
        common.set_runlocal_model(config.model, num_layers=1, emb_dim=32, qkv_dim=32,
                                  num_heads=2, mlp_dim=64)
    common.apply_released(config, args)  # LRA's released settings (lra/presets/long_range_arena.py)
    return config

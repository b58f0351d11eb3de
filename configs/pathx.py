"""Path-X as in LRA: Pathfinder at 128x128 pixels = 16,384 tokens; are the markers connected?

The same task as configs/pathfinder.py at 128x128, with the published 128x128 generator
parameters (paddle margins 2-3, 8 distractors, ...). The images are generated on first use
into `config.data_dir` (160K/20K/20K: about 7 minutes with 2 worker processes on a shared
2-core CPU, 3.1 GiB on disk; 20K measured: 42 s, 29 CPU-seconds), or by
  python -m lra.data prepare pathx --data_dir ~/.cache/lra/pathx
and a folder holding the LRA release (``pathfinder128/curv_contour_length_14/``) is
converted once instead. 16,384 tokens: dense softmax attention needs about 1 GiB per head
and example for its scores; `attention=memory_efficient` computes the same in O(L) memory.

Launch (from the repository root):
  python launch.py --config configs/pathx.py:runlocal --workdir runs/pathx-local
  python launch.py --config configs/pathx.py:preset=lra,attention=linear,seed=0 --workdir runs/pathx
runlocal keeps the task (128x128 images, 16,384 tokens) with few images and steps; unless
an attention is named it uses `local` (softmax needs ~24 GiB per layer at this length on a
CPU).
Expected test accuracy: chance (50%): the LRA paper (Table 1) reports that no model learns
Path-X ("FAIL"). runlocal: 50.0% measured (4 min 19 s, generation included, on a shared
2-core CPU at load ~12).
"""

import os

from configs import common

# s5 = S5's released settings for this task (lra/presets/s5.py; runs attention=s5);
# spt = Amos et al. 2024's self-pretraining protocol (lra/presets/spt.py; pretrain + fine-tune)
PRESETS = ("lra", "s5", "spt")  # lra = the LRA paper's Path-X hyperparameters

TRAIN_EXAMPLES = 160_000


def get_config(arg=None):
    # runlocal without a named mixer: local, linear in length (a CPU runs 16,384 tokens)
    args = common.parse_arg(arg, PRESETS, runlocal_attention="local")
    config = common.base_config("pathx", args)
    # Generator settings: LRA's 160K/20K/20K split of 200K images at 128x128.
    config.prepare.num_train = TRAIN_EXAMPLES
    config.prepare.num_val = 20_000
    config.prepare.num_test = 20_000
    config.prepare.seed = 0  # the data, unlike the model, does not change with `seed`
    config.prepare.resolution = 128  # 256 is an option too (set max_length to 65,536)

    # preset=lra: 1 layer, width 32, qkv 16, 2 heads, MLP 32, dropout 0.1, mean pooling,
    # learned positions, batch 64, 500K steps (200 epochs of 2,500), cosine decay from 1e-3
    # after a one-epoch warmup, gradients clipped to norm 1, no weight decay (LRA's base
    # Pathfinder-128 config).
    steps_per_epoch = TRAIN_EXAMPLES // 64
    config.max_length = 128 * 128
    config.batch_size = 64
    config.eval_batch_size = 64
    config.num_train_steps = 200 * steps_per_epoch  # 500,000
    config.learning_rate = 1e-3
    config.warmup_steps = steps_per_epoch  # 2,500
    config.schedule = "cosine"
    config.weight_decay = 0.0
    config.grad_clip = 1.0
    config.eval_every = steps_per_epoch  # every epoch on the 20,000 validation images
    config.checkpoint_every = steps_per_epoch
    config.model.num_layers = 1
    config.model.emb_dim = 32
    config.model.qkv_dim = 16
    config.model.num_heads = 2
    config.model.mlp_dim = 32
    config.model.dropout = 0.1
    config.model.attention_dropout = 0.1
    config.model.pooling = "mean"
    config.model.positions = "learned"

    if args["runlocal"]:
        # A CPU run of a few minutes, generation included: 128x128 images, few of them.
        config.data_dir = os.path.join(common.DATA_ROOT, "pathx-runlocal")
        config.prepare.num_train = 800
        config.prepare.num_val = 100
        config.prepare.num_test = 100
        config.batch_size = 8
        config.eval_batch_size = 16
        config.num_train_steps = 100
        config.warmup_steps = 10
        config.eval_every = 100
        config.checkpoint_every = 50
        config.log_every = 10
        config.model.dropout = 0.0
        config.model.attention_dropout = 0.0
    common.apply_released(config, args)  # preset=s5 (Path-X has no LRA preset rows)
    return config

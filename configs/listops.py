"""ListOps (Nangia & Bowman, 2018) as in LRA: 10-way classification of nested MIN/MAX/MED/SM lists.

Sequences of 500-2000 tokens from our offline generator (faithful to the LRA one); the data is
generated on first use into `config.data_dir` (or `python -m lra.data prepare listops ...`).

Launch (from the repository root):
  python launch.py --config configs/listops.py:runlocal --workdir runs/listops-local
  python launch.py --config configs/listops.py:preset=lra,attention=softmax,seed=0 --workdir runs/listops
Expected test accuracy: runlocal 32-35% (34.2% test, best val 34.0%, measured at commit
81b5c55 on a 2-core CPU in 1 min 49 s with `make demo`; a fresh clone of the commit before
printed 32.4% / 33.4%, most likely float rounding; majority class 15.6%);
preset=lra softmax: the LRA paper (Table 1) reports 36.37%.
"""

import os

from configs import common

# s5 = S5's released settings for this task (lra/presets/s5.py; runs attention=s5);
# spt = Amos et al. 2024's self-pretraining protocol (lra/presets/spt.py; pretrain + fine-tune)
PRESETS = ("lra", "s5", "spt")  # lra = the released LRA ListOps hyperparameters


def get_config(arg=None):
    args = common.parse_arg(arg, PRESETS)
    config = common.base_config("listops", args)
    # Generator settings (LRA: 96K/2K/2K, 500 < tokens < 2000).
    config.prepare.num_train = 96_000
    config.prepare.num_val = 2_000
    config.prepare.num_test = 2_000
    config.prepare.seed = 0  # the data, unlike the model, does not change with `seed`
    config.prepare.min_length = 500
    config.prepare.max_length = 2000

    # preset=lra: 4 layers, width 512, 8 heads, MLP 1024, batch 32, 5K steps, Adam b2 0.98,
    # weight decay 0.1, 1K warmup then rsqrt decay from a peak of 0.05 / sqrt(1000).
    config.max_length = 2000
    config.batch_size = 32
    config.eval_batch_size = 64
    config.num_train_steps = 5000
    config.learning_rate = 0.05 / 1000**0.5
    config.warmup_steps = 1000
    config.schedule = "rsqrt"
    config.weight_decay = 0.1
    config.eval_every = 500
    config.checkpoint_every = 500
    config.model.num_layers = 4
    config.model.emb_dim = 512
    config.model.qkv_dim = 512
    config.model.num_heads = 8
    config.model.mlp_dim = 1024
    config.model.pooling = "cls"

    if args["runlocal"]:
        # A CPU run of a few minutes, data generation included: shorter lists, a small model.
        config.data_dir = os.path.join(common.DATA_ROOT, "listops-runlocal")
        config.prepare.num_train = 6_000
        config.prepare.num_val = 500
        config.prepare.num_test = 500
        config.prepare.min_length = 20
        config.prepare.max_length = 128
        config.max_length = 128
        config.batch_size = 32
        config.num_train_steps = 1000
        config.learning_rate = 1e-3
        config.warmup_steps = 100
        config.eval_every = 250
        config.checkpoint_every = 250
        config.log_every = 50
        common.set_runlocal_model(config.model, num_layers=2, emb_dim=64, qkv_dim=64,
                                  num_heads=4, mlp_dim=128)
    common.apply_released(config, args)  # LRA's released settings (lra/presets/long_range_arena.py)
    return config

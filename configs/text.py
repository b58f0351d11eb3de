"""Byte-level Text (IMDB reviews, Maas et al. 2011) as in LRA: sentiment of a review read as bytes, 2 classes.

Each review is its UTF-8 bytes (token = byte + 1, 0 = padding), the first 4,000 kept (the
paper's 4K; `--config.max_length=1000` reads LRA's 1K option from the same files). The data
comes from tfds `imdb_reviews` (an 80 MiB download) and is converted once; this needs the
tfds extra (`pip install 'lra[tfds]'`), training does not:
  python -m lra.data prepare text --data_dir ~/.cache/lra/text
preset=lra follows LRA's protocol: train on all 25,000 training reviews and validate on the
test split (text_classification/input_pipeline.py in LRA's release evaluates on tfds "test"
for both), prepared into its own folder:
  python -m lra.data prepare text --data_dir ~/.cache/lra/text-valtest --validation test
A held-out validation split instead (2,500 train reviews chosen by a fixed seed, 22,500 left
to train on; the test split stays the 25,000 test reviews):
  python -m lra.data prepare text --data_dir ~/.cache/lra/text --validation heldout
  python launch.py --config configs/text.py --workdir runs/text-heldout \
      --config.data_dir ~/.cache/lra/text --config.prepare.validation heldout
runlocal reads a small subset (4,000 / 500 / 1,000 reviews of 256 bytes), made from tfds's
copy without a second download:
  python -m lra.data prepare text --data_dir ~/.cache/lra/text-runlocal \
      --max_length 256 --num_train 4000 --num_val 500 --num_test 1000
Offline, the prepare command says which archive to fetch and where to put it
(`--tfds_data_dir` picks tfds's data folder; default ~/tensorflow_datasets).
($LRA_DATA_DIR replaces ~/.cache/lra when set.)

Launch (from the repository root):
  python launch.py --config configs/text.py:runlocal --workdir runs/text-local
  python launch.py --config configs/text.py:preset=lra,attention=softmax,seed=0 --workdir runs/text
Expected test accuracy: preset=lra softmax: the LRA paper (Table 1) reports 64.27% (chance
50%). runlocal: a smoke test of the pipeline (a few minutes on a 2-core CPU); its accuracy on
real IMDB is not measured here (tfds cannot download in this project's CI) and is expected
to stay near chance: 256 bytes and 400 steps are too little for byte-level sentiment.
"""

import os

from configs import common

# s5 = S5's released settings for this task (lra/presets/s5.py; runs attention=s5);
# spt = Amos et al. 2024's self-pretraining protocol (lra/presets/spt.py; pretrain + fine-tune)
PRESETS = ("lra", "s5", "spt")  # lra = the released LRA text-classification hyperparameters, at 4K bytes


def get_config(arg=None):
    args = common.parse_arg(arg, PRESETS)
    config = common.base_config("text", args)
    # Nothing is generated at launch: the data comes from the prepare commands above (see
    # lra/tasks/text.py); `config.prepare` holds the flags that the missing-data message adds.

    # preset=lra: 4 layers, width 256, 4 heads, MLP 1024, batch 32, 20K steps, AdamW b2 0.98,
    # weight decay 0.1, CLS pooling; "constant * linear_warmup * rsqrt_decay" with constant
    # 0.05 and 8,000 warmup steps, i.e. a peak of 0.05 / sqrt(8000) = 5.6e-4 then rsqrt decay.
    config.max_length = 4000  # bytes per review (the prepared files hold 4,000)
    # LRA's protocol: all 25,000 train reviews, validation = the test split. "heldout" =
    # 2,500 train reviews held out; the data folder must have been prepared the same way.
    config.prepare.validation = "test"
    config.data_dir = os.path.join(common.DATA_ROOT, "text-valtest")
    config.batch_size = 32
    config.eval_batch_size = 32
    config.num_train_steps = 20_000
    config.learning_rate = 0.05 / 8000**0.5
    config.warmup_steps = 8000
    config.schedule = "rsqrt"
    config.weight_decay = 0.1
    config.eval_every = 1000  # 2,500 validation reviews; test too whenever validation improves
    config.checkpoint_every = 1000
    config.model.num_layers = 4
    config.model.emb_dim = 256
    config.model.qkv_dim = 256
    config.model.num_heads = 4
    config.model.mlp_dim = 1024
    config.model.pooling = "cls"

    if args["runlocal"]:
        # A CPU run of a few minutes on the small subset prepared above, a small model (2
        # heads: on CPU each head costs more than its share of the width).
        config.data_dir = os.path.join(common.DATA_ROOT, "text-runlocal")
        # The subset the prepare command above makes (named in the missing-data message).
        config.prepare.validation = "heldout"
        config.prepare.max_length = 256
        config.prepare.num_train = 4_000
        config.prepare.num_val = 500
        config.prepare.num_test = 1_000
        config.max_length = 256
        config.batch_size = 32
        config.eval_batch_size = 100
        config.num_train_steps = 400
        config.learning_rate = 1e-3
        config.warmup_steps = 40
        config.eval_every = 200
        config.checkpoint_every = 200
        config.log_every = 25
        common.set_runlocal_model(config.model, num_layers=2, emb_dim=64, qkv_dim=64,
                                  num_heads=2, mlp_dim=128)
    common.apply_released(config, args)  # LRA's released settings (lra/presets/long_range_arena.py)
    return config

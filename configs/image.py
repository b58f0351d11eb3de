"""Pixel Image (CIFAR-10, Krizhevsky 2009) as in LRA: a 32x32 grayscale image read as 1,024 pixels, 10 classes.

Each pixel is one token, its 8-bit gray level (0-255; black is a real token, the mask comes
from lengths), computed exactly as LRA's `tf.image.rgb_to_grayscale`. The data comes from
tfds `cifar10` (a 162 MiB download) and is converted once; this needs the tfds extra
(`pip install 'lra[tfds]'`), training does not:
  python -m lra.data prepare image --data_dir ~/.cache/lra/image
Splits as LRA: train = the first 45,000 train images, validation = the last 5,000, test =
all 10,000 test images. `--validation test` prepares LRA's other protocol (train on 50,000,
validate on test) into another folder (`--config.data_dir` selects it). runlocal reads a
small subset (5,000 / 500 / 1,000 images), made from tfds's copy without a second download:
  python -m lra.data prepare image --data_dir ~/.cache/lra/image-runlocal \
      --num_train 5000 --num_val 500 --num_test 1000
Offline, the prepare
command says which archive to fetch and where to put it (`--tfds_data_dir` picks tfds's data
folder; default ~/tensorflow_datasets). ($LRA_DATA_DIR replaces ~/.cache/lra when set.)

Launch (from the repository root):
  python launch.py --config configs/image.py:runlocal --workdir runs/image-local
  python launch.py --config configs/image.py:preset=lra,attention=softmax,seed=0 --workdir runs/image
Expected test accuracy: preset=lra softmax: the LRA paper (Table 1) reports 42.44% (chance
10%). runlocal: a smoke test of the pipeline (a few minutes on a 2-core CPU); its accuracy on
real CIFAR-10 is not measured here (tfds cannot download in this project's CI).
"""

import os

from configs import common

# s5 = S5's released settings for this task (lra/presets/s5.py; runs attention=s5);
# spt = Amos et al. 2024's self-pretraining protocol (lra/presets/spt.py; pretrain + fine-tune)
PRESETS = ("lra", "s5", "spt")  # lra = the LRA paper's CIFAR-10 hyperparameters

TRAIN_EXAMPLES = 45_000  # images in the train split (the rest of tfds train is validation)


def get_config(arg=None):
    args = common.parse_arg(arg, PRESETS)
    config = common.base_config("image", args)
    # Nothing is generated at launch: the data comes from the prepare commands above (see
    # lra/tasks/image.py); `config.prepare` holds the flags that the missing-data message adds.

    # preset=lra: 1 layer, width 128, 8 heads of 8 (qkv 64), MLP 128, dropout 0.3, batch 256,
    # 35K steps (200 epochs of 175 steps), peak 5e-4 after a one-epoch warmup, cosine decay,
    # no weight decay, learned positions, CLS pooling: LRA's image/configs/cifar10/
    # transformer_base.py (the model sizes) over base_cifar10_config.py (the rest; its own
    # model is width 32, 1 head, MLP 64). Other attentions get the sizes of their own
    # released files (lra/presets/long_range_arena.py, applied at the end).
    steps_per_epoch = TRAIN_EXAMPLES // 256
    config.max_length = 1024  # 32 x 32 pixels
    config.batch_size = 256
    config.eval_batch_size = 256
    config.num_train_steps = 200 * steps_per_epoch  # 35,000
    config.learning_rate = 5e-4
    config.warmup_steps = steps_per_epoch  # one epoch: 175 steps
    config.schedule = "cosine"
    config.weight_decay = 0.0
    config.eval_every = 5 * steps_per_epoch  # every 5 epochs on the 5,000 validation images
    config.checkpoint_every = 5 * steps_per_epoch
    config.model.num_layers = 1
    config.model.emb_dim = 128
    config.model.qkv_dim = 64
    config.model.num_heads = 8
    config.model.mlp_dim = 128
    config.model.dropout = 0.3
    config.model.attention_dropout = 0.2
    config.model.positions = "learned"
    config.model.pooling = "cls"

    if args["runlocal"]:
        # A CPU run of a few minutes on the small subset prepared above: whole images, a
        # small model with one head (1,024 x 1,024 attention per head dominates on CPU).
        config.data_dir = os.path.join(common.DATA_ROOT, "image-runlocal")
        # The subset the prepare command above makes (named in the missing-data message).
        config.prepare.num_train = 5_000
        config.prepare.num_val = 500
        config.prepare.num_test = 1_000
        config.batch_size = 32
        config.eval_batch_size = 100
        config.num_train_steps = 300
        config.learning_rate = 1e-3
        config.warmup_steps = 30
        config.eval_every = 150
        config.checkpoint_every = 150
        config.log_every = 25
        common.set_runlocal_model(config.model, num_layers=1, emb_dim=32, qkv_dim=32,
                                  num_heads=1, mlp_dim=64)
    common.apply_released(config, args)  # LRA's released settings (lra/presets/long_range_arena.py)
    return config

"""Retrieval (AAN, Radev et al. 2013) as in LRA: do two papers have a citation link? 2 classes.

Byte-level: each document is its first 4,000 bytes. One encoder tower, shared by both
documents, gives u and v; the head is MLP([u, v, u*v, u-v]). The data must be downloaded
(https://storage.googleapis.com/long-range-arena/lra_release.gz) and converted once:
  tar xzf lra_release.gz
  mkdir -p ~/.cache/lra/retrieval && cp lra_release/tsv_data/new_aan_pairs.*.tsv ~/.cache/lra/retrieval/
  python -m lra.data prepare retrieval --data_dir ~/.cache/lra/retrieval
and, for runlocal, a small subset of it (2,000 / 500 / 500 pairs, 256 bytes per document):
  python -m lra.data prepare retrieval --data_dir ~/.cache/lra/retrieval-runlocal \
      --source_dir ~/.cache/lra/retrieval --num_train 2000 --num_val 500 --num_test 500 --max_length 256
($LRA_DATA_DIR replaces ~/.cache/lra when set.)

Launch (from the repository root):
  python launch.py --config configs/retrieval.py:runlocal --workdir runs/retrieval-local
  python launch.py --config configs/retrieval.py:preset=lra,attention=softmax,seed=0 --workdir runs/retrieval
Expected test accuracy: preset=lra softmax: the LRA paper (Table 1) reports 57.46% (chance
is about 50%). runlocal is a smoke test of the pipeline and stays near chance: on a synthetic
AAN-format subset of the same size it reached val 53.8% / test 47.8% after 500 steps, using
8.3 CPU-minutes in all (22 min wall on a 2-core CPU shared with other jobs; on two idle
cores that is roughly 4-5 min, not measured).
Its accuracy on the real subset is not measured here (the release could not be downloaded).
"""

import os

from configs import common

# s5 = S5's released settings for this task (lra/presets/s5.py; runs attention=s5);
# spt = Amos et al. 2024's self-pretraining protocol (lra/presets/spt.py; pretrain + fine-tune)
PRESETS = ("lra", "s5", "spt")  # lra = the released LRA matching (AAN) hyperparameters, warmup shortened


def get_config(arg=None):
    args = common.parse_arg(arg, PRESETS)
    config = common.base_config("retrieval", args)
    # Nothing is generated at launch: the data comes from the prepare commands above (see
    # lra/tasks/retrieval.py); `config.prepare` holds the flags that the missing-data message adds.

    # preset=lra: 4 layers, width 128, 4 heads, MLP 512, batch 32, 5K steps, AdamW b2 0.98,
    # weight decay 0.1, CLS pooling, 4,000 bytes per document. The released config warms up
    # for 8,000 steps of its 5,000 ("constant * linear_warmup * rsqrt_decay", constant 0.05), so
    # its rate rises linearly to 3.5e-4 and never decays. We keep that rate scale, a peak of
    # 0.05 / sqrt(8000) = 5.6e-4, reached after a 1,000-step warmup (as ListOps), then rsqrt decay.
    config.max_length = 4000  # bytes per document (each of the two)
    config.batch_size = 32
    config.eval_batch_size = 32
    config.num_train_steps = 5000
    config.learning_rate = 0.05 / 8000**0.5
    config.warmup_steps = 1000
    config.schedule = "rsqrt"
    config.weight_decay = 0.1
    config.eval_every = 500
    config.checkpoint_every = 500
    config.model.num_layers = 4
    config.model.emb_dim = 128
    config.model.qkv_dim = 128
    config.model.num_heads = 4
    config.model.mlp_dim = 512  # also the hidden width of the [u, v, u*v, u-v] head
    config.model.pooling = "cls"

    if args["runlocal"]:
        # A CPU run of a few minutes on the small subset prepared above, a small model.
        config.data_dir = os.path.join(common.DATA_ROOT, "retrieval-runlocal")
        # The subset the prepare command above makes (named in the missing-data message).
        config.prepare.source_dir = os.path.join(common.DATA_ROOT, "retrieval")
        config.prepare.max_length = 256
        config.prepare.num_train = 2_000
        config.prepare.num_val = 500
        config.prepare.num_test = 500
        config.max_length = 256
        config.batch_size = 32
        config.num_train_steps = 500
        config.learning_rate = 1e-3
        config.warmup_steps = 50
        config.eval_every = 250
        config.checkpoint_every = 250
        config.log_every = 25
        common.set_runlocal_model(config.model, num_layers=2, emb_dim=64, qkv_dim=64,
                                  num_heads=4, mlp_dim=128)
    common.apply_released(config, args)  # LRA's released settings (lra/presets/long_range_arena.py)
    return config

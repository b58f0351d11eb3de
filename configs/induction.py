"""Induction heads (lra/tasks/induction.py) with the Mamba paper's training setting: train at
length 256, test at a longer length (the extrapolation split).

Launch (from the repository root):
  python launch.py --config configs/induction.py:runlocal --workdir runs/induction-local
  python launch.py --config configs/induction.py:mixer=mamba2 --workdir runs/induction-mamba2
  python launch.py --config configs/induction.py:mixer=softmax --workdir runs/induction-mha \
      --config.prepare.test_seq_len=4096

max_length follows the longer of prepare.seq_len and prepare.test_seq_len (the model's
position range); a token task's batches are padded to their own split's width only, so
training runs at seq_len and only the test split at test_seq_len (lra/training/data.py).

Preset `mamba` (the only one): Gu & Dao 2023, "Mamba", section 4.1.2 and appendix E.1:
2-layer models, model dimension 64 for Mamba (here mamba2, the one selective SSM of this
repository) and 128 for the others, multi-head attention with 8 heads; batch 8; Adam
without weight decay at a constant learning rate, 1e-3 for Mamba and 2e-4 for the others
(the better of the two the paper tried for each); "epochs" of 8,192 steps, with accuracy
tracked on fixed validation sets after each; results after 25 epochs (204,800 steps) for
Mamba and absolute-position attention, 50 (409,600) for attention with rotary positions,
which the attention mixers get here (the paper's MHA-RoPE; sequence models get none).
Not given by the paper, so this repository's: no dropout, each mixer's own block
(Mamba and the other sequence models without an MLP; attention with an MLP 4x wide, as the
H3 paper's synthetic models, safari's ``d_inner``), torch's Adam betas (0.9, 0.999) and
eps 1e-8. The paper draws new data every step; here training cycles over num_train
examples (lra/tasks/induction.py).
"""

from configs import common
from lra.models import mixers

PRESETS = ("mamba",)
EPOCH_STEPS = 8192  # the paper's "epoch"
SELECTIVE_SSM = "mamba2"  # the paper's Mamba setting applies to this mixer
# Data folder names, in this order: v16-L256-T1024-n100000-nval1000-ntest1000-s0.
SHORT = {"vocab_size": "v", "seq_len": "L", "test_seq_len": "T", "num_train": "n",
         "num_val": "nval", "num_test": "ntest", "seed": "s"}


def get_config(arg=None):
    args = common.parse_arg(arg, PRESETS)
    config = common.base_config("induction_heads", args)
    config.objective = "token_classify"
    prepare = config.prepare
    prepare.vocab_size = 16
    prepare.seq_len = 256
    prepare.test_seq_len = 1024
    prepare.num_train = 100_000
    prepare.num_val = 1_000
    prepare.num_test = 1_000
    prepare.seed = 0
    train_length, test_length = prepare.get_ref("seq_len"), prepare.get_ref("test_seq_len")
    config.max_length = (train_length + test_length + abs(train_length - test_length)) // 2
    config.data_dir = common.settings_folder("induction_heads", prepare, SHORT)

    selective = args["attention"] == SELECTIVE_SSM
    attention = mixers.is_attention(args["attention"])
    model = config.model
    model.num_layers = 2
    model.emb_dim = 64 if selective else 128
    model.qkv_dim = model.get_ref("emb_dim") * 1  # follows emb_dim unless set itself
    model.num_heads = 8
    model.mlp_dim = 4 * model.get_ref("emb_dim")
    model.causal = True
    model.pooling = "last"
    model.dropout = 0.0
    model.attention_dropout = 0.0
    model.positions = "rope" if attention else "none"

    config.batch_size = 8
    config.eval_batch_size = 32
    config.learning_rate = 1e-3 if selective else 2e-4
    config.warmup_steps = 0
    config.schedule = "constant"
    config.weight_decay = 0.0  # Adam, no weight decay
    config.adam_b1 = 0.9
    config.adam_b2 = 0.999
    config.adam_eps = 1e-8
    config.num_train_steps = (50 if attention else 25) * EPOCH_STEPS
    config.eval_every = EPOCH_STEPS
    config.checkpoint_every = EPOCH_STEPS
    config.log_every = 512

    if args["runlocal"]:
        # A short CPU run: fewer examples and steps, a shorter test length, the model kept.
        prepare.test_seq_len = 512
        prepare.num_train = 10_000
        prepare.num_val = 500
        prepare.num_test = 500
        config.num_train_steps = 500
        config.eval_every = 250
        config.checkpoint_every = 250
        config.log_every = 50
    return config

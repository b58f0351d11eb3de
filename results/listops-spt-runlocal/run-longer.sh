#!/bin/sh
# A longer pretraining budget (README "Self-pretraining"): softmax with rotary positions,
# seeds 0-2. scratch: 3,000 steps. spt: 2,000 steps of masked_lm (10%) + 1,000 of
# fine-tuning: the same 3,000 steps in all.
set -e
COMMON="--config configs/listops.py:runlocal --sweep seed=0,1,2
  --config.model.positions=rope --config.model.pooling=mean --config.eval_every=250"
python launch.py $COMMON --workdir runs/listops-spt-runlocal/scratch-3000 --config.num_train_steps=3000
python launch.py $COMMON --workdir runs/listops-spt-runlocal/spt-2000 --config.num_train_steps=1000 \
  --config.spt.pretrain_steps=2000 --config.mask_rate=0.1

#!/bin/sh
# Self-pretraining evidence on this CPU (README "Self-pretraining"): ListOps runlocal,
# rotary positions, mean pooling; softmax and linear attention, seeds 0-2.
# scratch: 2,000 steps of classification.  spt: 1,000 steps of masked_lm (10% masked,
# Amos et al.'s ListOps rate) + 1,000 steps of fine-tuning: the same 2,000 steps in all.
set -e
COMMON="--config configs/listops.py:runlocal --sweep attention=softmax,linear --sweep seed=0,1,2
  --config.model.positions=rope --config.model.pooling=mean --config.eval_every=250"
python launch.py $COMMON --workdir runs/listops-spt-runlocal/scratch --config.num_train_steps=2000
python launch.py $COMMON --workdir runs/listops-spt-runlocal/spt --config.num_train_steps=1000 \
  --config.spt.pretrain_steps=1000 --config.mask_rate=0.1

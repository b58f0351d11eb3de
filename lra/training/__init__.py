"""Training: from a resolved config to a finished run folder.

`train.train_and_evaluate(config, workdir)` is the trainer; around it live the jitted step's
pieces and the run's bookkeeping, one module each: `loop` (device-side metrics), `data`
(batches, data preparation and its command), `objectives` (classify, causal_lm,
masked_lm), `pretraining` (init_from and the SPT protocol), `checkpoints` (orbax),
`validation` (config checks before anything compiles), `workdir` (config.json,
results.json), `logs` (metrics.jsonl, TensorBoard, progress).

May import: lra.models, lra.tasks, lra.parallel, lra.common. Never lra.experiments,
lra.presets or lra.bench (they import this package).
"""

"""lra: Long Range Arena tasks and attention variants in JAX/Flax NNX.

Entry points: `python -m lra.launch` = `lra-train` = the checkout's `launch.py` (training
runs from config files), `python -m lra.data prepare` (data), `python -m lra.report`,
`python -m lra.bench`, `lra.training.train.train_and_evaluate`, the registries `lra.models.attention`
and `lra.tasks`.
"""

__version__ = "0.1.0"

"""Models: the one encoder (`encoder.py`) and the attention registry (`attention/`)."""

from lra.models.encoder import Classifier, Encoder, build_model

__all__ = ["Classifier", "Encoder", "build_model"]

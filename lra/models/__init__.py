"""Models: the one encoder (`encoder.py`), the attention registry (`attention/`) and
token-by-token classification with causal kernelized encoders (`decode.py`)."""

from lra.models.decode import classify_stepwise
from lra.models.encoder import Classifier, DualEncoderClassifier, Encoder, build_model

__all__ = ["Classifier", "DualEncoderClassifier", "Encoder", "build_model", "classify_stepwise"]

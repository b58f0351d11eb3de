"""Models: the one encoder (`encoder.py`: embeddings, positions, the pre-norm block, pooling,
heads), its layer stack (`stack.py`), norms, rotary positions, the language-model head, the
constructor `build_model` (`build.py`), token-by-token classification (`decode.py`), and the
two registries: attention cores (`attention/`) and token mixers (`mixers/`).

May import: lra.common only (never lra.training, lra.parallel or anything above).
"""

from lra.models.build import build_model
from lra.models.decode import classify_stepwise
from lra.models.encoder import Classifier, DualEncoderClassifier, Encoder

__all__ = ["Classifier", "DualEncoderClassifier", "Encoder", "build_model", "classify_stepwise"]

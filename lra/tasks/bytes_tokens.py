"""Byte-level tokens shared by the byte tasks (Text, Retrieval).

A document is its UTF-8 bytes; byte ``b`` is token ``b + 1`` and token 0 is padding,
so every byte value (NUL included) is a real token. Documents longer than
``max_length`` bytes are cut to their first ``max_length`` bytes (possibly inside a
multi-byte character, as the LRA byte tokenizer does).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PAD = 0  # token of padding positions
OFFSET = 1  # byte b is token b + OFFSET
VOCAB_SIZE = 256 + OFFSET  # 257: padding + the 256 byte values
DTYPE = np.uint16  # holds tokens 0..256


def encode_bytes(texts: Sequence[str | bytes], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Byte tokens of documents, cut to `max_length` and padded with `PAD`.

    Args:
        texts: documents; a ``str`` is encoded as UTF-8, ``bytes`` are used as they are.
        max_length: tokens kept per document (at least 1).

    Returns:
        (tokens [N, max_length] uint16, lengths [N] int32): ``tokens[i, :lengths[i]]`` are
        the first bytes of document i plus 1, the rest is 0.

    Raises:
        ValueError: `max_length` below 1.
        TypeError: a document is neither ``str`` nor ``bytes``.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    pieces = []
    for index, text in enumerate(texts):
        if isinstance(text, str):
            text = text.encode("utf-8", errors="surrogateescape")
        elif not isinstance(text, (bytes, bytearray)):
            raise TypeError(f"document {index} is a {type(text).__name__}; expected str or bytes")
        pieces.append(bytes(text[:max_length]))
    lengths_N = np.fromiter((len(piece) for piece in pieces), np.int32, len(pieces))
    tokens_NxL = np.zeros((len(pieces), max_length), DTYPE)
    if pieces:
        flat = np.frombuffer(b"".join(pieces), np.uint8).astype(DTYPE) + OFFSET
        tokens_NxL[np.arange(max_length) < lengths_N[:, None]] = flat  # row-major order
    return tokens_NxL, lengths_N


def decode_bytes(tokens: np.ndarray, length: int | None = None) -> bytes:
    """The bytes of one encoded document (the inverse of `encode_bytes` for one row).

    Args:
        tokens: [L] tokens of one document.
        length: real tokens; default: all tokens before the first `PAD`.

    Returns:
        The document's bytes.
    """
    tokens = np.asarray(tokens)
    if length is None:
        padding = np.flatnonzero(tokens == PAD)
        length = int(padding[0]) if len(padding) else len(tokens)
    return (tokens[:length].astype(np.int64) - OFFSET).astype(np.uint8).tobytes()

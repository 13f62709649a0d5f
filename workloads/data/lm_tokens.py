"""Token sources for the language-model workload.

Three sources give batches of ``(batch, context_length + 1)`` token ids, inputs and
next-token targets in one tensor:

- :class:`ZipfLanguage`, a synthetic language generated in-process: each token follows
  the one before it by a Zipf law over ranks, the rank order being a different
  permutation of the vocabulary for every previous token. Its entropy per token is known, so
  the irreducible loss of a scaling-law fit is known too.
- :class:`TokenArray` over a ``uint16`` token file read by memory map.
- :func:`parquet_tokens`, a Parquet text column tokenised to bytes or by a local
  ``tokenizers`` JSON file, then served as a :class:`TokenArray`.

File sources hold out their last :data:`VALIDATION_FRACTION` for validation.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch

from orchestrator.errors import UserError

logger = logging.getLogger("frontier.data")

VALIDATION_FRACTION = 0.1
"""Share of a token file held out, from its end, for validation."""
_SAMPLE_CHECK_TOKENS = 1 << 20
"""Tokens of a file scanned by :func:`check_token_file` (a cheap, partial check)."""


class ZipfLanguage:
    """A first-order Markov language with Zipf-distributed next-token ranks.

    The token after ``a`` is ``(mult[a] * r + shift[a]) mod V``, where ``r`` is a
    Zipf(``exponent``) rank in ``[0, V)`` and ``mult[a]`` is coprime with ``V``, so
    every previous token orders the vocabulary its own way. Its patterns, the pairs
    ``(a, r)``, thus have Zipf-tailed frequencies; a model needs about ``V^2`` numbers to
    know them all (the capacity bottleneck) and sees rare ranks rarely (the data one).
    The language is fixed by ``(vocab_size, exponent, language_seed)``; samples by the
    generator passed to :meth:`batch`.
    """

    def __init__(self, vocab_size: int, exponent: float, language_seed: int = 0) -> None:
        self.vocab_size = vocab_size
        ranks = torch.arange(1, vocab_size + 1, dtype=torch.float64)
        probs = ranks.pow(-exponent)
        self.rank_probs = probs / probs.sum()
        self._cdf = self.rank_probs.cumsum(0).float()

        gen = torch.Generator().manual_seed(language_seed)
        coprime = torch.tensor(
            [m for m in range(1, vocab_size) if math.gcd(m, vocab_size) == 1] or [1]
        )
        self._mult = coprime[torch.randint(len(coprime), (vocab_size,), generator=gen)]
        self._shift = torch.randint(vocab_size, (vocab_size,), generator=gen)

    @property
    def entropy_nats(self) -> float:
        """Entropy of the next token given its context: the loss floor, in nats."""
        p = self.rank_probs
        return float(-(p * p.log()).sum())

    def batch(self, batch_size: int, length: int, generator: torch.Generator) -> torch.Tensor:
        """``(batch_size, length)`` token ids."""
        tokens = torch.empty(batch_size, length, dtype=torch.long)
        tokens[:, 0] = torch.randint(self.vocab_size, (batch_size,), generator=generator)
        uniform = torch.rand(batch_size, length, generator=generator)
        ranks = torch.searchsorted(self._cdf, uniform).clamp_(max=self.vocab_size - 1)
        for t in range(1, length):
            previous = tokens[:, t - 1]
            tokens[:, t] = (self._mult[previous] * ranks[:, t] + self._shift[previous]) % (
                self.vocab_size
            )
        return tokens


class TokenArray:
    """Random windows of a 1-D token array; the last tenth is the validation split."""

    def __init__(self, tokens: np.ndarray, source: str) -> None:
        self.tokens = tokens
        self.source = source
        self.split_at = int(len(tokens) * (1 - VALIDATION_FRACTION))

    def batch(
        self, batch_size: int, length: int, generator: torch.Generator, *, split: str
    ) -> torch.Tensor:
        start, stop = (0, self.split_at) if split == "train" else (self.split_at, len(self.tokens))
        if stop - start <= length:
            raise UserError(
                f"data_path: {self.source} has {stop - start} {split} tokens, fewer than "
                f"context_length + 1 = {length}; use a longer corpus or a shorter context"
            )
        offsets = torch.randint(start, stop - length + 1, (batch_size,), generator=generator)
        index = offsets.numpy()[:, None] + np.arange(length)[None, :]
        return torch.from_numpy(self.tokens[index].astype(np.int64))


def check_token_file(path: str, vocab_size: int, context_length: int) -> None:
    """Cheap checks of a uint16 token file: it exists, its size, its first token ids."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"data_path: no file at {path}; give a uint16 token file")
    size = file.stat().st_size
    if size % 2:
        raise UserError(f"data_path: {path} has an odd byte count; expected uint16 tokens")
    needed = math.ceil((context_length + 1) / VALIDATION_FRACTION) + 1
    if size // 2 < needed:
        raise UserError(
            f"data_path: {path} holds {size // 2} tokens; context_length {context_length} "
            f"needs at least {needed} (a tenth is held out for validation)"
        )
    head = np.memmap(file, dtype=np.uint16, mode="r")[:_SAMPLE_CHECK_TOKENS]
    if int(head.max()) >= vocab_size:
        raise UserError(
            f"data_path: {path} has token id {int(head.max())} >= vocab_size {vocab_size}; "
            "raise vocab_size to the tokenizer's vocabulary"
        )


def token_file(path: str) -> TokenArray:
    return TokenArray(np.memmap(path, dtype=np.uint16, mode="r"), path)


def _load_tokenizer(spec: str):  # -> tokenizers.Tokenizer
    try:
        from tokenizers import Tokenizer
    except ImportError as error:
        raise UserError(
            f"tokenizer: the tokenizers package is missing ({error}); pip install tokenizers"
        ) from error
    if not Path(spec).is_file():
        raise UserError(f"tokenizer: no file at {spec}; give 'bytes' or a tokenizers JSON file")
    try:
        return Tokenizer.from_file(spec)
    except Exception as error:  # tokenizers raises a bare Exception on bad JSON
        raise UserError(f"tokenizer: {spec} is not a tokenizers JSON file ({error})") from error


def tokenizer_vocab_size(spec: str) -> int:
    return 256 if spec == "bytes" else _load_tokenizer(spec).get_vocab_size()


def check_parquet(path: str, column: str, tokenizer: str, vocab_size: int) -> None:
    """Cheap checks of a Parquet corpus: schema, text column, tokenizer, vocabulary."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not Path(path).exists():
        raise UserError(f"data_path: no Parquet file or folder at {path}")
    try:
        schema = pq.read_schema(path) if Path(path).is_file() else pq.ParquetDataset(path).schema
    except (pa.ArrowException, OSError) as error:
        raise UserError(f"data_path: {path} is not readable Parquet ({error})") from error
    if column not in schema.names:
        raise UserError(
            f"text_column: {path} has no column '{column}'; columns: {', '.join(schema.names)}"
        )
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise UserError(f"text_column: column '{column}' of {path} is {kind}, not text")
    needed = tokenizer_vocab_size(tokenizer)
    if needed > vocab_size:
        raise UserError(
            f"vocab_size: {vocab_size} is smaller than the tokenizer's {needed}; raise it"
        )


def parquet_tokens(path: str, column: str, tokenizer: str) -> TokenArray:
    """Tokenise a Parquet text column; documents are joined with a separator token
    (byte 0 for ``bytes``; none for a tokenizers file, whose own post-processor may
    add special tokens)."""
    import pyarrow.parquet as pq

    texts = pq.read_table(path, columns=[column]).column(column).to_pylist()
    texts = [t for t in texts if t]
    if tokenizer == "bytes":
        joined = b"\x00".join(t.encode("utf-8") for t in texts)
        ids = np.frombuffer(joined, dtype=np.uint8).astype(np.uint16)
    else:
        encoded = _load_tokenizer(tokenizer).encode_batch(texts)
        ids = np.fromiter((i for e in encoded for i in e.ids), dtype=np.int64)
    logger.info("tokenised %d documents of %s into %d tokens", len(texts), path, len(ids))
    return TokenArray(ids, path)

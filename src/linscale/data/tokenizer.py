"""Tokenizers: raw UTF-8 bytes (no training) or byte-level BPE trained with `tokenizers`.

Both map any UTF-8 text to ids and back exactly. The end-of-text token `EOS` separates
documents; it never comes out of `encode` (text that contains the string "<|endoftext|>" is
encoded as ordinary text), so only the data pipeline puts it in the stream.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

EOS = "<|endoftext|>"
BYTES_VOCAB = 257  # 256 byte values + EOS
MIN_BPE_VOCAB = BYTES_VOCAB + 1  # at least one merge


class Tokenizer:
    """Text <-> token ids. Build with `byte_tokenizer()`, `train_bpe(...)` or `Tokenizer.load(path)`."""

    def __init__(self, name: str, vocab_size: int, eos_id: int, backend: Any = None) -> None:
        self.name = name
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self._tok = backend  # a tokenizers.Tokenizer, or None for bytes

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"

    def encode(self, text: str) -> list[int]:
        if self._tok is None:
            return list(text.encode("utf-8"))
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts; for BPE the work runs multi-threaded in Rust."""
        if self._tok is None:
            return [list(t.encode("utf-8")) for t in texts]
        encodings = self._tok.encode_batch_fast(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids) -> str:
        """Text of `ids` (a list, NumPy array or tensor); EOS comes out as the string EOS."""
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        if self._tok is not None:
            return self._tok.decode(ids, skip_special_tokens=False)
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if 0 <= i < 256:
                run.append(i)
                continue
            if i != self.eos_id:
                raise ValueError(f"token id {i} is outside the byte tokenizer's vocabulary (0..{self.vocab_size - 1})")
            parts.append(bytes(run).decode("utf-8", errors="replace"))
            parts.append(EOS)
            run = []
        parts.append(bytes(run).decode("utf-8", errors="replace"))
        return "".join(parts)

    def save(self, path: Path) -> None:
        """Write the tokenizer as one JSON file (atomically)."""
        path = Path(path)
        if self._tok is None:
            text = json.dumps({"type": "bytes", "vocab_size": self.vocab_size, "eos": EOS, "eos_id": self.eos_id})
        else:
            text = self._tok.to_str()
        from linscale.data.shards import atomic_write

        atomic_write(path, text.encode("utf-8"))

    @classmethod
    def load(cls, path: Path) -> Tokenizer:
        """Read a file written by `save`; ValueError naming the file when it is not a tokenizer."""
        path = Path(path)
        hint = "expected a tokenizer.json written by linscale (byte or BPE tokenizer)"
        try:
            text = path.read_text(encoding="utf-8")
            data = json.loads(text)
        except FileNotFoundError:
            raise ValueError(f"tokenizer file {path} does not exist; {hint}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a tokenizer file ({e}); {hint}") from None
        if isinstance(data, dict) and data.get("type") == "bytes":
            return byte_tokenizer()
        if not isinstance(data, dict) or "model" not in data:
            raise ValueError(f"{path} is not a tokenizer file (no byte type or BPE model in it); {hint}")
        from tokenizers import Tokenizer as HFTokenizer

        try:
            tok = HFTokenizer.from_str(text)
        except Exception as e:  # the Rust side raises plain Exception
            raise ValueError(f"{path} is not a valid tokenizers JSON file ({e}); {hint}") from None
        return _wrap(tok, path)


def _wrap(tok: Any, source: Any) -> Tokenizer:
    eos_id = tok.token_to_id(EOS)
    if eos_id is None:
        raise ValueError(f"tokenizer {source} has no {EOS} token; train it with linscale (train_bpe)")
    tok.encode_special_tokens = True  # EOS in a document's text stays text
    vocab = tok.get_vocab_size(with_added_tokens=True)
    return Tokenizer(f"bpe-{vocab}", vocab, eos_id, tok)


def byte_tokenizer() -> Tokenizer:
    """Ids 0..255 are the UTF-8 bytes, 256 is EOS: vocabulary 257, no training."""
    return Tokenizer("bytes", BYTES_VOCAB, 256)


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` tokens (EOS included) on `texts`, offline.

    Every byte is in the initial alphabet, so any UTF-8 text round-trips even if it was never
    seen in training. A small corpus may stop merging before `vocab_size` is reached.
    """
    if vocab_size < MIN_BPE_VOCAB:
        raise ValueError(
            f"BPE vocab_size={vocab_size} is too small: the minimum is {MIN_BPE_VOCAB} "
            f"(256 bytes + {EOS} + 1 merge); use the byte tokenizer for a vocabulary of {BYTES_VOCAB}"
        )
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return _wrap(tok, "trained by train_bpe")

"""Tokenizers that need no download: bytes, the toy task's alphabet, a BPE trained here, and a pretrained
model's own tokenizer.json.

Every tokenizer has BOS, EOS and PAD ids and knows how many UTF-8 bytes each id stands for
(0 for special ids), which turns a summed loss into bits per byte.
"""

from __future__ import annotations

import hashlib
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path

import numpy as np

from mta_lab.config.data import TokenizerConfig, TokenizerKind
from mta_lab.data.cache import cache_dir


class Tokenizer(ABC):
    name: str
    """Identity of the tokenizer (kind and, for BPE, a hash of its vocabulary): datasets record it."""
    vocab_size: int
    bos: int
    eos: int
    pad: int

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without special tokens."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special ids are dropped."""

    @abstractmethod
    def _byte_lengths(self) -> np.ndarray: ...

    @cached_property
    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each id stands for, (vocab_size,) int64; 0 for BOS, EOS, PAD."""
        return self._byte_lengths()

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    @property
    def special_ids(self) -> tuple[int, ...]:
        return (self.bos, self.eos, self.pad)


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes 0-255, then BOS 256, EOS 257, PAD 258 (259 unused): 260 ids."""

    name = "byte"
    vocab_size = 260
    bos, eos, pad = 256, 257, 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def _byte_lengths(self) -> np.ndarray:
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        lengths[:256] = 1
        return lengths


class CharTokenizer(Tokenizer):
    """The official toy-task alphabet (spec 3.2): a-z = 0-25, '.' 26, '#' 27, '_' 28, BOS 29, EOS 30,
    PAD 31: 32 ids."""

    name = "char"
    alphabet = "abcdefghijklmnopqrstuvwxyz.#_"
    vocab_size = 32
    bos, eos, pad = 29, 30, 31

    def encode(self, text: str) -> list[int]:
        try:
            return [self.alphabet.index(c) for c in text]
        except ValueError:
            bad = sorted({c for c in text if c not in self.alphabet})
            raise ValueError(f"the char tokenizer encodes only '{self.alphabet}', not {bad[:10]}") from None

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.alphabet[i] for i in ids if i < len(self.alphabet))

    def _byte_lengths(self) -> np.ndarray:
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        lengths[: len(self.alphabet)] = 1
        return lengths


class _FileTokenizer(Tokenizer):
    """A ``tokenizer.json`` of the ``tokenizers`` library, used without its special tokens (mta-lab
    places BOS and EOS itself)."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer

        self.path = path
        self._tokenizer = HFTokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)


class BPETokenizer(_FileTokenizer):
    """A byte-level BPE (``tokenizers``): every byte sequence encodes, nothing is unknown."""

    SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>")

    def __init__(self, path: Path):
        super().__init__(path)
        self.vocab_size = self._tokenizer.get_vocab_size()
        self.bos, self.eos, self.pad = (self._tokenizer.token_to_id(s) for s in self.SPECIALS)
        digest = hashlib.sha256(json.dumps(self._tokenizer.get_vocab(), sort_keys=True).encode()).hexdigest()
        self.name = f"bpe-{self.vocab_size}-{digest[:12]}"

    def _byte_lengths(self) -> np.ndarray:
        # A byte-level token's string maps each byte to one printable character (GPT-2's table).
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for token, index in self._tokenizer.get_vocab().items():
            lengths[index] = 0 if token in self.SPECIALS else len(token)
        return lengths


class PretrainedTokenizer(_FileTokenizer):
    """A pretrained model's ``tokenizer.json`` with its BOS and EOS ids (EOS also pads: padded positions
    are never scored). Bits per byte count each token's bytes: byte-level BPEs (GPT-2's table, one
    character per byte), SentencePiece-style vocabularies ("\u2581" for a space, ``<0xNN>`` byte tokens)."""

    def __init__(self, path: Path, bos: int, eos: int):
        super().__init__(path)
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos, self.eos, self.pad = bos, eos, eos
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        self.name = f"pretrained-{self.vocab_size}-{digest[:12]}"

    def _byte_lengths(self) -> np.ndarray:
        spec = json.loads(self._tokenizer.to_str())
        byte_level = '"ByteLevel"' in json.dumps(spec.get("decoder"))
        specials = {token["content"] for token in spec.get("added_tokens", []) if token.get("special")}
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for token, index in self._tokenizer.get_vocab(with_added_tokens=True).items():
            if token in specials:
                continue
            if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
                lengths[index] = 1
            else:
                lengths[index] = len(token) if byte_level else len(token.replace("\u2581", " ").encode())
        return lengths


def train_bpe(texts: Iterable[str], vocab_size: int, path: Path) -> BPETokenizer:
    """Train a byte-level BPE on ``texts`` and save it to ``path``."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(BPETokenizer.SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    tokenizer.save(str(partial))
    partial.replace(path)
    return BPETokenizer(path)


def cached_bpe(texts: Sequence[str], vocab_size: int) -> BPETokenizer:
    """A BPE trained on ``texts``, reused from the cache when the same text was seen before."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(hashlib.sha256(text.encode("utf-8")).digest())
    path = cache_dir() / "tokenizers" / f"bpe-{vocab_size}-{digest.hexdigest()[:16]}.json"
    return BPETokenizer(path) if path.is_file() else train_bpe(texts, vocab_size, path)


def fixed_tokenizer(config: TokenizerConfig) -> Tokenizer | None:
    """The tokenizer a config names when it needs no training data (byte, char, or a BPE file)."""
    if config.kind == TokenizerKind.byte:
        return ByteTokenizer()
    if config.kind == TokenizerKind.char:
        return CharTokenizer()
    if config.kind == TokenizerKind.pretrained:
        return PretrainedTokenizer(Path(config.path), config.bos_id, config.eos_id)
    if config.path is not None:
        return BPETokenizer(Path(config.path))
    return None

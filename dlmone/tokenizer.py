"""Lower-cased BERT-style WordPiece tokenizer (SPEC §2).

Text is normalised and split into words exactly as ``bert-base-uncased`` does it
(HF ``tokenizers``: ``BertNormalizer(lowercase=True)`` + ``BertPreTokenizer``), and
words are split into pieces by greedy longest-match WordPiece with the ``##``
continuation prefix. A :class:`Tokenizer` is fully described by its vocabulary
(a ``vocab.txt``, one token a line, line number = id), so a BERT ``vocab.txt``
can be loaded to reuse DiffuSeq checkpoints, or a vocabulary can be trained on
the training split.

Training is done here, in Python, rather than with ``tokenizers``'
``WordPieceTrainer``: that trainer breaks ties between equally frequent merges by
hash-map order, so the same texts give a different vocabulary in every process.
:meth:`Tokenizer.train` runs the same algorithm (BPE-style merges of the most
frequent adjacent pair of pieces, where a merge is counted by word frequency)
with ties broken by the pieces' text, so the same texts always give the same
``vocab.txt``.

:meth:`Tokenizer.encode` adds no ``[CLS]``/``[SEP]``; :mod:`dlmone.data` lays
out the examples. :meth:`Tokenizer.decode` recovers text the way DiffuSeq's
evaluation does (see its docstring).

Batches go through C (``csrc/core/text.c``) without per-token Python: ASCII texts
are encoded there and rows of ids decoded there, with the same results as
``tokenizers`` and :meth:`Tokenizer.decode`, which remain the reference and handle
what the C path leaves to them (non-ASCII texts; tokens holding whitespace).
"""

from __future__ import annotations

import heapq
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Union

import numpy as np
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import models, normalizers, pre_tokenizers

from . import _core
from .checkpoint import atomic_write_bytes

__all__ = [
    "PAD_TOKEN",
    "UNK_TOKEN",
    "CLS_TOKEN",
    "SEP_TOKEN",
    "MASK_TOKEN",
    "SPECIAL_TOKENS",
    "VOCAB_FILENAME",
    "Tokenizer",
    "clean_up_tokenization",
]

PAD_TOKEN = "[PAD]"
UNK_TOKEN = "[UNK]"
CLS_TOKEN = "[CLS]"
SEP_TOKEN = "[SEP]"
MASK_TOKEN = "[MASK]"
#: Special tokens of a trained vocabulary, in id order ([PAD] = 0).
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, CLS_TOKEN, SEP_TOKEN, MASK_TOKEN)
#: Special tokens every vocabulary must contain.
REQUIRED_TOKENS = (PAD_TOKEN, UNK_TOKEN, CLS_TOKEN, SEP_TOKEN)
#: Tokens that decoding removes, as DiffuSeq's evaluation does.
_STRUCTURAL_TOKENS = (CLS_TOKEN, SEP_TOKEN, PAD_TOKEN)
VOCAB_FILENAME = "vocab.txt"
CONTINUATION_PREFIX = "##"
#: Longer words encode to a single [UNK] (the BERT setting).
MAX_CHARS_PER_WORD = 100

PathLike = Union[str, os.PathLike]


def clean_up_tokenization(text: str) -> str:
    """Remove the spaces that WordPiece decoding leaves before punctuation.

    This is ``transformers``' ``clean_up_tokenization`` (applied by BERT
    tokenizers' ``decode`` in the versions DiffuSeq used), so decoded text and
    hence BLEU tokens match DiffuSeq's: ``"what is it ?"`` -> ``"what is it?"``.
    """
    return (
        text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
    )


def _make_backend(token_to_id: dict[str, int]) -> _HFTokenizer:
    """The HF tokenizer that normalises, pre-tokenises and WordPiece-encodes."""
    backend = _HFTokenizer(
        models.WordPiece(
            token_to_id,
            unk_token=UNK_TOKEN,
            continuing_subword_prefix=CONTINUATION_PREFIX,
            max_input_chars_per_word=MAX_CHARS_PER_WORD,
        )
    )
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # Registered specials are matched verbatim in raw text (so a literal "[UNK]"
    # in a data file encodes to the [UNK] id, as with BERT) and never split.
    backend.add_special_tokens([t for t in SPECIAL_TOKENS if t in token_to_id])
    return backend


def _count_words(texts: Iterable[str]) -> Counter[str]:
    """Frequency of each normalised, pre-tokenised word in ``texts``."""
    splitter = _make_backend({UNK_TOKEN: 0})
    normalizer, pre_tokenizer = splitter.normalizer, splitter.pre_tokenizer
    counts: Counter[str] = Counter()
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{index}] is {type(text).__name__}, expected str")
        normalized = normalizer.normalize_str(text)
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalized))
    return counts


def _split_words(word_counts: Counter[str]) -> tuple[list[list[str]], list[int], list[str]]:
    """Each word as its first character followed by ``##`` characters.

    Returns:
        The split words (sorted by text), their frequencies, and the sorted
        alphabet of single-character pieces they use. Words longer than
        :data:`MAX_CHARS_PER_WORD` are left out: they always encode to [UNK].
    """
    words: list[list[str]] = []
    frequencies: list[int] = []
    for word, count in sorted(word_counts.items()):
        if len(word) <= MAX_CHARS_PER_WORD:
            words.append([word[0]] + [CONTINUATION_PREFIX + char for char in word[1:]])
            frequencies.append(count)
    alphabet = sorted({piece for symbols in words for piece in symbols})
    return words, frequencies, alphabet


def _merge_symbols(symbols: list[str], left: str, right: str, merged: str) -> list[str]:
    """``symbols`` with every adjacent ``left, right`` (left to right) replaced by ``merged``."""
    result: list[str] = []
    position = 0
    while position < len(symbols):
        if (
            position + 1 < len(symbols)
            and symbols[position] == left
            and symbols[position + 1] == right
        ):
            result.append(merged)
            position += 2
        else:
            result.append(symbols[position])
            position += 1
    return result


def _learn_merges(
    words: list[list[str]], frequencies: list[int], n_pieces: int, min_frequency: int
) -> list[str]:
    """Up to ``n_pieces`` new pieces, learned by frequency-ranked pair merges.

    Repeatedly the adjacent pair with the largest summed word frequency is
    merged (ties: the smallest ``(left, right)`` strings), until ``n_pieces``
    new pieces exist or no pair occurs ``min_frequency`` times. ``words`` is
    updated in place.
    """
    pair_counts: Counter[tuple[str, str]] = Counter()
    words_with_pair: dict[tuple[str, str], set[int]] = {}
    for index, symbols in enumerate(words):
        for pair in zip(symbols, symbols[1:]):
            pair_counts[pair] += frequencies[index]
            words_with_pair.setdefault(pair, set()).add(index)
    heap = [(-count, left, right) for (left, right), count in pair_counts.items()]
    heapq.heapify(heap)

    known = {piece for symbols in words for piece in symbols}
    new_pieces: list[str] = []
    while heap and len(new_pieces) < n_pieces:
        negative_count, left, right = heapq.heappop(heap)
        count = -negative_count
        if pair_counts.get((left, right), 0) != count:
            continue  # stale entry: the pair's count changed after it was pushed
        if count < min_frequency:
            break
        merged = left + right[len(CONTINUATION_PREFIX):]
        if merged not in known:  # the same piece can come from different pairs
            known.add(merged)
            new_pieces.append(merged)
        changed: set[tuple[str, str]] = set()
        for index in sorted(words_with_pair.pop((left, right))):
            old_pairs = list(zip(words[index], words[index][1:]))
            if (left, right) not in old_pairs:
                continue  # an earlier merge removed the pair from this word
            words[index] = _merge_symbols(words[index], left, right, merged)
            for pair in old_pairs:
                pair_counts[pair] -= frequencies[index]
                changed.add(pair)
            for pair in zip(words[index], words[index][1:]):
                pair_counts[pair] += frequencies[index]
                words_with_pair.setdefault(pair, set()).add(index)
                changed.add(pair)
        for pair in changed:
            if pair_counts[pair] > 0:
                heapq.heappush(heap, (-pair_counts[pair], pair[0], pair[1]))
            else:
                del pair_counts[pair]
    return new_pieces


class Tokenizer:
    """Lower-cased WordPiece tokenizer defined by its vocabulary.

    Args:
        vocab: the tokens in id order. Must contain [PAD], [UNK], [CLS] and
            [SEP], have no duplicates, and no empty tokens or tokens with
            line breaks (so it can be written as a ``vocab.txt``).
    """

    def __init__(self, vocab: Sequence[str]):
        if isinstance(vocab, str):
            raise TypeError("vocab must be a sequence of token strings, not a single str")
        tokens = tuple(vocab)
        token_to_id: dict[str, int] = {}
        for index, token in enumerate(tokens):
            if not isinstance(token, str):
                raise TypeError(f"vocab[{index}] is {type(token).__name__}, expected str")
            if not token or "\n" in token or "\r" in token:
                raise ValueError(f"vocab[{index}] = {token!r} is empty or contains a line break")
            if token in token_to_id:
                raise ValueError(
                    f"vocab[{index}] = {token!r} duplicates vocab[{token_to_id[token]}]"
                )
            token_to_id[token] = index
        missing = [token for token in REQUIRED_TOKENS if token not in token_to_id]
        if missing:
            raise ValueError(f"vocab lacks the special tokens {missing}")
        self._tokens = tokens
        self._token_to_id = token_to_id
        self._backend = _make_backend(token_to_id)
        self._wordpiece = _core.WordPiece(
            tokens, token_to_id[UNK_TOKEN], [token_to_id[t] for t in SPECIAL_TOKENS if t in token_to_id]
        )

    # ----------------------------------------------------------- construction
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 1) -> Tokenizer:
        """Learn a vocabulary of at most ``vocab_size`` tokens from ``texts``.

        The vocabulary is [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4, then
        the single-character pieces seen in the texts, sorted (a character
        that starts a word as itself, one inside a word as ``##`` + it), then
        merged pieces in the order they were learned, less those that no training
        word uses once all merges are learned. It is smaller than ``vocab_size``
        then, and when the texts run out of pairs seen at least ``min_frequency``
        times (e.g. the built-in task saturates at 269 tokens).
        Deterministic: the same texts, in any order, give the same vocabulary.

        Raises:
            ValueError: ``vocab_size`` is too small to hold the special tokens
                and the characters of ``texts``, or ``texts`` has no words.
        """
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
            raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
        if isinstance(min_frequency, bool) or not isinstance(min_frequency, int):
            raise TypeError(f"min_frequency must be an int, got {type(min_frequency).__name__}")
        if min_frequency < 1:
            raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
        if isinstance(texts, str):
            raise TypeError("texts must be an iterable of strings, not a single str")
        word_counts = _count_words(texts)
        if not word_counts:
            raise ValueError("texts contain no words to train a vocabulary on")
        words, frequencies, alphabet = _split_words(word_counts)
        base_size = len(SPECIAL_TOKENS) + len(alphabet)
        if vocab_size < base_size:
            raise ValueError(
                f"vocab_size={vocab_size} cannot hold the {len(SPECIAL_TOKENS)} special "
                f"tokens and the {len(alphabet)} character tokens of the texts; "
                f"use vocab_size >= {base_size}"
            )
        merges = _learn_merges(words, frequencies, vocab_size - base_size, min_frequency)
        full = cls(SPECIAL_TOKENS + tuple(alphabet) + tuple(merges))
        # Intermediate merges ("ould" on the way to "should") that no training word
        # ends up using would only be untrained embeddings a diffusion LM can decode
        # into; greedy longest-match gives the training words the same pieces without them.
        used = {piece for ids in full.encode_batch(sorted(word_counts)) for piece in ids}
        kept = tuple(m for m in merges if full.token_to_id(m) in used)
        return cls(SPECIAL_TOKENS + tuple(alphabet) + kept)

    @classmethod
    def from_vocab_file(cls, path: PathLike) -> Tokenizer:
        """Load a BERT ``vocab.txt`` (one token a line; line i is id i)."""
        path = Path(path)
        try:
            with open(path, encoding="utf-8") as file:
                lines = file.read().split("\n")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text: {e}") from None
        if lines and lines[-1] == "":
            lines.pop()  # the final newline
        tokens = [line[:-1] if line.endswith("\r") else line for line in lines]
        seen: dict[str, int] = {}
        for index, token in enumerate(tokens):
            if not token:
                raise ValueError(f"{path}:{index + 1}: empty token")
            if token in seen:
                raise ValueError(
                    f"{path}:{index + 1}: token {token!r} already on line {seen[token] + 1}"
                )
            seen[token] = index
        missing = [token for token in REQUIRED_TOKENS if token not in seen]
        if missing:
            raise ValueError(f"{path}: vocabulary lacks the special tokens {missing}")
        return cls(tokens)

    @classmethod
    def load(cls, directory: PathLike) -> Tokenizer:
        """Load the tokenizer that :meth:`save` wrote to ``directory``."""
        path = Path(directory) / VOCAB_FILENAME
        if not path.is_file():
            raise FileNotFoundError(f"no {VOCAB_FILENAME} in {directory}")
        return cls.from_vocab_file(path)

    def save(self, directory: PathLike) -> Path:
        """Write ``vocab.txt`` into ``directory`` (created if needed) atomically.

        Returns:
            The path of the written ``vocab.txt``.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / VOCAB_FILENAME
        atomic_write_bytes(target, ("\n".join(self._tokens) + "\n").encode("utf-8"))
        return target

    # ------------------------------------------------------------- properties
    @property
    def vocab(self) -> tuple[str, ...]:
        """The tokens in id order."""
        return self._tokens

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    @property
    def pad_id(self) -> int:
        return self._token_to_id[PAD_TOKEN]

    @property
    def unk_id(self) -> int:
        return self._token_to_id[UNK_TOKEN]

    @property
    def cls_id(self) -> int:
        return self._token_to_id[CLS_TOKEN]

    @property
    def sep_id(self) -> int:
        return self._token_to_id[SEP_TOKEN]

    def token_to_id(self, token: str) -> int | None:
        """The id of ``token``, or None when it is not in the vocabulary."""
        return self._token_to_id.get(token)

    def id_to_token(self, token_id: int) -> str:
        """The token with id ``token_id`` (IndexError when out of range)."""
        if not 0 <= token_id < len(self._tokens):
            raise IndexError(f"token id {token_id} is outside [0, {len(self._tokens)})")
        return self._tokens[token_id]

    # --------------------------------------------------------------- encoding
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without [CLS]/[SEP]."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` of each text."""
        ids, offsets = self.encode_flat(texts)
        flat, bounds = ids.tolist(), offsets.tolist()
        return [flat[start:end] for start, end in zip(bounds[:-1], bounds[1:])]

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`encode` of each text, concatenated: ``ids`` int32[total] and
        ``offsets`` int64[N + 1]; text i's ids are ``ids[offsets[i]:offsets[i + 1]]``.

        ASCII texts are encoded in C, the others by ``tokenizers``
        (:meth:`encode_reference`).
        """
        if not isinstance(texts, (list, tuple, str)):
            texts = list(texts)
        ids, offsets, backend_rows = self._wordpiece.encode(texts)
        if backend_rows:
            rows = [ids[start:end] for start, end in zip(offsets[:-1], offsets[1:])]
            for row, row_ids in zip(backend_rows, self.encode_reference([texts[r] for r in backend_rows])):
                rows[row] = np.asarray(row_ids, dtype=np.int32)
            offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
            ids = np.concatenate(rows).astype(np.int32, copy=False)
        return ids, offsets

    def encode_reference(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode_batch` by HF ``tokenizers`` (BertNormalizer + BertPreTokenizer +
        WordPiece): the definition the C encoder reproduces."""
        encodings = self._backend.encode_batch(list(texts), add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of ``ids``, recovered as DiffuSeq's decoding + evaluation does.

        Tokens are joined with spaces and ``##`` pieces glued to the piece
        before them, spaces before punctuation removed
        (:func:`clean_up_tokenization`), then the strings [CLS], [SEP] and
        [PAD] deleted and whitespace collapsed. Other tokens ([UNK], [MASK])
        stay as written, as in DiffuSeq.
        """
        array = np.asarray(ids)
        if array.ndim != 1:
            raise ValueError(f"ids must be one-dimensional, got shape {array.shape}")
        if array.size and not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"ids must be integers, got dtype {array.dtype}")
        if array.size and (array.min() < 0 or array.max() >= len(self._tokens)):
            raise ValueError(
                f"ids must lie in [0, {len(self._tokens)}), got range "
                f"[{array.min()}, {array.max()}]"
            )
        text = " ".join(self._tokens[i] for i in array.tolist())
        text = clean_up_tokenization(text.replace(" " + CONTINUATION_PREFIX, "").strip())
        for token in _STRUCTURAL_TOKENS:
            text = text.replace(token, "")
        return " ".join(text.split())

    def decode_batch(self, rows: Iterable[Sequence[int] | np.ndarray]) -> list[str]:
        """:meth:`decode` of each row."""
        return [self.decode(row) for row in rows]

    def decode_selected(self, ids: np.ndarray, selected: np.ndarray) -> list[str]:
        """:meth:`decode` of each row's selected tokens, ``ids[r][selected[r]]``, for
        ``ids`` [N, L] and ``selected`` bool [N, L]; in C, but for rows holding a token
        with whitespace in it (and ids of a non-integer dtype), which :meth:`decode` takes.
        """
        ids, selected = np.asarray(ids), np.asarray(selected)
        if ids.ndim != 2 or selected.shape != ids.shape or selected.dtype != np.bool_:
            raise ValueError(
                f"ids must be [N, L] and selected a bool array of the same shape, got shapes "
                f"{ids.shape} and {selected.shape} ({selected.dtype})"
            )
        if not np.issubdtype(ids.dtype, np.integer):
            return [self.decode(row[keep]) for row, keep in zip(ids, selected)]
        if ids.dtype not in (np.int32, np.int64):
            ids = ids.astype(np.int64)
        texts = self._wordpiece.decode(np.ascontiguousarray(ids), np.ascontiguousarray(selected))
        for row in [r for r, text in enumerate(texts) if text is None]:
            texts[row] = self.decode(ids[row][selected[row]])
        return texts

    # ------------------------------------------------------------------ misc
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Tokenizer):
            return NotImplemented
        return self._tokens == other._tokens

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, pad_id={self.pad_id}, "
            f"unk_id={self.unk_id}, cls_id={self.cls_id}, sep_id={self.sep_id})"
        )

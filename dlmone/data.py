"""DiffuSeq-format seq2seq data: reading, layout of examples, decoding (SPEC §2).

Files are DiffuSeq's jsonl, one ``{"src": ..., "trg": ...}`` object a line, in
split files ``train.jsonl``, ``valid.jsonl``, ``test.jsonl`` (each may also be
gzip-compressed as ``<split>.jsonl.gz``). Values are stripped of surrounding
whitespace on reading, as DiffuSeq does; other keys are ignored.

An example of length L is laid out as DiffuSeq's ``merge_and_mask`` does it::

    [CLS] src… [SEP] [SEP] [CLS] trg… [SEP] [PAD] …
    mask: 0 …              0     1 …            1 …

See :func:`build_example` for the truncation rule.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import sys
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol, Union

import numpy as np

from .checkpoint import atomic_write_bytes

__all__ = [
    "Pair",
    "SPLITS",
    "ReadStats",
    "iter_jsonl",
    "write_jsonl",
    "find_split",
    "load_split",
    "build_example",
    "encode_pairs",
    "encode_sources",
    "decode_targets",
    "decode_sources",
    "Seq2SeqData",
    "read_sources",
    "read_lines",
    "read_generations",
]

#: One example: (source text, target text).
Pair = tuple[str, str]
PathLike = Union[str, os.PathLike]
#: The split names of a DiffuSeq data folder.
SPLITS = ("train", "valid", "test")
#: Shortest layout that keeps at least one content token: 5 special tokens + 1.
MIN_SEQ_LEN = 6


class TokenizerLike(Protocol):
    """What the encoding/decoding functions need from a tokenizer."""

    pad_id: int
    cls_id: int
    sep_id: int

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]: ...

    def decode_selected(self, ids: np.ndarray, selected: np.ndarray) -> list[str]: ...


# ---------------------------------------------------------------------- files
@dataclass
class ReadStats:
    """Counts from one :func:`iter_jsonl` pass (filled in as lines are read).

    Attributes:
        pairs: pairs yielded.
        blank_lines: empty or whitespace-only lines, skipped silently.
        bad_lines: 1-based numbers of the malformed lines that were skipped
            (only with ``skip_bad_lines=True``; otherwise the first one raises).
    """

    pairs: int = 0
    blank_lines: int = 0
    bad_lines: list[int] = field(default_factory=list)

    @property
    def n_bad_lines(self) -> int:
        return len(self.bad_lines)


def _parse_line(raw: bytes, line_number: int) -> Pair:
    """The (src, trg) of one jsonl line; ValueError saying what is wrong."""
    try:
        text = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"not UTF-8 ({error.reason} at byte {error.start})") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"not JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    values = []
    for key in ("src", "trg"):
        if key not in record:
            raise ValueError(f"missing key {key!r} (keys: {sorted(record)})")
        if not isinstance(record[key], str):
            raise ValueError(f"{key!r} is {type(record[key]).__name__}, expected a string")
        values.append(record[key].strip())
    return values[0], values[1]


def iter_jsonl(
    path: PathLike, skip_bad_lines: bool = False, stats: ReadStats | None = None
) -> Iterator[Pair]:
    """Stream the (src, trg) pairs of a DiffuSeq jsonl file (``.gz`` read transparently).

    Args:
        path: a ``.jsonl`` file, or a gzip-compressed one named ``*.gz``.
        skip_bad_lines: skip malformed lines (not UTF-8, not JSON, not an
            object, no ``src``/``trg``, a value that is not a string) instead of
            raising; their line numbers go to ``stats.bad_lines``.
        stats: a :class:`ReadStats` to fill in while reading.

    Raises:
        ValueError: ``"<path>:<line>: <what is wrong>"`` for the first
            malformed line (unless ``skip_bad_lines``), or a corrupt gzip stream.
    """
    path = Path(path)
    stats = stats if stats is not None else ReadStats()
    compressed = path.suffix == ".gz"
    opener = gzip.open if compressed else open
    line_number = 0
    with opener(path, "rb") as file:
        try:
            for line_number, raw in enumerate(file, start=1):
                if not raw.strip():
                    stats.blank_lines += 1
                    continue
                try:
                    pair = _parse_line(raw, line_number)
                except ValueError as error:
                    if not skip_bad_lines:
                        raise ValueError(f"{path}:{line_number}: {error}") from None
                    stats.bad_lines.append(line_number)
                    continue
                stats.pairs += 1
                yield pair
        except (EOFError, gzip.BadGzipFile, zlib.error) as error:
            raise ValueError(
                f"{path}: corrupt gzip data after line {line_number}: {error}"
            ) from None


def write_jsonl(path: PathLike, pairs: Iterable[Pair]) -> Path:
    """Write pairs as DiffuSeq jsonl, atomically (temporary file + rename).

    A ``.gz`` path is gzip-compressed (with a zero timestamp, so the bytes
    depend on the pairs only). Returns the path written.
    """
    path = Path(path)
    buffer = io.BytesIO()
    if path.suffix == ".gz":
        with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as gz_file:
            _write_pairs(gz_file, pairs)
    else:
        _write_pairs(buffer, pairs)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _write_pairs(file: IO[bytes], pairs: Iterable[Pair]) -> None:
    for index, pair in enumerate(pairs):
        src, trg = _check_pair(pair, index)
        line = json.dumps({"src": src, "trg": trg}, ensure_ascii=False) + "\n"
        file.write(line.encode("utf-8"))


def _check_pair(pair: object, index: int) -> Pair:
    if (
        not isinstance(pair, (tuple, list))
        or len(pair) != 2
        or not all(isinstance(text, str) for text in pair)
    ):
        raise TypeError(f"pairs[{index}] must be a (src, trg) pair of strings, got {pair!r:.80}")
    return pair[0], pair[1]


def _check_split_name(split: str) -> None:
    if not isinstance(split, str) or not split or "/" in split or os.sep in split:
        raise ValueError(f"split must be a plain file stem such as 'train', got {split!r}")


def find_split(data_dir: PathLike, split: str) -> Path:
    """The file of ``split`` in ``data_dir``: ``<split>.jsonl`` or ``<split>.jsonl.gz``.

    Raises:
        FileNotFoundError: neither exists (the message lists the jsonl files
            that do), or ``data_dir`` is not a directory.
        ValueError: both exist, so which to read is ambiguous.
    """
    _check_split_name(split)
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data directory {data_dir} does not exist")
    candidates = [data_dir / f"{split}.jsonl", data_dir / f"{split}.jsonl.gz"]
    present = [path for path in candidates if path.is_file()]
    if len(present) == 2:
        raise ValueError(f"both {present[0]} and {present[1]} exist; remove one")
    if not present:
        available = sorted(
            path.name for path in data_dir.iterdir() if path.name.endswith((".jsonl", ".jsonl.gz"))
        )
        raise FileNotFoundError(
            f"no {split}.jsonl or {split}.jsonl.gz in {data_dir}; "
            f"jsonl files there: {available or 'none'}"
        )
    return present[0]


def load_split(
    data_dir: PathLike,
    split: str,
    limit: int | None = None,
    skip_bad_lines: bool = False,
    stats: ReadStats | None = None,
) -> list[Pair]:
    """The (src, trg) pairs of one split of a DiffuSeq data folder.

    Args:
        limit: read at most this many pairs (the first ones); None reads all.
        skip_bad_lines, stats: as in :func:`iter_jsonl`.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
        raise TypeError(f"limit must be an int or None, got {type(limit).__name__}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    pairs: list[Pair] = []
    if limit == 0:
        return pairs
    for pair in iter_jsonl(find_split(data_dir, split), skip_bad_lines, stats):
        pairs.append(pair)
        if len(pairs) == limit:
            break
    return pairs


@dataclass
class Seq2SeqData:
    """The train/valid/test pairs of a seq2seq task (absent splits are empty)."""

    train: list[Pair] = field(default_factory=list)
    valid: list[Pair] = field(default_factory=list)
    test: list[Pair] = field(default_factory=list)

    @classmethod
    def from_dir(
        cls, data_dir: PathLike, splits: Sequence[str] = SPLITS, limit: int | None = None
    ) -> Seq2SeqData:
        """Read ``splits`` (each must exist) from a DiffuSeq data folder.

        Malformed lines raise; use :func:`load_split` with
        ``skip_bad_lines=True`` and :meth:`from_pairs` to read leniently.
        ``limit`` caps the number of pairs read per split.
        """
        if isinstance(splits, str):
            raise TypeError("splits must be a sequence of split names, not a single str")
        unknown = [split for split in splits if split not in SPLITS]
        if unknown:
            raise ValueError(f"unknown splits {unknown}; choose from {SPLITS}")
        return cls(**{split: load_split(data_dir, split, limit) for split in splits})

    @classmethod
    def from_pairs(
        cls,
        train: Iterable[Pair] = (),
        valid: Iterable[Pair] = (),
        test: Iterable[Pair] = (),
    ) -> Seq2SeqData:
        """Build from in-memory pairs (checked to be pairs of strings)."""
        splits = {"train": train, "valid": valid, "test": test}
        checked: dict[str, list[Pair]] = {}
        for name, pairs in splits.items():
            try:
                checked[name] = [_check_pair(pair, index) for index, pair in enumerate(pairs)]
            except TypeError as error:
                raise TypeError(f"{name}: {error}") from None
        return cls(**checked)


# ------------------------------------------------- generation inputs (CLI files)
def _input_lines(path: PathLike) -> tuple[str, list[bytes]]:
    """(name for messages, raw lines) of a file, a ``.gz`` file, or ``-`` (stdin)."""
    if str(path) == "-":
        return "<stdin>", sys.stdin.buffer.read().splitlines()
    path = Path(path)
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise ValueError(f"{path}: corrupt gzip data: {error}") from None
    return str(path), data.splitlines()


def _decode_line(raw: bytes, name: str, line_number: int) -> str:
    try:
        return raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{name}:{line_number}: not UTF-8 ({error.reason} at byte {error.start})") from None


def _text_lines(name: str, raws: list[bytes]) -> list[str]:
    """Stripped lines; blank lines at the end are dropped, elsewhere they are an
    error (they would shift every later line against a line-aligned file)."""
    while raws and not raws[-1].strip():
        raws = raws[:-1]
    lines = []
    for line_number, raw in enumerate(raws, start=1):
        text = _decode_line(raw, name, line_number).strip()
        if not text:
            raise ValueError(f"{name}:{line_number}: empty line (one text a line; remove blank lines)")
        lines.append(text)
    if not lines:
        raise ValueError(f"{name}: no lines")
    return lines


def _source_record(text: str) -> dict | None:
    """The JSON object of a jsonl source line, or None when the line is not one."""
    if not text.lstrip().startswith("{"):
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and "src" in record else None


def _jsonl_sources(name: str, raws: list[bytes]) -> tuple[list[str], list[str] | None]:
    sources: list[str] = []
    targets: list[str] = []
    first_without_trg = first_with_trg = 0
    for line_number, raw in enumerate(raws, start=1):
        if not raw.strip():
            continue
        text = _decode_line(raw, name, line_number)
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{name}:{line_number}: not JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{name}:{line_number}: expected a JSON object, got {type(record).__name__}")
        if "src" not in record:
            raise ValueError(f"{name}:{line_number}: missing key 'src' (keys: {sorted(record)})")
        for key in ("src", "trg"):
            if key in record and not isinstance(record[key], str):
                raise ValueError(f"{name}:{line_number}: {key!r} is {type(record[key]).__name__}, "
                                 "expected a string")
        sources.append(record["src"].strip())
        if "trg" in record:
            targets.append(record["trg"].strip())
            first_with_trg = first_with_trg or line_number
        else:
            first_without_trg = first_without_trg or line_number
        if first_with_trg and first_without_trg:
            raise ValueError(f"{name}:{max(first_with_trg, first_without_trg)}: line {first_with_trg} has a "
                             f"'trg' and line {first_without_trg} has none; give a reference for every "
                             "source or for none")
    if not sources:
        raise ValueError(f"{name}: no sources")
    return sources, (targets if targets else None)


def read_sources(path: PathLike) -> tuple[list[str], list[str] | None]:
    """The sources to generate for, and their references when the file has them.

    ``path`` is a file (``.gz`` read transparently) or ``-`` for standard input, either
    plain text (one source a line) or jsonl (one ``{"src": ..., "trg": ...}`` object a
    line, ``trg`` optional but then on every line). ``*.jsonl`` names are jsonl,
    ``*.txt`` names plain text; otherwise the first non-blank line decides: a JSON
    object with a ``"src"`` key makes the file jsonl. Texts are stripped.

    Returns:
        ``(sources, references)``; ``references`` is None when the file has none.

    Raises:
        ValueError: ``"<file>:<line>: <what is wrong>"`` for a bad line (not UTF-8, not
            a JSON object with a string ``src``, a blank line inside a text file), or no
            sources at all.
    """
    name, raws = _input_lines(path)
    stem = name[:-3] if name.endswith(".gz") else name
    if stem.endswith(".jsonl"):
        return _jsonl_sources(name, raws)
    if not stem.endswith(".txt"):
        first = next(((n, raw) for n, raw in enumerate(raws, start=1) if raw.strip()), None)
        if first is not None and _source_record(_decode_line(first[1], name, first[0])) is not None:
            return _jsonl_sources(name, raws)
    return _text_lines(name, raws), None


def read_lines(path: PathLike) -> list[str]:
    """The stripped lines of a plain-text file (or ``-``, stdin), e.g. references
    line-aligned with a generation file; a blank line before the end is a ValueError
    naming it."""
    return _text_lines(*_input_lines(path))


def read_generations(path: PathLike) -> tuple[str, list[tuple[int, dict]]]:
    """The rows of a generation file (``dlmone generate``'s or DiffuSeq's jsonl), or of
    ``-`` (stdin): objects with a string ``recover``, optional string ``reference`` and
    ``source``, optional list of strings ``candidates``; other keys are ignored.
    Blank lines are skipped.

    Returns:
        ``(name, rows)``: the file's name for messages (``<stdin>`` for ``-``) and
        ``(line number, row)`` pairs.

    Raises:
        ValueError: ``"<file>:<line>: not a generation row (...)"``, or no rows.
    """
    name, raws = _input_lines(path)
    rows = []
    for line_number, raw in enumerate(raws, start=1):
        if not raw.strip():
            continue
        text = _decode_line(raw, name, line_number)
        try:
            row = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{name}:{line_number}: not a generation row (not JSON: {error.msg} "
                             f"at column {error.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{name}:{line_number}: not a generation row (a JSON "
                             f"{type(row).__name__}, not an object)")
        if not isinstance(row.get("recover"), str):
            raise ValueError(f"{name}:{line_number}: not a generation row (no string 'recover'; "
                             f"keys: {sorted(row)})")
        for key in ("reference", "source"):
            if key in row and not isinstance(row[key], str):
                raise ValueError(f"{name}:{line_number}: not a generation row ({key!r} is "
                                 f"{type(row[key]).__name__}, expected a string)")
        cands = row.get("candidates")
        if cands is not None and (not isinstance(cands, list) or not all(isinstance(c, str) for c in cands)):
            raise ValueError(f"{name}:{line_number}: not a generation row ('candidates' must be a "
                             "list of strings)")
        rows.append((line_number, row))
    if not rows:
        raise ValueError(f"{name}: empty (no generation rows)")
    return name, rows


# --------------------------------------------------------------------- layout
def _check_int(value: object, argument: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{argument} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{argument} must be >= {minimum}, got {value}")
    return int(value)


def _as_id_array(ids: Sequence[int] | np.ndarray, argument: str) -> np.ndarray:
    array = np.asarray(ids)
    if array.ndim != 1:
        raise ValueError(f"{argument} must be one-dimensional, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{argument} must hold integer token ids, got dtype {array.dtype}")
    return array


def _truncated_lengths(
    n_src: np.ndarray, n_trg: np.ndarray, seq_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """DiffuSeq's truncation of the [CLS]-prefixed sides, in closed form.

    ``n_src``/``n_trg`` count each side's [CLS] and content tokens (not its
    [SEP]). DiffuSeq loops: while ``n_src + n_trg > seq_len - 3``, drop the
    last token of the longer side, or of both when equally long. That is: the
    longer side alone absorbs the excess when it is ahead by at least the
    excess; otherwise both end at ``(seq_len - 3) // 2``.
    """
    budget = seq_len - 3
    excess = np.maximum(n_src + n_trg - budget, 0)
    lead = n_src - n_trg
    half = budget // 2
    src_absorbs = lead >= excess
    trg_absorbs = -lead >= excess
    new_src = np.where(src_absorbs, n_src - excess, np.where(trg_absorbs, n_src, half))
    new_trg = np.where(src_absorbs, n_trg, np.where(trg_absorbs, n_trg - excess, half))
    return new_src, new_trg


def _layout(
    src: tuple[np.ndarray, np.ndarray],
    trg: tuple[np.ndarray, np.ndarray],
    seq_len: int,
    cls_id: int,
    sep_id: int,
    pad_id: int,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`build_example` for many examples at once (arguments already checked).
    Each side is ``(ids, offsets)``: row i's content ids are ``ids[offsets[i]:offsets[i + 1]]``."""
    (src_ids, src_offsets), (trg_ids, trg_offsets) = src, trg
    n_src, n_trg = _truncated_lengths(np.diff(src_offsets) + 1, np.diff(trg_offsets) + 1, seq_len)
    target_start = n_src + 2
    rows = np.arange(len(n_src))
    ids = np.full((len(n_src), seq_len), pad_id, dtype=np.int32)
    ids[:, 0] = cls_id
    ids[rows, n_src] = sep_id
    ids[rows, n_src + 1] = sep_id
    ids[rows, target_start] = cls_id
    ids[rows, target_start + n_trg] = sep_id
    # Content: position j of row i holds source token j - 1 (1 <= j < n_src) and
    # target token j - target_start - 1 (target_start < j < target_start + n_trg).
    column = np.arange(seq_len)[None, :]
    is_src = (column >= 1) & (column < n_src[:, None])
    ids[is_src] = src_ids[(src_offsets[:-1, None] + column - 1)[is_src]]
    is_trg = (column > target_start[:, None]) & (column < (target_start + n_trg)[:, None])
    ids[is_trg] = trg_ids[(trg_offsets[:-1, None] + column - target_start[:, None] - 1)[is_trg]]
    mask = (column >= target_start[:, None]).astype(np.float32)
    return ids, mask


def build_example(
    src_ids: Sequence[int] | np.ndarray,
    trg_ids: Sequence[int] | np.ndarray,
    seq_len: int,
    cls_id: int,
    sep_id: int,
    pad_id: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Lay out one example exactly as DiffuSeq's ``merge_and_mask`` + padding does.

    Each side is ``[CLS] content…`` (its [SEP] comes later). While the two
    sides together are longer than ``seq_len - 3`` tokens, the last token of
    the longer side is dropped (of both when they are equally long). Then::

        ids  = [CLS] src… [SEP] [SEP] [CLS] trg… [SEP] [PAD] …   (seq_len tokens)
        mask =   0    0…    0     0     1    1…    1     1   …

    i.e. ``mask`` is 0 on the source part, its [SEP] and the separating [SEP],
    and 1 on the target part (from its [CLS]) and on all padding.

    Args:
        src_ids, trg_ids: content token ids, without [CLS]/[SEP].
        seq_len: L, at least 6.

    Returns:
        ``(ids, mask)``: ``int32[seq_len]`` and ``float32[seq_len]``.
    """
    seq_len = _check_int(seq_len, "seq_len", MIN_SEQ_LEN)
    cls_id = _check_int(cls_id, "cls_id", 0)
    sep_id = _check_int(sep_id, "sep_id", 0)
    pad_id = _check_int(pad_id, "pad_id", 0)
    src = _as_id_array(src_ids, "src_ids")
    trg = _as_id_array(trg_ids, "trg_ids")
    bounds = lambda a: np.array([0, len(a)], dtype=np.int64)  # noqa: E731
    ids, mask = _layout((src, bounds(src)), (trg, bounds(trg)), seq_len, cls_id, sep_id, pad_id)
    return ids[0], mask[0]


def encode_pairs(
    pairs: Sequence[Pair], tokenizer: TokenizerLike, seq_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenise and lay out pairs (see :func:`build_example`).

    Returns:
        ``(ids, mask)``: ``int32[N, seq_len]`` and ``float32[N, seq_len]``.
    """
    seq_len = _check_int(seq_len, "seq_len", MIN_SEQ_LEN)
    if isinstance(pairs, (str, bytes)):
        raise TypeError("pairs must be a sequence of (src, trg) pairs")
    checked = [_check_pair(pair, index) for index, pair in enumerate(pairs)]
    return _layout(
        tokenizer.encode_flat([src for src, _ in checked]),
        tokenizer.encode_flat([trg for _, trg in checked]),
        seq_len,
        tokenizer.cls_id,
        tokenizer.sep_id,
        tokenizer.pad_id,
    )


def encode_sources(
    sources: Sequence[str], tokenizer: TokenizerLike, seq_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`encode_pairs` of ``(source, "")`` pairs: the layout generation starts from."""
    seq_len = _check_int(seq_len, "seq_len", MIN_SEQ_LEN)
    if isinstance(sources, (str, bytes)):
        raise TypeError("sources must be a sequence of strings, not a single str")
    src = tokenizer.encode_flat(sources)
    no_target = (np.zeros(0, dtype=np.int32), np.zeros(len(src[1]), dtype=np.int64))
    return _layout(src, no_target, seq_len, tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id)


def _check_ids_and_mask(ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(ids)
    mask = np.asarray(mask)
    if ids.ndim != 2:
        raise ValueError(f"ids must be two-dimensional [N, L], got shape {ids.shape}")
    if mask.shape != ids.shape:
        raise ValueError(f"mask shape {mask.shape} differs from ids shape {ids.shape}")
    return ids, mask


def decode_targets(ids: np.ndarray, mask: np.ndarray, tokenizer: TokenizerLike) -> list[str]:
    """The target text of each row: the ``mask == 1`` tokens, decoded.

    Decoding (:meth:`dlmone.tokenizer.Tokenizer.decode`) glues ``##`` pieces,
    removes spaces before punctuation and deletes [CLS], [SEP] and [PAD], as
    DiffuSeq's decoding and evaluation do. Compute references the same way
    (decode the encoded references) to reproduce DiffuSeq's BLEU protocol.
    """
    ids, mask = _check_ids_and_mask(ids, mask)
    return tokenizer.decode_selected(ids, mask != 0)


def decode_sources(ids: np.ndarray, mask: np.ndarray, tokenizer: TokenizerLike) -> list[str]:
    """The source text of each row: the ``mask == 0`` tokens, decoded like targets."""
    ids, mask = _check_ids_and_mask(ids, mask)
    return tokenizer.decode_selected(ids, mask == 0)

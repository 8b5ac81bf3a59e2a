"""Tests of dlmone.data: jsonl reading, DiffuSeq's example layout, decoding."""

from __future__ import annotations

import gzip
import itertools
from pathlib import Path

import numpy as np
import pytest

from dlmone.data import (
    ReadStats,
    Seq2SeqData,
    build_example,
    decode_sources,
    decode_targets,
    encode_pairs,
    find_split,
    iter_jsonl,
    load_split,
    write_jsonl,
)
from dlmone.tokenizer import Tokenizer

from conftest import SHARED_DATA

CLS, SEP, PAD = 101, 102, 0
BERT_VOCAB = SHARED_DATA / "vocab" / "bert-base-uncased-vocab.txt"
QQP_DIR = SHARED_DATA / "qqp"
needs_bert_vocab = pytest.mark.skipif(not BERT_VOCAB.is_file(), reason="BERT vocab.txt absent")


@pytest.fixture(scope="module")
def bert() -> Tokenizer:
    return Tokenizer.from_vocab_file(BERT_VOCAB)


def diffuseq_merge_and_mask(src_content, trg_content, seq_len):
    """DiffuSeq's text_datasets.py merge_and_mask + pad_function, transcribed.

    ``input_id_x``/``input_id_y`` are what the BERT tokenizer gives:
    ``[CLS] content [SEP]``.
    """
    input_id_x = [CLS, *src_content, SEP]
    input_id_y = [CLS, *trg_content, SEP]
    end_token = input_id_x[-1]
    src = input_id_x[:-1]
    trg = input_id_y[:-1]
    while len(src) + len(trg) > seq_len - 3:
        if len(src) > len(trg):
            src.pop()
        elif len(src) < len(trg):
            trg.pop()
        else:
            src.pop()
            trg.pop()
    src.append(end_token)
    trg.append(end_token)
    ids = src + [SEP] + trg
    mask = [0] * (len(src) + 1)
    ids = ids + [PAD] * (seq_len - len(ids))
    mask = mask + [1] * (seq_len - len(mask))
    return ids, mask


# -------------------------------------------------------------------- layout
@pytest.mark.parametrize(
    "src, trg, ids, mask",
    [
        # fits: padded, mask 1 on the padding
        ([1, 2], [3], [101, 1, 2, 102, 102, 101, 3, 102, 0, 0], [0] * 5 + [1] * 5),
        # source longer: only the source is cut
        (list(range(1, 9)), [9], [101, 1, 2, 3, 4, 102, 102, 101, 9, 102], [0] * 7 + [1] * 3),
        # target longer: only the target is cut
        ([1], list(range(2, 10)), [101, 1, 102, 102, 101, 2, 3, 4, 5, 102], [0] * 4 + [1] * 6),
        # equal lengths: both cut to (10 - 3) // 2 = 3 tokens with [CLS]; one pad remains
        ([1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [101, 1, 2, 102, 102, 101, 6, 7, 102, 0],
         [0] * 5 + [1] * 5),
        # target longer by less than the excess: cut to equal, then both
        ([1, 2, 3, 4], [5, 6, 7, 8, 9, 10], [101, 1, 2, 102, 102, 101, 5, 6, 102, 0],
         [0] * 5 + [1] * 5),
        # empty sides
        ([], [], [101, 102, 102, 101, 102, 0, 0, 0, 0, 0], [0] * 3 + [1] * 7),
    ],
)  # fmt: skip
def test_build_example_hand_made(src, trg, ids, mask):
    got_ids, got_mask = build_example(src, trg, 10, CLS, SEP, PAD)
    assert got_ids.dtype == np.int32 and got_mask.dtype == np.float32
    assert got_ids.tolist() == ids
    assert got_mask.tolist() == mask


def test_build_example_matches_diffuseq_exhaustively():
    for seq_len, n_src, n_trg in itertools.product(range(6, 15), range(0, 16), range(0, 16)):
        src = list(range(1000, 1000 + n_src))
        trg = list(range(2000, 2000 + n_trg))
        ids, mask = build_example(np.array(src), trg, seq_len, CLS, SEP, PAD)
        expected_ids, expected_mask = diffuseq_merge_and_mask(src, trg, seq_len)
        assert ids.tolist() == expected_ids, (seq_len, n_src, n_trg)
        assert mask.tolist() == expected_mask, (seq_len, n_src, n_trg)
        assert len(ids) == seq_len


def test_build_example_argument_errors():
    with pytest.raises(ValueError, match="seq_len must be >= 6"):
        build_example([1], [2], 5, CLS, SEP, PAD)
    with pytest.raises(TypeError, match="seq_len must be an int"):
        build_example([1], [2], 10.0, CLS, SEP, PAD)
    with pytest.raises(TypeError, match="src_ids must hold integer"):
        build_example([1.5], [2], 10, CLS, SEP, PAD)
    with pytest.raises(ValueError, match="trg_ids must be one-dimensional"):
        build_example([1], [[2]], 10, CLS, SEP, PAD)
    with pytest.raises(ValueError, match="pad_id must be >= 0"):
        build_example([1], [2], 10, CLS, SEP, -1)


@needs_bert_vocab
def test_encode_pairs_matches_build_example(bert):
    pairs = [
        ("How can I learn Python?", "What is the best way to learn Python?"),
        ("A very long source " * 10, "short target"),
        ("", "empty source"),
    ]
    ids, mask = encode_pairs(pairs, bert, 24)
    assert ids.shape == mask.shape == (3, 24)
    assert ids.dtype == np.int32 and mask.dtype == np.float32
    for row, (src, trg) in enumerate(pairs):
        expected_ids, expected_mask = build_example(
            bert.encode(src), bert.encode(trg), 24, bert.cls_id, bert.sep_id, bert.pad_id
        )
        np.testing.assert_array_equal(ids[row], expected_ids)
        np.testing.assert_array_equal(mask[row], expected_mask)
    empty_ids, empty_mask = encode_pairs([], bert, 24)
    assert empty_ids.shape == empty_mask.shape == (0, 24)
    with pytest.raises(TypeError, match=r"pairs\[1\] must be a \(src, trg\) pair"):
        encode_pairs([("a", "b"), ("c",)], bert, 24)


@needs_bert_vocab
def test_decode_targets_and_sources(bert):
    pairs = [
        ("How can I learn Python?", "What's the best way to learn Python?"),
        ("Is Quora useful?", "Is it worth using Quora, really?"),
    ]
    ids, mask = encode_pairs(pairs, bert, 32)
    assert decode_targets(ids, mask, bert) == [
        "what's the best way to learn python?",
        "is it worth using quora, really?",
    ]
    assert decode_sources(ids, mask, bert) == ["how can i learn python?", "is quora useful?"]


@needs_bert_vocab
def test_decode_targets_strips_generated_specials_like_diffuseq(bert):
    # A generated target: [CLS] hello [PAD] , [SEP] world ##s [PAD] [PAD]. As in
    # DiffuSeq, spaces before punctuation go before the specials are deleted, so a
    # [PAD] between "hello" and "," leaves a space.
    hello, comma, world, plural = 7592, 1010, 2088, 2015
    ids = np.array([[CLS, 1, SEP, SEP, CLS, hello, PAD, comma, SEP, world, plural, PAD, PAD]])
    mask = np.array([[0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1]], dtype=np.float32)
    assert decode_targets(ids, mask, bert) == ["hello , worlds"]
    with pytest.raises(ValueError, match="differs from ids shape"):
        decode_targets(ids, mask[:, :-1], bert)
    with pytest.raises(ValueError, match="two-dimensional"):
        decode_targets(ids[0], mask[0], bert)


# --------------------------------------------------------------------- files
def write_lines(path: Path, lines: list[str]) -> Path:
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


GOOD_LINES = ['{"src": " a b ", "trg": "c"}', "", "   ", '{"trg": "f", "src": "e", "x": 1}']


@pytest.mark.parametrize("name", ["train.jsonl", "train.jsonl.gz"])
def test_iter_jsonl_reads_plain_and_gzip(tmp_path, name):
    path = write_lines(tmp_path / name, GOOD_LINES)
    stats = ReadStats()
    assert list(iter_jsonl(path, stats=stats)) == [("a b", "c"), ("e", "f")]
    assert (stats.pairs, stats.blank_lines, stats.n_bad_lines) == (2, 2, 0)


def test_iter_jsonl_handles_bom_and_crlf(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"src": "a", "trg": "b"}\r\n{"src": "c", "trg": "d"}\r\n')
    assert list(iter_jsonl(path)) == [("a", "b"), ("c", "d")]


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("{not json", "not JSON"),
        ('["a", "b"]', "expected a JSON object, got list"),
        ('{"src": "a"}', "missing key 'trg'"),
        ('{"src": 3, "trg": "b"}', "'src' is int, expected a string"),
        ('{"src": "a", "trg": null}', "'trg' is NoneType"),
    ],
)
def test_iter_jsonl_bad_line_names_file_and_line(tmp_path, bad_line, message):
    path = write_lines(tmp_path / "valid.jsonl", ['{"src": "a", "trg": "b"}', "", bad_line])
    with pytest.raises(ValueError, match=rf"valid\.jsonl:3: {message}"):
        list(iter_jsonl(path))


def test_iter_jsonl_invalid_utf8(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"src": "a", "trg": "b"}\n{"src": "\xff", "trg": "b"}\n')
    with pytest.raises(ValueError, match=r"x\.jsonl:2: not UTF-8"):
        list(iter_jsonl(path))


def test_iter_jsonl_skip_bad_lines_counts_them(tmp_path):
    lines = ['{"src": "a", "trg": "b"}', "oops", '{"src": "c"}', '{"src": "d", "trg": "e"}']
    path = write_lines(tmp_path / "x.jsonl.gz", lines)
    stats = ReadStats()
    assert list(iter_jsonl(path, skip_bad_lines=True, stats=stats)) == [("a", "b"), ("d", "e")]
    assert stats.bad_lines == [2, 3] and stats.n_bad_lines == 2 and stats.pairs == 2


def test_iter_jsonl_corrupt_gzip(tmp_path):
    path = tmp_path / "x.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"src": "a", "trg": "b"}\n' * 1000)[:-20])
    with pytest.raises(ValueError, match=r"x\.jsonl\.gz: corrupt gzip data"):
        list(iter_jsonl(path))


@pytest.mark.parametrize("name", ["out.jsonl", "out.jsonl.gz"])
def test_write_jsonl_round_trip(tmp_path, name):
    pairs = [("a \"quoted\" src", "trg ü"), ("x", "y")]
    path = write_jsonl(tmp_path / "sub" / name, pairs)
    assert list(iter_jsonl(path)) == pairs
    assert sorted(p.name for p in path.parent.iterdir()) == [name]  # no temp file left
    if name.endswith(".gz"):  # byte-identical on rewrite (zero gzip timestamp)
        first = path.read_bytes()
        assert write_jsonl(path, pairs).read_bytes() == first
    with pytest.raises(TypeError, match=r"pairs\[0\]"):
        write_jsonl(tmp_path / "bad.jsonl", [("a", 1)])
    assert not (tmp_path / "bad.jsonl").exists()


def test_find_split(tmp_path):
    write_lines(tmp_path / "train.jsonl.gz", GOOD_LINES)
    write_lines(tmp_path / "test.jsonl", GOOD_LINES)
    assert find_split(tmp_path, "train") == tmp_path / "train.jsonl.gz"
    assert find_split(tmp_path, "test") == tmp_path / "test.jsonl"
    with pytest.raises(FileNotFoundError, match=r"\['test.jsonl', 'train.jsonl.gz'\]"):
        find_split(tmp_path, "valid")
    write_lines(tmp_path / "test.jsonl.gz", GOOD_LINES)
    with pytest.raises(ValueError, match="both"):
        find_split(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_split(tmp_path / "nowhere", "train")
    with pytest.raises(ValueError, match="plain file stem"):
        find_split(tmp_path, "../train")


def test_load_split_limit(tmp_path):
    lines = [f'{{"src": "s{i}", "trg": "t{i}"}}' for i in range(5)]
    write_lines(tmp_path / "valid.jsonl", lines)
    assert load_split(tmp_path, "valid") == [(f"s{i}", f"t{i}") for i in range(5)]
    assert load_split(tmp_path, "valid", limit=2) == [("s0", "t0"), ("s1", "t1")]
    assert load_split(tmp_path, "valid", limit=0) == []
    with pytest.raises(ValueError, match="limit must be >= 0"):
        load_split(tmp_path, "valid", limit=-1)


def test_seq2seq_data(tmp_path):
    write_lines(tmp_path / "train.jsonl", ['{"src": "a", "trg": "b"}'] * 3)
    write_lines(tmp_path / "valid.jsonl.gz", ['{"src": "c", "trg": "d"}'])
    data = Seq2SeqData.from_dir(tmp_path, splits=("train", "valid"), limit=2)
    assert data == Seq2SeqData(train=[("a", "b")] * 2, valid=[("c", "d")], test=[])
    with pytest.raises(FileNotFoundError, match="test.jsonl"):
        Seq2SeqData.from_dir(tmp_path)
    with pytest.raises(ValueError, match="unknown splits"):
        Seq2SeqData.from_dir(tmp_path, splits=("dev",))
    assert Seq2SeqData.from_pairs(train=[["a", "b"]]).train == [("a", "b")]
    with pytest.raises(TypeError, match=r"valid: pairs\[0\]"):
        Seq2SeqData.from_pairs(valid=[("a", None)])


@pytest.mark.skipif(not QQP_DIR.is_dir(), reason="shared QQP data absent")
def test_real_qqp_valid_split():
    pairs = load_split(QQP_DIR, "valid")
    assert len(pairs) == 2048
    assert all(src and trg for src, trg in pairs)

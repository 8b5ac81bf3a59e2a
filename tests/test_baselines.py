"""Tests of dlmone.baselines (SPEC §7.1): the constant strings, the rows, the warning,
and SPEC's figures on the first 200 QQP test pairs."""

from __future__ import annotations

import pytest

from dlmone import metrics
from dlmone.baselines import (
    baseline_rows,
    best_constant,
    constant_strings,
    constant_warnings,
    frequent_targets,
    tokenizer_protocol,
)
from dlmone.data import load_split
from dlmone.tokenizer import Tokenizer

from conftest import SHARED_DATA

QQP = SHARED_DATA / "qqp"
BERT_VOCAB = SHARED_DATA / "vocab" / "bert-base-uncased-vocab.txt"

TRAIN = [("s1", "how do i cook rice"), ("s2", "what is love"), ("s3", "what is love"),
         ("s4", "how do i cook pasta"), ("s5", "how do i cook pasta"), ("s6", "how do i cook pasta"),
         ("s7", "why is the sky blue")]
VALID = [("v1", "how do i cook an egg"), ("v2", "how do i cook beans quickly"),
         ("v3", "what is the meaning of love")]


def test_frequent_targets_order_and_ties():
    assert frequent_targets(TRAIN, 1) == ["how do i cook pasta"]
    # "what is love" (2) before the singletons; among those, first seen first
    assert frequent_targets(TRAIN, 4) == ["how do i cook pasta", "what is love", "how do i cook rice",
                                          "why is the sky blue"]
    assert frequent_targets(TRAIN, 100) == frequent_targets(TRAIN, 4)
    with pytest.raises(ValueError, match="k must be a positive int"):
        frequent_targets(TRAIN, 0)
    with pytest.raises(ValueError, match="train is empty"):
        frequent_targets([], 3)


def test_best_constant_is_the_best_on_valid():
    refs = [trg for _, trg in VALID]
    text, score = best_constant(TRAIN, VALID, k=4)
    scores = {t: metrics.bleu([t] * len(VALID), refs) for t in frequent_targets(TRAIN, 4)}
    assert score == max(scores.values()) and scores[text] == score
    # with k = 1 only the most frequent is tried
    assert best_constant(TRAIN, VALID, k=1)[0] == "how do i cook pasta"
    with pytest.raises(ValueError, match="valid is empty"):
        best_constant(TRAIN, [], 3)


def test_baseline_rows_score_on_the_given_sources():
    sources = ["how do i cook rice fast", "what is love"]
    refs = ["how can i cook rice fast", "what is love really"]
    constants = constant_strings(TRAIN, VALID, k=4)
    rows = baseline_rows(sources, refs, constants)
    assert [r["name"] for r in rows] == ["baseline: copy the source", "baseline: most frequent train target",
                                         "baseline: best of 4 frequent targets on valid"]
    assert all(r["kind"] == "baseline" for r in rows)
    assert rows[0]["output"] is None and rows[0]["scores"] == metrics.evaluate(sources, refs)
    for row, text in zip(rows[1:], constants.values()):
        assert row["output"] == text and row["scores"] == metrics.evaluate([text, text], refs)
    with pytest.raises(ValueError, match="2 sources but 1 references"):
        baseline_rows(sources, refs[:1], constants)


def test_tokenizer_protocol_decodes_like_references():
    tok = Tokenizer.train(["How do I cook rice?", "what is love", "Why is the sky blue?"], vocab_size=60)
    to_protocol = tokenizer_protocol(tok, 16)
    # lower-cased, wordpieces glued, no space before '?'
    assert to_protocol(["a"], ["How do I cook rice ?"]) == ["how do i cook rice?"]
    # the target is truncated as it would be beside its source (seq_len 8: 5 slots for both sides)
    short = tokenizer_protocol(tok, 8)
    assert short(["what is love"], ["why is the sky blue"]) == ["why"]


def test_constant_warnings():
    baselines = [{"name": "copy", "output": None, "scores": {"bleu": 0.5}},
                 {"name": "c1", "output": "what is love", "scores": {"bleu": 0.10}},
                 {"name": "c2", "output": "how do i", "scores": {"bleu": 0.20}}]
    rows = [{"name": "good", "scores": {"bleu": 0.21}}, {"name": "bad", "scores": {"bleu": 0.2}}]
    warnings = constant_warnings(rows, baselines)
    assert len(warnings) == 1
    assert warnings[0].startswith("warning: bad: BLEU 0.2000 does not beat the constant string 'how do i'")


@pytest.mark.skipif(not (QQP / "test.jsonl").is_file(), reason="shared QQP data not found")
def test_spec_figures_on_qqp_first_200():
    """SPEC §7.1: copy-source BLEU 0.2004 and ROUGE-L 0.562, the constant
    'what is the best way to learn ?' BLEU 0.0229, on the first 200 QQP test pairs as
    written. They are the standard orientation; DiffuSeq's gives 0.1996 and 0.0240."""
    pairs = load_split(QQP, "test", limit=200)
    sources, refs = [p[0] for p in pairs], [p[1] for p in pairs]
    copy = baseline_rows(sources, refs, {})[0]["scores"]
    assert round(copy["bleu"], 4) == 0.2004 and round(copy["rouge_l"], 3) == 0.562
    assert round(copy["bleu_diffuseq"], 4) == 0.1996
    constant = baseline_rows(sources, refs, {"spec": "what is the best way to learn ?"})[1]["scores"]
    assert round(constant["bleu"], 4) == 0.0229 and round(constant["bleu_diffuseq"], 4) == 0.0240


@pytest.mark.skipif(not (QQP / "valid.jsonl").is_file() or not BERT_VOCAB.is_file(),
                    reason="shared QQP data or BERT vocabulary not found")
def test_qqp_constants_with_the_bert_tokenizer():
    """On QQP (reconstructed train, cased) through the BERT tokenizer (lower-casing, as
    generate decodes references): the most frequent target, the best of 10 on the first 300
    valid pairs, and their BLEU on the first 200 test pairs (measured values)."""
    train = load_split(QQP, "train")
    valid = load_split(QQP, "valid", limit=300)
    to_protocol = tokenizer_protocol(Tokenizer.from_vocab_file(BERT_VOCAB), 128)
    constants = constant_strings(train, valid, 10, to_protocol)
    assert list(constants.values())[0] == "How should I lose weight?"
    assert list(constants.values())[1] == "What do you think about banning 500 and 1000 rupee notes in India?"
    pairs = load_split(QQP, "test", limit=200)
    sources = [p[0] for p in pairs]
    refs = to_protocol(sources, [p[1] for p in pairs])
    rows = baseline_rows(sources, refs, constants, to_protocol)
    assert [round(r["scores"]["bleu"], 4) for r in rows] == [0.2124, 0.0111, 0.0171]

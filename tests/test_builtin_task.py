"""Tests of dlmone.builtin_task: determinism, splits, sizes, paraphrase structure."""

from __future__ import annotations

import re
from collections import Counter, defaultdict

import pytest

from dlmone import builtin_task
from dlmone.builtin_task import make_builtin_task, write_builtin_task
from dlmone.data import encode_pairs, load_split
from dlmone.metrics import bleu
from dlmone.tokenizer import Tokenizer

from conftest import SHARED_DATA

BERT_VOCAB = SHARED_DATA / "vocab" / "bert-base-uncased-vocab.txt"
SIZES = dict(n_train=4000, n_valid=300, n_test=300)


@pytest.fixture(scope="module")
def task() -> dict[str, list[tuple[str, str]]]:
    return make_builtin_task(**SIZES, seed=7)


def all_pairs(task):
    return [pair for split in ("train", "valid", "test") for pair in task[split]]


def template_pattern(template: str) -> re.Pattern[str]:
    """A regex matching renderings of ``template``, one named group a field."""
    parts = re.split(r"\{(\w+)\}", template)
    regex = "".join(
        re.escape(part) if index % 2 == 0 else rf"(?P<{part}>.+?)"
        for index, part in enumerate(parts)
    )
    return re.compile(regex)


TEMPLATES = [
    (intent.name, template, template_pattern(template))
    for intent in builtin_task._INTENTS
    for template in intent.templates
]


def parse(sentence: str) -> tuple[str, str, dict[str, str]]:
    """(intent, template, fields) of the one template that renders ``sentence``."""
    matches = [
        (name, template, match.groupdict())
        for name, template, pattern in TEMPLATES
        if (match := pattern.fullmatch(sentence))
    ]
    assert len(matches) == 1, (sentence, matches)
    return matches[0]


def test_sizes_and_determinism(task):
    assert {split: len(pairs) for split, pairs in task.items()} == {
        "train": 4000,
        "valid": 300,
        "test": 300,
    }
    assert make_builtin_task(**SIZES, seed=7) == task
    assert make_builtin_task(**SIZES, seed=8) != task


def test_sources_unique_within_and_across_splits(task):
    sources = [src for src, _ in all_pairs(task)]
    assert len(set(sources)) == len(sources)
    train_sources = {src for src, _ in task["train"]}
    assert not train_sources & {src for src, _ in task["valid"] + task["test"]}


def test_vocabulary_and_lengths(task):
    words = Counter(
        word for pair in all_pairs(task) for text in pair for word in re.findall(r"[a-z]+", text)
    )
    assert 150 <= len(words) <= 400
    lengths = [len(text.split()) for pair in all_pairs(task) for text in pair]
    assert 5 <= min(lengths) and max(lengths) <= 14


@pytest.mark.skipif(not BERT_VOCAB.is_file(), reason="BERT vocab.txt absent")
def test_every_pair_fits_seq_len_32_with_bert_vocab(task):
    bert = Tokenizer.from_vocab_file(BERT_VOCAB)
    pairs = all_pairs(task)
    src_ids = bert.encode_batch([src for src, _ in pairs])
    trg_ids = bert.encode_batch([trg for _, trg in pairs])
    assert all(bert.unk_id not in ids for ids in src_ids + trg_ids)
    # [CLS] src [SEP] [SEP] [CLS] trg [SEP] fits in 32 tokens: nothing truncated.
    assert max(len(s) + len(t) for s, t in zip(src_ids, trg_ids)) + 5 <= 32
    ids, mask = encode_pairs(pairs[:50], bert, 32)
    assert (ids[:, -1] == bert.pad_id).all()


def test_targets_paraphrase_their_sources(task):
    targets_by_source_template: dict[str, set[str]] = defaultdict(set)
    for src, trg in all_pairs(task):
        src_intent, src_template, src_fields = parse(src)
        trg_intent, trg_template, trg_fields = parse(trg)
        assert src_intent == trg_intent and src_template != trg_template
        content = set(src_fields) - set(builtin_task._SYNONYMS)
        assert {k: src_fields[k] for k in content} == {k: trg_fields[k] for k in content}
        for name, words in builtin_task._SYNONYMS.items():
            for fields in (src_fields, trg_fields):
                assert fields.get(name, words[0]) in words
        targets_by_source_template[src_template].add(trg_template)
    assert set(targets_by_source_template) == {template for _, template, _ in TEMPLATES}
    assert all(len(targets) >= 2 for targets in targets_by_source_template.values())


def test_intents_are_balanced(task):
    counts = Counter(parse(src)[0] for src, _ in all_pairs(task))
    total = sum(SIZES.values())
    assert len(counts) == len(builtin_task._INTENTS)
    assert max(counts.values()) - min(counts.values()) <= 1
    assert sum(counts.values()) == total


def test_bleu_against_the_one_reference_is_informative_but_below_one(task):
    pairs = task["valid"]
    copy_source = bleu([src for src, _ in pairs], [trg for _, trg in pairs])
    assert 0.05 < copy_source < 0.9


def test_write_builtin_task(tmp_path):
    out_dir = write_builtin_task(tmp_path / "builtin", n_train=50, n_valid=5, n_test=5, seed=1)
    expected = make_builtin_task(n_train=50, n_valid=5, n_test=5, seed=1)
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "test.jsonl",
        "train.jsonl",
        "valid.jsonl",
    ]
    for split, pairs in expected.items():
        assert load_split(out_dir, split) == pairs


def test_argument_errors():
    with pytest.raises(ValueError, match="exceeds the 140160 distinct concepts"):
        make_builtin_task(n_train=140160, n_valid=1, n_test=0)
    with pytest.raises(ValueError, match="n_valid must be >= 0"):
        make_builtin_task(n_valid=-1)
    with pytest.raises(TypeError, match="n_train must be an int"):
        make_builtin_task(n_train=10.0)
    with pytest.raises(TypeError, match="seed must be an int"):
        make_builtin_task(seed="0")


def test_whole_grammar_can_be_drawn():
    capacity = sum(intent.n_concepts for intent in builtin_task._INTENTS)
    task = make_builtin_task(n_train=capacity, n_valid=0, n_test=0, seed=0)
    assert len({src for src, _ in task["train"]}) == capacity

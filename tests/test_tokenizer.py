"""Tests of dlmone.tokenizer: BERT vocabulary compatibility, training, persistence."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dlmone.tokenizer import SPECIAL_TOKENS, Tokenizer, clean_up_tokenization

from conftest import SHARED_DATA

REPO_ROOT = Path(__file__).resolve().parents[1]
BERT_VOCAB = SHARED_DATA / "vocab" / "bert-base-uncased-vocab.txt"
needs_bert_vocab = pytest.mark.skipif(not BERT_VOCAB.is_file(), reason="BERT vocab.txt absent")

TRAINING_TEXTS = [
    "How can I learn Python quickly?",
    "What is the best way to learn Python?",
    "Is learning chemistry hard for students?",
    "Why do students find chemistry so hard?",
    "Which is better, guitar or piano?",
    "Should I learn the guitar or the piano?",
    "lowest lower low lowering slower slowest",
] * 3


@pytest.fixture(scope="module")
def bert() -> Tokenizer:
    return Tokenizer.from_vocab_file(BERT_VOCAB)


# -------------------------------------------------------------- BERT vocab
@needs_bert_vocab
def test_bert_vocab_standard_ids(bert):
    assert bert.vocab_size == 30522
    assert (bert.pad_id, bert.unk_id, bert.cls_id, bert.sep_id) == (0, 100, 101, 102)
    assert bert.encode("Hello, world!") == [7592, 1010, 2088, 999]


@needs_bert_vocab
def test_bert_wordpiece_and_normalisation(bert):
    ids = bert.encode("Playing naïve Café")
    assert [bert.id_to_token(i) for i in ids] == ["playing", "naive", "cafe"]
    pieces = [bert.id_to_token(i) for i in bert.encode("quora")]
    assert pieces[0] == "quo" and all(p.startswith("##") for p in pieces[1:])
    assert bert.encode("a [UNK] b") == [bert.encode("a")[0], 100, bert.encode("b")[0]]


@needs_bert_vocab
def test_bert_round_trip(bert):
    text = "How do I learn Quora's API? It isn't hard, is it!"
    assert bert.decode(bert.encode(text)) == "how do i learn quora's api? it isn't hard, is it!"


@needs_bert_vocab
def test_decode_drops_structural_tokens_keeps_unk(bert):
    ids = [101, 7592, 1010, 0, 2088, 102, 100, 0, 0]
    assert bert.decode(ids) == "hello, world [UNK]"
    assert bert.decode([]) == ""
    with pytest.raises(ValueError, match="must lie in"):
        bert.decode([30522])
    with pytest.raises(ValueError, match="one-dimensional"):
        bert.decode([[1, 2]])


@needs_bert_vocab
def test_encode_batch_matches_encode(bert):
    texts = ["Hello, world!", "", "What is DLM-One?"]
    assert bert.encode_batch(texts) == [bert.encode(t) for t in texts]
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        bert.encode_batch(["a", 1])
    with pytest.raises(TypeError, match="must be a str"):
        bert.encode(None)


def test_clean_up_tokenization():
    assert clean_up_tokenization("what is it ? i do n't know , it ' s late .") == (
        "what is it? i don't know, it's late."
    )


# ----------------------------------------------------------------- training
def test_train_layout_and_specials():
    tokenizer = Tokenizer.train(TRAINING_TEXTS, vocab_size=120)
    assert tokenizer.vocab[: len(SPECIAL_TOKENS)] == SPECIAL_TOKENS
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id, tokenizer.sep_id) == (0, 1, 2, 3)
    assert tokenizer.vocab_size <= 120
    assert {"learn", "python", "chemistry", "students"} <= set(tokenizer.vocab)
    text = "Why do students learn Python?"
    assert tokenizer.decode(tokenizer.encode(text)) == "why do students learn python?"


def test_train_stops_when_pairs_run_out():
    # Alphabet sorted ("#" < "a"), then merges; the tie between (##a, ##a) and
    # (a, ##a) goes to the smaller pair. "##aa" was learned on the way to "aaa"
    # but no word uses it in the end, so it is pruned.
    tokenizer = Tokenizer.train(["aaa"], vocab_size=1000)
    assert tokenizer.vocab[len(SPECIAL_TOKENS) :] == ("##a", "a", "aaa")


def test_train_prunes_intermediate_merges_and_keeps_encodings():
    texts = ["should would could", "shoulder boulder", "should"]
    tokenizer = Tokenizer.train(texts, vocab_size=1000)
    words = "should would could shoulder boulder".split()
    used = {t for w in words for t in tokenizer.encode(w)}
    alphabet_and_specials = {t for t in tokenizer.vocab if len(t.replace("##", "")) == 1} | set(SPECIAL_TOKENS)
    for token in tokenizer.vocab:
        assert token in alphabet_and_specials or tokenizer.token_to_id(token) in used, token
    assert [tokenizer.decode([i]) for i in tokenizer.encode("should shoulder")] == ["should", "shoulder"]


def test_train_min_frequency():
    frequent = Tokenizer.train(["ab ab cd"], vocab_size=100, min_frequency=2)
    assert "ab" in frequent.vocab and "cd" not in frequent.vocab


def test_train_is_independent_of_text_order():
    forward = Tokenizer.train(TRAINING_TEXTS, vocab_size=100)
    backward = Tokenizer.train(list(reversed(TRAINING_TEXTS)), vocab_size=100)
    assert forward == backward


def test_train_is_deterministic_across_processes(tmp_path):
    script = (
        "import sys\n"
        "from dlmone.tokenizer import Tokenizer\n"
        "texts = [line for line in open(sys.argv[1], encoding='utf-8').read().split('\\n')]\n"
        "Tokenizer.train(texts, vocab_size=100).save(sys.argv[2])\n"
    )
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TRAINING_TEXTS), encoding="utf-8")
    outputs = []
    for hash_seed in ("1", "2"):
        out_dir = tmp_path / f"run{hash_seed}"
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        subprocess.run(
            [sys.executable, "-c", script, str(corpus), str(out_dir)], check=True, env=env
        )
        outputs.append((out_dir / "vocab.txt").read_bytes())
    assert outputs[0] == outputs[1]


def test_train_argument_errors():
    with pytest.raises(ValueError, match="use vocab_size >="):
        Tokenizer.train(TRAINING_TEXTS, vocab_size=10)
    with pytest.raises(ValueError, match="no words"):
        Tokenizer.train(["", "   "], vocab_size=100)
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        Tokenizer.train(["a", 5], vocab_size=100)
    with pytest.raises(TypeError, match="vocab_size must be an int"):
        Tokenizer.train(TRAINING_TEXTS, vocab_size=100.0)
    with pytest.raises(ValueError, match="min_frequency"):
        Tokenizer.train(TRAINING_TEXTS, vocab_size=100, min_frequency=0)


# -------------------------------------------------------------- persistence
def test_save_load_round_trip(tmp_path):
    tokenizer = Tokenizer.train(TRAINING_TEXTS, vocab_size=100)
    path = tokenizer.save(tmp_path / "tok")
    assert path == tmp_path / "tok" / "vocab.txt"
    assert sorted(p.name for p in path.parent.iterdir()) == ["vocab.txt"]  # no temp files left
    assert path.read_text(encoding="utf-8").split("\n")[:-1] == list(tokenizer.vocab)
    loaded = Tokenizer.load(tmp_path / "tok")
    assert loaded == tokenizer
    assert loaded.encode("learn python") == tokenizer.encode("learn python")


@needs_bert_vocab
def test_bert_save_reproduces_file(bert, tmp_path):
    assert bert.save(tmp_path).read_bytes() == BERT_VOCAB.read_bytes()


def test_equality_and_repr():
    first = Tokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a"])
    assert first == Tokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a"])
    assert first != Tokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "b"])
    assert repr(first) == "Tokenizer(vocab_size=5, pad_id=0, unk_id=1, cls_id=2, sep_id=3)"


def test_vocab_validation(tmp_path):
    with pytest.raises(ValueError, match=r"lacks the special tokens \['\[SEP\]'\]"):
        Tokenizer(["[PAD]", "[UNK]", "[CLS]", "a"])
    with pytest.raises(ValueError, match="duplicates"):
        Tokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "a"])
    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\na\na\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab.txt:6: token 'a' already on line 5"):
        Tokenizer.from_vocab_file(vocab_file)
    vocab_file.write_text("[PAD]\n[UNK]\n\n[CLS]\n[SEP]\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab.txt:3: empty token"):
        Tokenizer.from_vocab_file(vocab_file)
    vocab_file.write_text("[PAD]\n[UNK]\n[CLS]\n", encoding="utf-8")
    with pytest.raises(ValueError, match="vocab.txt: vocabulary lacks"):
        Tokenizer.from_vocab_file(vocab_file)
    with pytest.raises(FileNotFoundError, match="no vocab.txt"):
        Tokenizer.load(tmp_path / "missing")

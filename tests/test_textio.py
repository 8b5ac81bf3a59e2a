"""The batched text paths in C (csrc/core/text.c via dlmone._core.WordPiece) against
their references: HF tokenizers' encoding, Tokenizer.decode, DiffuSeq's layout."""

from __future__ import annotations

import random
import string

import numpy as np
import pytest

import dlmone
from dlmone.builtin_task import make_builtin_task
from dlmone.data import build_example, decode_sources, decode_targets, encode_pairs, encode_sources
from dlmone.tokenizer import SPECIAL_TOKENS, Tokenizer

from conftest import SHARED_DATA
from test_data import CLS, PAD, SEP, diffuseq_merge_and_mask

BERT_VOCAB = SHARED_DATA / "vocab" / "bert-base-uncased-vocab.txt"
needs_bert_vocab = pytest.mark.skipif(not BERT_VOCAB.is_file(), reason="BERT vocab.txt absent")


@pytest.fixture(scope="module")
def bert() -> Tokenizer:
    return Tokenizer.from_vocab_file(BERT_VOCAB)


@pytest.fixture(scope="module")
def builtin() -> Tokenizer:
    splits = make_builtin_task(n_train=500, n_valid=1, n_test=1, seed=0)
    return Tokenizer.train([text for pair in splits["train"] for text in pair], 1000)


EDGE_TEXTS = [
    "", " ", "\t\n\r", "Hello, world!", "What is DLM-One?", "HOW CAN I LEARN PYTHON???",
    "a [UNK] b[MASK]c [unk] [CLS][SEP][PAD]x [SEP", "[[UNK]]", "[UNK", "x[PAD]",
    "tab\there\x00\x01\x0b\x0c\x1c\x1f\x7f and \x1fX", "don't isn't it's we've they're i'm",
    "x" * 100, "y" * 101, "z" * 5000, "supercalifragilisticexpialidocious qwzxv",
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", "3.14 1,000,000 $5 50% a@b.com http://x.y/z?q=1",
    # not ASCII: tokenizers encodes these
    "Playing naïve Café", "résumé ÉCOLE straße", "日本語のテキスト", "emoji 😀 ok", "ﬁne ligature",
    "İstanbul", "\u00a0no-break\u2003em space\u3000", "zero\u200bwidth", "\ufffd replacement",
    "Ωmega ß ǅ", "ｆｕｌｌｗｉｄｔｈ", "combining e\u0301 accent",
]


def random_texts(rng: random.Random, words: list[str], n: int) -> list[str]:
    """Texts from vocabulary words, their glued and upper-cased forms, punctuation,
    control characters, specials and random ASCII; some with non-ASCII characters."""
    extras = list(SPECIAL_TOKENS) + list(string.punctuation) + ["\t", "\n", "\x00", "\x07", "\x7f", "  "]
    texts = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randrange(0, 30)):
            r = rng.random()
            if r < 0.5:
                parts.append(rng.choice(words))
            elif r < 0.6:
                parts.append(rng.choice(words).upper() + rng.choice(words))
            elif r < 0.8:
                parts.append(rng.choice(extras))
            elif r < 0.95:
                parts.append("".join(rng.choice(string.printable) for _ in range(rng.randrange(1, 12))))
            else:
                parts.append(rng.choice(["é", "ü", "ñ", "中", "😀", "\u2019", "\u00a0"]))
        texts.append(rng.choice(["", " ", "-"]).join(parts))
    return texts


def check_encoding(tokenizer: Tokenizer, texts: list[str]) -> None:
    expected = tokenizer.encode_reference(texts)
    assert tokenizer.encode_batch(texts) == expected
    ids, offsets = tokenizer.encode_flat(texts)
    assert ids.dtype == np.int32 and offsets.dtype == np.int64 and offsets.shape == (len(texts) + 1,)
    assert [ids[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])] == expected
    for text, row in zip(texts, expected):
        assert tokenizer.encode(text) == row, text


# ------------------------------------------------------------------ encoding
@needs_bert_vocab
def test_encode_matches_tokenizers_bert(bert):
    check_encoding(bert, EDGE_TEXTS)
    words = [t for t in bert.vocab if not t.startswith("[")]
    check_encoding(bert, random_texts(random.Random(0), words, 3000))


def test_encode_matches_tokenizers_builtin(builtin):
    check_encoding(builtin, EDGE_TEXTS)
    splits = make_builtin_task(n_train=300, n_valid=0, n_test=300, seed=1)
    check_encoding(builtin, [text for pair in splits["test"] for text in pair])
    check_encoding(builtin, random_texts(random.Random(1), list(builtin.vocab), 2000))


def test_encode_every_ascii_character(builtin):
    texts = [chr(c) for c in range(128)] + ["a" + chr(c) + "b" for c in range(128)]
    check_encoding(builtin, texts)


def test_encode_vocabulary_without_mask_token():
    # [MASK] is only matched verbatim when the vocabulary has it
    tokenizer = Tokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "##b", "[", "]", "mask", "##k", "m"])
    check_encoding(tokenizer, ["[MASK]", "ab[MASK]", "[CLS]ab", "abb [SEP]", "[UNK][UNK]", "mask"])


def test_encode_bad_input(builtin):
    with pytest.raises(TypeError, match="not a single str"):
        builtin.encode_batch("abc")
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        builtin.encode_flat(["a", 1])
    with pytest.raises(TypeError, match=r"texts\[0\] is bytes"):
        builtin.encode_batch([b"a"])
    assert builtin.encode_batch(t for t in ["a b", ""]) == builtin.encode_reference(["a b", ""])
    ids, offsets = builtin.encode_flat([])
    assert ids.shape == (0,) and offsets.tolist() == [0]


def test_wordpiece_type_bad_arguments():
    with pytest.raises(TypeError, match=r"tokens\[1\] is int"):
        dlmone._core.WordPiece(["a", 1], 0, [])
    with pytest.raises(ValueError, match="1 to"):
        dlmone._core.WordPiece([], 0, [])
    with pytest.raises(ValueError, match="unk_id = 5"):
        dlmone._core.WordPiece(["a", "b"], 5, [])
    with pytest.raises(TypeError, match="unk_id is float"):
        dlmone._core.WordPiece(["a", "b"], 1.0, [])
    with pytest.raises(ValueError, match="special_ids"):
        dlmone._core.WordPiece(["a", "b"], 0, [0, -1])
    with pytest.raises(TypeError, match="special_ids"):
        dlmone._core.WordPiece(["a", "b"], 0, None)
    with pytest.raises(RuntimeError, match="not initialised"):
        dlmone._core.WordPiece.__new__(dlmone._core.WordPiece).encode(["a"])
    wp = dlmone._core.WordPiece(["[UNK]", "a"], 0, [])
    with pytest.raises(RuntimeError, match="already initialised"):
        wp.__init__(["a"], 0, [])
    with pytest.raises(TypeError, match="int32 or int64"):
        wp.decode(np.zeros((1, 2), np.float32), np.ones((1, 2), bool))
    with pytest.raises(TypeError, match="selected must have dtype bool"):
        wp.decode(np.zeros((1, 2), np.int32), np.ones((1, 2), np.float32))
    with pytest.raises(ValueError, match="selected has shape"):
        wp.decode(np.zeros((1, 2), np.int32), np.ones((2, 2), bool))
    with pytest.raises(ValueError, match="ids must have 2 dimension"):
        wp.decode(np.zeros(2, np.int32), np.ones(2, bool))
    with pytest.raises(ValueError, match=r"ids\[0, 1\] = 2 is not a token id"):
        wp.decode(np.array([[0, 2]], np.int64), np.ones((1, 2), bool))


# ------------------------------------------------------------------ decoding
def check_decoding(tokenizer: Tokenizer, ids: np.ndarray, selected: np.ndarray) -> None:
    expected = [tokenizer.decode(row[keep]) for row, keep in zip(ids, selected)]
    assert tokenizer.decode_selected(ids, selected) == expected


def random_rows(rng: np.random.Generator, tokenizer: Tokenizer, n: int, length: int) -> np.ndarray:
    """Ids drawn to hit the decoding rules: specials, punctuation, '##' pieces,
    contractions' pieces, as well as any token."""
    favoured = [tokenizer.token_to_id(t) for t in
                [*SPECIAL_TOKENS, ".", ",", "?", "!", "'", "n", "t", "s", "m", "ve", "re", "##s", "##t", "##", "#"]]
    favoured = np.array([i for i in favoured if i is not None])
    any_token = rng.integers(0, tokenizer.vocab_size, size=(n, length))
    pick = rng.integers(0, len(favoured), size=(n, length))
    return np.where(rng.random((n, length)) < 0.5, favoured[pick], any_token)


@needs_bert_vocab
def test_decode_matches_reference_bert(bert):
    rng = np.random.default_rng(0)
    ids = random_rows(rng, bert, 2000, 24)
    for selected in (rng.random(ids.shape) < 0.7, np.ones(ids.shape, bool), np.zeros(ids.shape, bool)):
        check_decoding(bert, ids, selected)
        check_decoding(bert, ids.astype(np.int32), selected)
        check_decoding(bert, ids.astype(np.uint16), selected)
    texts = [t for t in EDGE_TEXTS if t.strip()]
    pairs = list(zip(texts, texts[::-1]))
    enc_ids, mask = encode_pairs(pairs, bert, 64)
    assert decode_targets(enc_ids, mask, bert) == [bert.decode(r[m != 0]) for r, m in zip(enc_ids, mask)]
    assert decode_sources(enc_ids, mask, bert) == [bert.decode(r[m == 0]) for r, m in zip(enc_ids, mask)]


def test_decode_matches_reference_builtin(builtin):
    rng = np.random.default_rng(1)
    ids = random_rows(rng, builtin, 3000, 32)
    check_decoding(builtin, ids, rng.random(ids.shape) < 0.8)


def test_decode_tokens_with_whitespace_go_through_reference():
    # tokens that hold whitespace (possible in a user's vocabulary) take Tokenizer.decode
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "##b", ".", "x\u00a0y", "\u2003", "tab\tz", "'", "s", "[PAD]x"]
    tokenizer = Tokenizer(vocab)
    rng = np.random.default_rng(2)
    ids = rng.integers(0, len(vocab), size=(500, 12))
    check_decoding(tokenizer, ids, rng.random(ids.shape) < 0.8)
    plain = np.isin(ids, [7, 8, 9], invert=True).all(1)
    assert plain.any() and not plain.all()


def test_decode_selected_bad_input(builtin):
    ids = np.zeros((2, 3), np.int64)
    with pytest.raises(ValueError, match="selected a bool array"):
        builtin.decode_selected(ids, np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match="ids must be"):
        builtin.decode_selected(ids[0], np.ones(3, bool))
    bad = np.full((2, 3), builtin.token_to_id("a"))
    bad[1, 2] = builtin.vocab_size
    with pytest.raises(ValueError, match="not a token id"):
        builtin.decode_selected(bad, np.ones((2, 3), bool))
    # an out-of-range id that is not selected is not decoded, as with Tokenizer.decode
    keep = np.ones((2, 3), bool)
    keep[1, 2] = False
    assert builtin.decode_selected(bad, keep) == ["a a a", "a a"]
    with pytest.raises(ValueError, match="-1 is not a token id"):
        builtin.decode_selected(np.full((1, 2), -1), np.ones((1, 2), bool))
    with pytest.raises(ValueError, match="-1 is not a token id"):
        builtin.decode_selected(np.full((1, 2), -1, np.int8), np.ones((1, 2), bool))
    with pytest.raises(TypeError, match="must be integers"):
        builtin.decode_selected(np.zeros((1, 2), np.float32), np.ones((1, 2), bool))
    assert builtin.decode_selected(np.zeros((1, 2), np.float32), np.zeros((1, 2), bool)) == [""]


# -------------------------------------------------------------------- layout
def layout_pairs(tokenizer: Tokenizer, seed: int, n: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    words = [t for t in tokenizer.vocab if t.isalpha()]
    return [(" ".join(rng.choice(words) for _ in range(rng.randrange(0, 40))),
             " ".join(rng.choice(words) for _ in range(rng.randrange(0, 40)))) for _ in range(n)]


@needs_bert_vocab
def test_encode_pairs_batch_matches_diffuseq_layout(bert):
    # test_data's transcription of DiffuSeq uses BERT's special ids
    assert (bert.cls_id, bert.sep_id, bert.pad_id) == (CLS, SEP, PAD)
    pairs = layout_pairs(bert, 3, 300)
    for seq_len in (6, 7, 32, 64):
        ids, mask = encode_pairs(pairs, bert, seq_len)
        for row, (src, trg) in enumerate(pairs):
            expected_ids, expected_mask = diffuseq_merge_and_mask(bert.encode(src), bert.encode(trg), seq_len)
            assert ids[row].tolist() == expected_ids and mask[row].tolist() == expected_mask


def test_encode_pairs_batch_matches_build_example(builtin):
    pairs = layout_pairs(builtin, 4, 300)
    for seq_len in (6, 9, 32):
        ids, mask = encode_pairs(pairs, builtin, seq_len)
        for row, (src, trg) in enumerate(pairs):
            expected_ids, expected_mask = build_example(builtin.encode(src), builtin.encode(trg), seq_len,
                                                        builtin.cls_id, builtin.sep_id, builtin.pad_id)
            np.testing.assert_array_equal(ids[row], expected_ids)
            np.testing.assert_array_equal(mask[row], expected_mask)


def test_encode_sources_is_encode_pairs_with_empty_targets(builtin):
    sources = [p[0] for p in make_builtin_task(n_train=0, n_valid=0, n_test=256, seed=4)["test"]]
    sources += EDGE_TEXTS
    for seq_len in (6, 32):
        got = encode_sources(sources, builtin, seq_len)
        expected = encode_pairs([(s, "") for s in sources], builtin, seq_len)
        for a, b in zip(got, expected):
            np.testing.assert_array_equal(a, b)
            assert a.dtype == b.dtype
    with pytest.raises(TypeError, match="not a single str"):
        encode_sources("abc", builtin, 32)
    with pytest.raises(ValueError, match="seq_len must be >= 6"):
        encode_sources(["a"], builtin, 5)


# ------------------------------------------------------------- generation
def test_decode_tokens_on_active_positions_only(builtin):
    from dlmone.diffusion import decode_tokens
    from dlmone.model import DiffusionTransformer, ModelConfig

    model = DiffusionTransformer(ModelConfig.tiny(vocab_size=builtin.vocab_size, seq_len=8))
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 8, model.config.emb_dim)).astype(np.float32)
    active = rng.random((3, 8)) < 0.5
    for decode in ("logits", "nearest"):
        full = decode_tokens(model, x, decode)
        np.testing.assert_array_equal(decode_tokens(model, x, decode, active), np.where(active, full, 0))


def test_student_generate_matches_the_straightforward_pipeline(builtin):
    """Student.generate (C encoding, vectorised layout, argmax on the targets, C decoding)
    against the same generation through tokenizers, build_example per row, the argmax
    everywhere and Tokenizer.decode per row."""
    from dlmone.diffusion import decode_tokens
    from dlmone.distill import Student
    from dlmone.model import DiffusionTransformer, ModelConfig
    from dlmone.sample import student_sample

    cfg = ModelConfig.tiny(vocab_size=builtin.vocab_size, seq_len=24)
    student = Student(DiffusionTransformer(cfg, seed=3), builtin, {"t_init": 1490})
    sources = [p[0] for p in make_builtin_task(n_train=0, n_valid=0, n_test=40, seed=6)["test"]] + EDGE_TEXTS
    texts, ids = student.generate(sources, seed=7, batch_size=len(sources), return_ids=True)

    laid_out = [build_example(row, [], cfg.seq_len, builtin.cls_id, builtin.sep_id, builtin.pad_id)
                for row in builtin.encode_reference(sources)]
    ref_ids = np.stack([i for i, _ in laid_out])
    ref_mask = np.stack([m for _, m in laid_out])
    D = student_sample(student.model, student.diffusion, student.model.embed(ref_ids), ref_mask, 1490, 1,
                       seed=_batch_seed(7))
    ref_out = np.where(ref_mask > 0, decode_tokens(student.model, D), ref_ids)
    np.testing.assert_array_equal(ids, ref_out)
    assert texts == [builtin.decode(row[m != 0]) for row, m in zip(ref_out, ref_mask)]


def _batch_seed(seed: int) -> int:
    """The seed Student.generate gives its first batch of its only candidate."""
    from dlmone.diffusion import derive_seed
    from dlmone.sample import candidate_seeds

    return derive_seed(candidate_seeds(seed, 1)[0], 0)

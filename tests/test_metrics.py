"""Tests of dlmone.metrics against direct nltk / rouge_score / sacrebleu calls, DiffuSeq's
eval_seq2seq.py (its BLEU orientation, selectBest, diversityOfSet), torchmetrics'
ROUGEScore on real sentences, and pinned values."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from nltk.translate.bleu_score import SmoothingFunction
from nltk.translate.bleu_score import sentence_bleu as nltk_sentence_bleu
from rouge_score.rouge_scorer import RougeScorer

from dlmone import metrics

from conftest import SHARED_DATA

QQP = SHARED_DATA / "qqp"

HYP_1 = "how can i learn python quickly ?"
REF_1 = "what is the best way to learn python quickly ?"
HYP_2 = "the cat sat on the mat"
REF_2 = "the cat is sitting on the mat"

CANDIDATES = [
    ["the cat sat on the mat", "the cat sat on a mat", "a dog ran in the park"],
    ["how do i learn python fast", "how can i learn python fast", "how do i learn python fast"],
]


def direct_bleu(hypothesis: str, reference: str) -> float:
    return nltk_sentence_bleu(
        [reference.split()],
        hypothesis.split(),
        weights=(0.25, 0.25, 0.25, 0.25),
        smoothing_function=SmoothingFunction().method4,
    )


def direct_rouge_l(hypothesis: str, reference: str) -> float:
    return RougeScorer(["rougeL"]).score(reference, hypothesis)["rougeL"].fmeasure


# ---------------------------------------------------------------------- BLEU
@pytest.mark.parametrize(
    "hypothesis, reference",
    [(HYP_1, REF_1), (HYP_2, REF_2), ("a", "a b c"), ("x y", "a b"), ("a b c d e", "e d c b a")],
)
def test_sentence_bleu_matches_nltk(hypothesis, reference):
    assert metrics.sentence_bleu(hypothesis, reference) == pytest.approx(
        direct_bleu(hypothesis, reference), abs=1e-12
    )


def test_sentence_bleu_pinned_values():
    assert metrics.sentence_bleu(HYP_1, REF_1) == pytest.approx(0.26782849591300867, abs=1e-9)
    assert metrics.sentence_bleu(HYP_2, REF_2) == pytest.approx(0.24881966613088374, abs=1e-9)


def test_sentence_bleu_identical_is_one():
    assert metrics.sentence_bleu(REF_1, REF_1) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize(
    "hypothesis, reference", [("", REF_1), ("   ", REF_1), (HYP_1, ""), ("", "")]
)
def test_sentence_bleu_empty_is_zero(hypothesis, reference):
    score = metrics.sentence_bleu(hypothesis, reference)
    assert score == 0.0 and isinstance(score, float)


def test_sentence_bleu_rejects_non_strings():
    with pytest.raises(TypeError, match="must be str"):
        metrics.sentence_bleu(["a"], "a")


def test_bleu_is_mean_of_sentence_bleu():
    expected = (direct_bleu(HYP_1, REF_1) + direct_bleu(HYP_2, REF_2)) / 2
    assert metrics.bleu([HYP_1, HYP_2], [REF_1, REF_2]) == pytest.approx(expected, abs=1e-12)
    assert metrics.bleu([HYP_1, HYP_2], [REF_1, REF_2]) == pytest.approx(
        0.2583240810219462, abs=1e-9
    )


def test_bleu_argument_errors():
    with pytest.raises(ValueError, match="2 hyps but 1 refs"):
        metrics.bleu([HYP_1, HYP_2], [REF_1])
    with pytest.raises(ValueError, match="hyps is empty"):
        metrics.bleu([], [])
    with pytest.raises(TypeError, match=r"refs\[1\] is int"):
        metrics.bleu(["a", "b"], ["a", 3])
    with pytest.raises(TypeError, match="not a single str"):
        metrics.bleu("abc", "abc")


# ------------------------------------------------------------------- ROUGE-L
def test_rouge_l_matches_rouge_score_and_pinned():
    expected = (direct_rouge_l(HYP_1, REF_1) + direct_rouge_l(HYP_2, REF_2)) / 2
    assert metrics.rouge_l([HYP_1, HYP_2], [REF_1, REF_2]) == pytest.approx(expected, abs=1e-12)
    assert metrics.rouge_l([HYP_1], [REF_1]) == pytest.approx(0.4, abs=1e-9)
    assert metrics.rouge_l([HYP_2], [REF_2]) == pytest.approx(0.7692307692307692, abs=1e-9)


def test_rouge_l_edge_cases():
    assert metrics.rouge_l([REF_1], [REF_1]) == pytest.approx(1.0)
    assert metrics.rouge_l([""], [REF_1]) == 0.0
    assert metrics.rouge_l([HYP_1], [""]) == 0.0


# ------------------------------------------------------- length and diversity
def test_dist1():
    assert metrics.dist1(["a a b"]) == pytest.approx(2 / 3)
    assert metrics.dist1(["a a b", "c d", ""]) == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert metrics.dist1([""]) == 0.0


def test_mean_length():
    assert metrics.mean_length(["a b  c", "", " d "]) == pytest.approx(4 / 3)


def test_self_bleu_matches_pairwise_definition():
    expected = np.mean(
        [
            np.mean([direct_bleu(g[i], g[j]) for i in range(3) for j in range(i + 1, 3)])
            for g in CANDIDATES
        ]
    )
    assert metrics.self_bleu(CANDIDATES) == pytest.approx(expected, abs=1e-12)
    assert metrics.self_bleu(CANDIDATES) == pytest.approx(0.4490257744423024, abs=1e-9)


def test_self_bleu_identical_candidates_is_one():
    assert metrics.self_bleu([[REF_1, REF_1, REF_1]]) == pytest.approx(1.0)


def test_self_bleu_needs_two_candidates():
    with pytest.raises(ValueError, match=r"candidates\[1\] has 1 candidate"):
        metrics.self_bleu([["a b", "c d"], ["a b"]])


def test_div4():
    # group 1: 9 4-grams, 8 unique; group 2: 9 4-grams, 5 unique.
    assert metrics.div4(CANDIDATES) == pytest.approx((8 / 9 + 5 / 9) / 2, abs=1e-12)
    assert metrics.div4([["a b c d", "a b c d"]]) == pytest.approx(0.5)
    assert metrics.div4([["a b c", "x"]]) == 0.0


def test_mbr_select_maximises_summed_bleu():
    for group, chosen in zip(CANDIDATES, metrics.mbr_select(CANDIDATES)):
        totals = [
            sum(direct_bleu(group[i], group[j]) for j in range(len(group)) if j != i)
            for i in range(len(group))
        ]
        assert chosen == group[int(np.argmax(totals))]
    assert metrics.mbr_select(CANDIDATES) == ["the cat sat on a mat", "how do i learn python fast"]


def test_mbr_select_ties_and_single_candidate():
    assert metrics.mbr_select([["a b", "c d", "e f"]]) == ["a b"]  # all score 0: first wins
    assert metrics.mbr_select([["only one"]]) == ["only one"]
    assert metrics.mbr_select([["x y z w", "", "x y z w"]]) == ["x y z w"]


# -------------------------------------------------- DiffuSeq's orientation
def diffuseq_get_bleu(recover: str, reference: str) -> float:
    """DiffuSeq's scripts/eval_seq2seq.py, verbatim: the generated text is nltk's reference."""
    return nltk_sentence_bleu(
        [recover.split()], reference.split(), smoothing_function=SmoothingFunction().method4
    )


def diffuseq_select_best(sentences):
    """DiffuSeq's selectBest."""
    scores = [[diffuseq_get_bleu(s1, s2) for s2 in sentences] for s1 in sentences]
    for i in range(len(sentences)):
        scores[i][i] = 0
    return sentences[int(np.argmax(np.sum(scores, -1)))]


def diffuseq_self_bleu(sentences):
    """The self-BLEU half of DiffuSeq's diversityOfSet."""
    return np.mean(
        [
            diffuseq_get_bleu(sentences[i], sentences[j])
            for i in range(len(sentences))
            for j in range(i + 1, len(sentences))
        ]
    )


@pytest.mark.parametrize(
    "hypothesis, reference",
    [(HYP_1, REF_1), (HYP_2, REF_2), ("a", "a b c"), ("a b c d e f g", "a b c")],
)
def test_diffuseq_orientation_is_diffuseq_get_bleu(hypothesis, reference):
    assert metrics.sentence_bleu(hypothesis, reference, "diffuseq") == pytest.approx(
        diffuseq_get_bleu(hypothesis, reference), abs=1e-12
    )
    assert metrics.sentence_bleu(hypothesis, reference, "diffuseq") == pytest.approx(
        metrics.sentence_bleu(reference, hypothesis), abs=1e-12
    )


def test_orientations_differ_and_are_named():
    # a short output loses to the brevity penalty in the standard orientation only
    short, long = "the cat", "the cat sat on the mat"
    assert metrics.sentence_bleu(short, long) < metrics.sentence_bleu(short, long, "diffuseq")
    assert metrics.bleu([short], [long], "diffuseq") == metrics.sentence_bleu(short, long, "diffuseq")
    with pytest.raises(ValueError, match="orientation must be one of"):
        metrics.bleu([short], [long], "nltk")
    with pytest.raises(ValueError, match="orientation must be one of"):
        metrics.sentence_bleu(short, long, "reversed")


def test_mbr_and_self_bleu_in_diffuseq_orientation_match_its_script():
    groups = CANDIDATES + [["d e a", "c c", "c b c f c d e"]]
    assert metrics.mbr_select(groups, "diffuseq") == [diffuseq_select_best(g) for g in groups]
    expected = np.mean([diffuseq_self_bleu(g) for g in groups])
    assert metrics.self_bleu(groups, "diffuseq") == pytest.approx(expected, abs=1e-12)
    # the two orientations choose differently on the third group
    assert metrics.mbr_select(groups)[2] == "c b c f c d e"
    assert metrics.mbr_select(groups, "diffuseq")[2] == "d e a"


# ------------------------------------------------------------------ sacreBLEU
def test_sacrebleu_corpus_matches_sacrebleu():
    import sacrebleu

    hyps, refs = [HYP_1, HYP_2, ""], [REF_1, REF_2, "a b"]
    score, signature = metrics.sacrebleu_corpus(hyps, refs)
    assert score == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=1e-12)
    assert signature == f"nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:{sacrebleu.__version__}"
    assert metrics.sacrebleu_corpus([REF_1], [REF_1])[0] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="2 hyps but 1 refs"):
        metrics.sacrebleu_corpus([HYP_1, HYP_2], [REF_1])


# ------------------------------------------- ROUGE-L against DiffuSeq's scorer
@pytest.mark.skipif(not (QQP / "test.jsonl").is_file(), reason="shared QQP data not found")
def test_rouge_l_equals_torchmetrics_rougescore_on_qqp():
    """DiffuSeq's ROUGE-L is torchmetrics' ROUGEScore()(recover, reference)['rougeL_fmeasure'];
    on real sentences (QQP test: source against target, target against source, and
    text with capitals and punctuation) dlmone's agrees to float32 rounding."""
    pytest.importorskip("torch")
    rouge_module = pytest.importorskip("torchmetrics.text.rouge")
    # DiffuSeq built ROUGEScore() with all keys; rougeL alone gives the same rougeL and
    # does not need nltk's punkt data (rougeLsum does)
    scorer = rouge_module.ROUGEScore(rouge_keys="rougeL")
    pairs = [json.loads(line) for line in open(QQP / "test.jsonl")][:150]
    cases = [(p["src"], p["trg"]) for p in pairs] + [(p["trg"], p["src"]) for p in pairs[:50]]
    cases += [("How do I learn Python, fast?!", "how can I learn PYTHON quickly?"),
              ("it's 3.5 times cheaper -- isn't it", "Is it 3.5x cheaper?"), ("?", "what ?")]
    for recover, reference in cases:
        theirs = float(scorer(recover, reference)["rougeL_fmeasure"])
        assert metrics.rouge_l([recover], [reference]) == pytest.approx(theirs, abs=1e-6), (
            recover, reference)


# ----------------------------------------------------------------- BERTScore
def test_bertscore_needs_a_local_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model folder.*huggingface-cli download"):
        metrics.bertscore([HYP_1], [REF_1], tmp_path / "deberta-xlarge-mnli")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        metrics.bertscore([HYP_1], [REF_1], tmp_path)


def test_bertscore_without_package_says_how_to_install(monkeypatch, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "bert_score", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install dlmone\[bertscore\]"):
        metrics.bertscore([HYP_1], [REF_1], tmp_path)


def test_bertscore_layer_default_comes_from_the_folder_name(tmp_path):
    layers = {"microsoft/deberta-xlarge-mnli": 40, "roberta-large": 17}
    assert metrics._bertscore_layers(tmp_path / "deberta-xlarge-mnli", layers) == 40
    with pytest.raises(ValueError, match="pass num_layers"):
        metrics._bertscore_layers(tmp_path / "my-model", layers)


# ------------------------------------------------------------------- summary
def test_evaluate_matches_individual_metrics():
    hyps, refs = [HYP_1, HYP_2], [REF_1, REF_2]
    scores = metrics.evaluate(hyps, refs)
    sacre, signature = metrics.sacrebleu_corpus(hyps, refs)
    assert scores == {
        "bleu": metrics.bleu(hyps, refs),
        "bleu_diffuseq": metrics.bleu(hyps, refs, "diffuseq"),
        "rouge_l": metrics.rouge_l(hyps, refs),
        "dist1": metrics.dist1(hyps),
        "len": metrics.mean_length(hyps),
        "sacrebleu": sacre,
        "bleu_protocol": metrics.BLEU_PROTOCOL,
        "sacrebleu_signature": signature,
    }
    assert "standard orientation" in scores["bleu_protocol"] and "DiffuSeq" in scores["bleu_protocol"]
    with_candidates = metrics.evaluate(hyps, refs, CANDIDATES)
    assert with_candidates["self_bleu"] == metrics.self_bleu(CANDIDATES)
    assert with_candidates["self_bleu_diffuseq"] == metrics.self_bleu(CANDIDATES, "diffuseq")
    assert with_candidates["div4"] == metrics.div4(CANDIDATES)


def test_evaluate_checks_candidate_count():
    with pytest.raises(ValueError, match="2 candidate groups but 1 hyps"):
        metrics.evaluate([HYP_1], [REF_1], CANDIDATES)


# ------------------------------------------------------ degeneration monitors
def test_repeated_token_rate():
    assert metrics.repeated_token_rate([["a", "a", "b"], ["c"]]) == pytest.approx(0.5)
    assert metrics.repeated_token_rate(np.array([[1, 1, 1, 2], [3, 4, 5, 6]])) == pytest.approx(
        2 / 6
    )
    assert metrics.repeated_token_rate([[], ["x"]]) == 0.0
    with pytest.raises(TypeError, match=r"token_lists\[0\] is a str"):
        metrics.repeated_token_rate(["a a b"])


def test_empty_rate():
    assert metrics.empty_rate(["a", "", "  ", "b c"]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="empty"):
        metrics.empty_rate([])

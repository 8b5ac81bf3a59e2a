"""Evaluation metrics with DiffuSeq's protocol, so numbers compare with papers (SPEC §7).

Inputs are plain strings without special tokens (as :func:`dlmone.data.decode_targets`
returns them) and are split on whitespace. The definitions follow DiffuSeq's
``eval_seq2seq.py``:

* BLEU: nltk ``sentence_bleu`` against the one reference, uniform 4-gram weights,
  smoothing ``method4``, averaged over sentences.
* ROUGE-L: F-measure of ``rouge_score``'s ``rougeL`` (no stemming; it lower-cases
  and keeps alphanumeric tokens, like the torchmetrics scorer DiffuSeq used),
  averaged over sentences.
* Dist-1: unique / total unigrams of a sentence, averaged (an empty sentence
  scores 0; DiffuSeq returned 0 for the whole set when any sentence was empty).
* Len: mean number of whitespace-separated words (DiffuSeq split on ``' '``,
  which also counted empty strings between repeated spaces).
* Over the S candidates of each input: self-BLEU (mean BLEU of candidate i
  against candidate j over pairs i < j) and div-4 (unique / total 4-grams pooled
  over the candidates), each averaged over inputs; MBR picks the candidate with
  the largest summed BLEU against the others.

:func:`repeated_token_rate` and :func:`empty_rate` are not paper metrics: they
watch for degenerate output (repetition, empty sequences) during training.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
from nltk.translate.bleu_score import SmoothingFunction
from nltk.translate.bleu_score import sentence_bleu as _nltk_sentence_bleu
from rouge_score.rouge_scorer import RougeScorer

__all__ = [
    "DIFFUSEQ_BERTSCORE_MODEL",
    "sentence_bleu",
    "bleu",
    "rouge_l",
    "dist1",
    "mean_length",
    "self_bleu",
    "div4",
    "mbr_select",
    "bertscore",
    "evaluate",
    "repeated_token_rate",
    "empty_rate",
]

#: The BERTScore model of DiffuSeq's evaluation script.
DIFFUSEQ_BERTSCORE_MODEL = "microsoft/deberta-xlarge-mnli"

_BLEU_WEIGHTS = (0.25, 0.25, 0.25, 0.25)
_SMOOTHING = SmoothingFunction().method4


# ----------------------------------------------------------------- arguments
def _check_strings(values: Sequence[str], argument: str) -> list[str]:
    if isinstance(values, str):
        raise TypeError(f"{argument} must be a sequence of strings, not a single str")
    values = list(values)
    for index, value in enumerate(values):
        if not isinstance(value, str):
            raise TypeError(f"{argument}[{index}] is {type(value).__name__}, expected str")
    if not values:
        raise ValueError(f"{argument} is empty")
    return values


def _check_pairs(hyps: Sequence[str], refs: Sequence[str]) -> tuple[list[str], list[str]]:
    hyps = _check_strings(hyps, "hyps")
    refs = _check_strings(refs, "refs")
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hyps but {len(refs)} refs")
    return hyps, refs


def _check_candidates(
    candidates: Sequence[Sequence[str]], minimum: int
) -> list[list[str]]:
    if isinstance(candidates, str):
        raise TypeError("candidates must be a sequence of lists of strings, not a str")
    checked = []
    for index, group in enumerate(candidates):
        group = _check_strings(group, f"candidates[{index}]")
        if len(group) < minimum:
            raise ValueError(
                f"candidates[{index}] has {len(group)} candidate(s); need at least {minimum}"
            )
        checked.append(group)
    if not checked:
        raise ValueError("candidates is empty")
    return checked


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


# ---------------------------------------------------------------------- BLEU
def _bleu_of_words(hypothesis: list[str], reference: list[str]) -> float:
    # nltk returns 0 (no error, no warning) when no unigram matches, which
    # covers empty hypotheses and empty references.
    return float(
        _nltk_sentence_bleu(
            [reference], hypothesis, weights=_BLEU_WEIGHTS, smoothing_function=_SMOOTHING
        )
    )


def sentence_bleu(hypothesis: str, reference: str) -> float:
    """Sentence BLEU of ``hypothesis`` against ``reference`` (DiffuSeq's ``get_bleu``).

    4-gram uniform weights with nltk's smoothing ``method4``; 0.0 when the
    hypothesis (or reference) is empty.
    """
    if not isinstance(hypothesis, str) or not isinstance(reference, str):
        raise TypeError(
            "hypothesis and reference must be str, got "
            f"{type(hypothesis).__name__} and {type(reference).__name__}"
        )
    return _bleu_of_words(hypothesis.split(), reference.split())


def bleu(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Mean :func:`sentence_bleu` over aligned hypothesis/reference lists."""
    hyps, refs = _check_pairs(hyps, refs)
    return _mean([_bleu_of_words(h.split(), r.split()) for h, r in zip(hyps, refs)])


# ------------------------------------------------------------------- ROUGE-L
@functools.lru_cache(maxsize=1)
def _rouge_scorer() -> RougeScorer:
    return RougeScorer(["rougeL"])


def rouge_l(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (``rouge_score``, no stemming)."""
    hyps, refs = _check_pairs(hyps, refs)
    scorer = _rouge_scorer()
    return _mean([scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)])


# ------------------------------------------------------- length and diversity
def _distinct_ratio(ngrams: list[tuple[str, ...]]) -> float:
    return len(set(ngrams)) / len(ngrams) if ngrams else 0.0


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def dist1(hyps: Sequence[str]) -> float:
    """Mean over sentences of unique / total words (0 for an empty sentence)."""
    hyps = _check_strings(hyps, "hyps")
    return _mean([_distinct_ratio(_ngrams(h.split(), 1)) for h in hyps])


def mean_length(hyps: Sequence[str]) -> float:
    """Mean number of whitespace-separated words."""
    hyps = _check_strings(hyps, "hyps")
    return _mean([len(h.split()) for h in hyps])


def self_bleu(candidates: Sequence[Sequence[str]]) -> float:
    """Mean pairwise BLEU among each input's candidates, averaged over inputs.

    For the S >= 2 candidates of an input, the mean of
    ``sentence_bleu(c_i, c_j)`` over i < j (DiffuSeq's ``selfBleu``). Lower is
    more diverse.
    """
    groups = _check_candidates(candidates, minimum=2)
    scores = []
    for group in groups:
        words = [c.split() for c in group]
        pair_scores = [
            _bleu_of_words(words[i], words[j])
            for i in range(len(words))
            for j in range(i + 1, len(words))
        ]
        scores.append(_mean(pair_scores))
    return _mean(scores)


def div4(candidates: Sequence[Sequence[str]]) -> float:
    """Unique / total 4-grams pooled over each input's candidates, averaged over inputs.

    An input whose candidates have no 4-gram at all scores 0 (as in DiffuSeq).
    Higher is more diverse.
    """
    groups = _check_candidates(candidates, minimum=1)
    return _mean(
        [_distinct_ratio([g for c in group for g in _ngrams(c.split(), 4)]) for group in groups]
    )


def mbr_select(candidates: Sequence[Sequence[str]]) -> list[str]:
    """Minimum-Bayes-risk choice among each input's candidates (SPEC §5).

    For each input, the candidate with the largest sum of
    ``sentence_bleu(candidate, other)`` over the other candidates; ties go to
    the earliest candidate (DiffuSeq's ``selectBest``).
    """
    groups = _check_candidates(candidates, minimum=1)
    selected = []
    for group in groups:
        words = [c.split() for c in group]
        totals = [
            math.fsum(_bleu_of_words(words[i], words[j]) for j in range(len(words)) if j != i)
            for i in range(len(words))
        ]
        selected.append(group[int(np.argmax(totals))])
    return selected


# ----------------------------------------------------------------- BERTScore
def bertscore(hyps: Sequence[str], refs: Sequence[str], model_type: str | None = None) -> float:
    """Mean BERTScore F1 (needs the optional ``bert-score`` package and a model).

    Args:
        model_type: a ``bert_score`` model name; None uses DiffuSeq's
            :data:`DIFFUSEQ_BERTSCORE_MODEL`.

    Raises:
        ImportError: ``bert-score`` is not installed.
    """
    hyps, refs = _check_pairs(hyps, refs)
    try:
        import bert_score
    except ImportError as error:
        raise ImportError(
            "bertscore needs the bert-score package: pip install dlmone[bertscore]"
        ) from error
    _, _, f1 = bert_score.score(
        hyps, refs, model_type=model_type or DIFFUSEQ_BERTSCORE_MODEL, lang="en", verbose=False
    )
    return float(f1.mean())


# ------------------------------------------------------------------- summary
def evaluate(
    hyps: Sequence[str],
    refs: Sequence[str],
    candidates: Sequence[Sequence[str]] | None = None,
) -> dict[str, float]:
    """The SPEC §7 metrics of ``hyps`` against ``refs``.

    Returns:
        ``bleu``, ``rouge_l``, ``dist1`` and ``len``; with ``candidates`` (the
        S >= 2 samples of each input, one group per hypothesis) also
        ``self_bleu`` and ``div4``.
    """
    hyps, refs = _check_pairs(hyps, refs)
    scores = {
        "bleu": bleu(hyps, refs),
        "rouge_l": rouge_l(hyps, refs),
        "dist1": dist1(hyps),
        "len": mean_length(hyps),
    }
    if candidates is not None:
        groups = _check_candidates(candidates, minimum=2)
        if len(groups) != len(hyps):
            raise ValueError(f"{len(groups)} candidate groups but {len(hyps)} hyps")
        scores["self_bleu"] = self_bleu(groups)
        scores["div4"] = div4(groups)
    return scores


# ------------------------------------------------------ degeneration monitors
def repeated_token_rate(token_lists: Sequence[Sequence[object]] | np.ndarray) -> float:
    """Share of adjacent token pairs that are equal, pooled over all sequences.

    ``token_lists`` holds token sequences (word lists or id arrays; strip
    padding first, or repeated [PAD]s count). 0.0 when no sequence has two
    tokens.
    """
    if isinstance(token_lists, str):
        raise TypeError("token_lists must be a sequence of token sequences, not a str")
    repeats = 0
    pairs = 0
    for index, tokens in enumerate(token_lists):
        if isinstance(tokens, str):
            raise TypeError(
                f"token_lists[{index}] is a str; pass token sequences such as text.split()"
            )
        tokens = list(tokens)
        repeats += sum(a == b for a, b in zip(tokens, tokens[1:]))
        pairs += max(len(tokens) - 1, 0)
    return repeats / pairs if pairs else 0.0


def empty_rate(hyps: Sequence[str]) -> float:
    """Fraction of hypotheses that are empty or whitespace only."""
    hyps = _check_strings(hyps, "hyps")
    return sum(not h.strip() for h in hyps) / len(hyps)

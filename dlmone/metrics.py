"""Evaluation metrics with DiffuSeq's protocol, so numbers compare with papers (SPEC §7).

Inputs are plain strings without special tokens (as :func:`dlmone.data.decode_targets`
returns them) and are split on whitespace. The definitions follow DiffuSeq's
``eval_seq2seq.py``:

* BLEU: nltk ``sentence_bleu`` with the one reference, uniform 4-gram weights,
  smoothing ``method4``, averaged over sentences, in two orientations (SPEC §7):
  ``"standard"`` scores the generated text as nltk's hypothesis against the gold
  reference; ``"diffuseq"`` swaps them as DiffuSeq's script does
  (``sentence_bleu([recover.split()], reference.split())``), the orientation of the
  DiffuSeq and DLM-One papers' figures. :func:`evaluate` reports ``bleu`` (standard)
  and ``bleu_diffuseq`` and says so in ``bleu_protocol``.
* sacreBLEU: corpus BLEU of ``sacrebleu`` (default 13a tokenisation, 0-100 scale)
  with its signature string, for comparison with MT-style reporting.
* ROUGE-L: F-measure of ``rouge_score``'s ``rougeL`` (no stemming; it lower-cases
  and keeps alphanumeric tokens exactly as the torchmetrics ``ROUGEScore`` DiffuSeq
  used; a test checks the two agree on real sentences), averaged over sentences.
* Dist-1: unique / total unigrams of a sentence, averaged (an empty sentence
  scores 0; DiffuSeq returned 0 for the whole set when any sentence was empty).
* Len: mean number of whitespace-separated words (DiffuSeq split on ``' '``,
  which also counted empty strings between repeated spaces).
* Over the S candidates of each input: self-BLEU (mean BLEU of candidate i
  against candidate j over pairs i < j) and div-4 (unique / total 4-grams pooled
  over the candidates), each averaged over inputs; MBR picks the candidate with
  the largest summed BLEU against the others. Both take the BLEU orientation too:
  DiffuSeq's ``diversityOfSet`` and ``selectBest`` call ``get_bleu(c_i, c_j)``,
  i.e. the ``"diffuseq"`` orientation of ``sentence_bleu(c_i, c_j)``.

:func:`repeated_token_rate` and :func:`empty_rate` are not paper metrics: they
watch for degenerate output (repetition, empty sequences) during training.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from nltk.translate.bleu_score import SmoothingFunction
from nltk.translate.bleu_score import sentence_bleu as _nltk_sentence_bleu
from rouge_score.rouge_scorer import RougeScorer
from sacrebleu.metrics import BLEU as _SacreBLEU

__all__ = [
    "DIFFUSEQ_BERTSCORE_MODEL",
    "BLEU_ORIENTATIONS",
    "BLEU_PROTOCOL",
    "sentence_bleu",
    "bleu",
    "sacrebleu_corpus",
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

#: ``"standard"``: nltk's hypothesis is the generated text; ``"diffuseq"``: it is the
#: gold reference (DiffuSeq's eval_seq2seq.py).
BLEU_ORIENTATIONS = ("standard", "diffuseq")
#: What the ``bleu`` columns mean; every metrics dict, JSON and table carries it.
BLEU_PROTOCOL = (
    "bleu = mean nltk sentence_bleu([reference], generated), 4-gram, smoothing method4 "
    "(standard orientation); bleu_diffuseq = the same with generated and reference swapped, "
    "as DiffuSeq's eval_seq2seq.py (the orientation of the DiffuSeq/DLM-One papers' figures)"
)

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
def _check_orientation(orientation: str) -> str:
    if orientation not in BLEU_ORIENTATIONS:
        raise ValueError(f"orientation must be one of {BLEU_ORIENTATIONS}, got {orientation!r}")
    return orientation


def _bleu_of_words(hypothesis: list[str], reference: list[str], orientation: str = "standard") -> float:
    # nltk returns 0 (no error, no warning) when no unigram matches, which
    # covers empty hypotheses and empty references.
    if orientation == "diffuseq":
        hypothesis, reference = reference, hypothesis
    return float(
        _nltk_sentence_bleu(
            [reference], hypothesis, weights=_BLEU_WEIGHTS, smoothing_function=_SMOOTHING
        )
    )


def sentence_bleu(hypothesis: str, reference: str, orientation: str = "standard") -> float:
    """Sentence BLEU of ``hypothesis`` (generated) with ``reference`` (gold).

    4-gram uniform weights with nltk's smoothing ``method4``; 0.0 when the
    hypothesis (or reference) is empty. ``orientation="standard"`` passes
    ``reference`` as nltk's reference; ``"diffuseq"`` swaps the two as DiffuSeq's
    ``get_bleu(recover, reference)`` does.
    """
    if not isinstance(hypothesis, str) or not isinstance(reference, str):
        raise TypeError(
            "hypothesis and reference must be str, got "
            f"{type(hypothesis).__name__} and {type(reference).__name__}"
        )
    return _bleu_of_words(hypothesis.split(), reference.split(), _check_orientation(orientation))


def bleu(hyps: Sequence[str], refs: Sequence[str], orientation: str = "standard") -> float:
    """Mean :func:`sentence_bleu` over aligned hypothesis/reference lists."""
    hyps, refs = _check_pairs(hyps, refs)
    _check_orientation(orientation)
    return _mean([_bleu_of_words(h.split(), r.split(), orientation) for h, r in zip(hyps, refs)])


def sacrebleu_corpus(hyps: Sequence[str], refs: Sequence[str]) -> tuple[float, str]:
    """sacreBLEU corpus BLEU (0-100, default settings: 13a tokenisation, exp smoothing,
    case-sensitive) of ``hyps`` with one reference each, and its signature string."""
    hyps, refs = _check_pairs(hyps, refs)
    metric = _SacreBLEU()
    score = metric.corpus_score(hyps, [refs])
    return float(score.score), str(metric.get_signature())


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


def self_bleu(candidates: Sequence[Sequence[str]], orientation: str = "standard") -> float:
    """Mean pairwise BLEU among each input's candidates, averaged over inputs.

    For the S >= 2 candidates of an input, the mean of
    ``sentence_bleu(c_i, c_j, orientation)`` over i < j (with ``"diffuseq"``:
    DiffuSeq's ``diversityOfSet``). Lower is more diverse.
    """
    groups = _check_candidates(candidates, minimum=2)
    _check_orientation(orientation)
    scores = []
    for group in groups:
        words = [c.split() for c in group]
        pair_scores = [
            _bleu_of_words(words[i], words[j], orientation)
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


def mbr_select(candidates: Sequence[Sequence[str]], orientation: str = "standard") -> list[str]:
    """Minimum-Bayes-risk choice among each input's candidates (SPEC §5).

    For each input, the candidate with the largest sum of
    ``sentence_bleu(candidate, other, orientation)`` over the other candidates;
    ties go to the earliest candidate (with ``"diffuseq"``: DiffuSeq's ``selectBest``).
    """
    groups = _check_candidates(candidates, minimum=1)
    _check_orientation(orientation)
    selected = []
    for group in groups:
        words = [c.split() for c in group]
        totals = [
            math.fsum(_bleu_of_words(words[i], words[j], orientation)
                      for j in range(len(words)) if j != i)
            for i in range(len(words))
        ]
        selected.append(group[int(np.argmax(totals))])
    return selected


# ----------------------------------------------------------------- BERTScore
def _bertscore_layers(model_dir: Path, model2layers: dict[str, int]) -> int:
    """bert-score's default layer for a folder named like one of its models
    (``.../deberta-xlarge-mnli`` -> 40, the layer DiffuSeq's score used)."""
    by_name = {name.split("/")[-1]: layers for name, layers in model2layers.items()}
    if model_dir.name not in by_name:
        raise ValueError(
            f"bertscore: no default layer for a model folder named {model_dir.name!r}; "
            "pass num_layers (bert-score uses 40 for microsoft/deberta-xlarge-mnli)"
        )
    return by_name[model_dir.name]


def bertscore(
    hyps: Sequence[str],
    refs: Sequence[str],
    model_dir: str | os.PathLike,
    num_layers: int | None = None,
    batch_size: int = 64,
) -> float:
    """Mean BERTScore F1 with a model read from a local folder (no network).

    Needs the optional ``bert-score`` package (``pip install dlmone[bertscore]``).
    DiffuSeq scored with :data:`DIFFUSEQ_BERTSCORE_MODEL`; fetch it once on a
    machine with network (``huggingface-cli download microsoft/deberta-xlarge-mnli
    --local-dir models/deberta-xlarge-mnli``) and pass that folder.

    Args:
        model_dir: a Hugging Face model folder (``config.json``, weights, tokenizer files).
        num_layers: the layer whose embeddings are matched; None takes bert-score's
            default for the model the folder is named after.

    Raises:
        FileNotFoundError: ``model_dir`` is not a folder with a ``config.json``.
        ImportError: ``bert-score`` is not installed.
    """
    hyps, refs = _check_pairs(hyps, refs)
    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"bertscore: {folder} is not a model folder (no config.json). BERTScore runs "
            "offline from a local copy: on a machine with network run `huggingface-cli download "
            f"{DIFFUSEQ_BERTSCORE_MODEL} --local-dir DIR` and pass DIR"
        )
    try:
        import bert_score
    except ImportError as error:
        raise ImportError(
            "bertscore needs the bert-score package: pip install dlmone[bertscore]"
        ) from error
    if num_layers is None:
        num_layers = _bertscore_layers(folder, bert_score.utils.model2layers)
    _, _, f1 = bert_score.score(
        hyps, refs, model_type=str(folder), num_layers=num_layers, batch_size=batch_size,
        verbose=False,
    )
    return float(f1.mean())


# ------------------------------------------------------------------- summary
def evaluate(
    hyps: Sequence[str],
    refs: Sequence[str],
    candidates: Sequence[Sequence[str]] | None = None,
) -> dict[str, float | str]:
    """The SPEC §7 metrics of ``hyps`` against ``refs``.

    Returns:
        ``bleu`` (standard orientation), ``bleu_diffuseq`` (DiffuSeq's script),
        ``rouge_l``, ``dist1``, ``len``, ``sacrebleu`` (corpus, 0-100); with
        ``candidates`` (the S >= 2 samples of each input, one group per hypothesis)
        also ``self_bleu``, ``self_bleu_diffuseq`` and ``div4``; and two strings
        that say what was computed: ``bleu_protocol`` (:data:`BLEU_PROTOCOL`) and
        ``sacrebleu_signature``.
    """
    hyps, refs = _check_pairs(hyps, refs)
    sacre, signature = sacrebleu_corpus(hyps, refs)
    scores: dict[str, float | str] = {
        "bleu": bleu(hyps, refs),
        "bleu_diffuseq": bleu(hyps, refs, "diffuseq"),
        "rouge_l": rouge_l(hyps, refs),
        "dist1": dist1(hyps),
        "len": mean_length(hyps),
        "sacrebleu": sacre,
    }
    if candidates is not None:
        groups = _check_candidates(candidates, minimum=2)
        if len(groups) != len(hyps):
            raise ValueError(f"{len(groups)} candidate groups but {len(hyps)} hyps")
        scores["self_bleu"] = self_bleu(groups)
        scores["self_bleu_diffuseq"] = self_bleu(groups, "diffuseq")
        scores["div4"] = div4(groups)
    scores["bleu_protocol"] = BLEU_PROTOCOL
    scores["sacrebleu_signature"] = signature
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

"""The trivial baselines reported beside every results table (SPEC §7.1).

* copy-the-source: the output is the source itself;
* the most frequent training target, output for every source;
* the best of the ``k`` most frequent training targets, chosen by BLEU on the
  valid split (used for every source).

They are scored with :func:`dlmone.metrics.evaluate` on the same sources and
references as the model they sit beside. A model whose BLEU does not beat the
constant string has not learnt the task, whatever its loss says.

Texts go through ``to_protocol`` first when given: the references of
``dlmone generate`` are the gold targets tokenised and decoded (DiffuSeq's
protocol), so the baselines' outputs must be too (:func:`tokenizer_protocol`);
without it the texts are scored as written (references read from a plain file).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from .metrics import bleu, evaluate

__all__ = [
    "TextProtocol",
    "tokenizer_protocol",
    "frequent_targets",
    "best_constant",
    "constant_strings",
    "baseline_rows",
    "constant_warnings",
]

#: ``(sources, texts) -> texts``: what generation would write for ``texts`` as the
#: outputs for ``sources``.
TextProtocol = Callable[[Sequence[str], Sequence[str]], list]


def tokenizer_protocol(tokenizer: Any, seq_len: int) -> TextProtocol:
    """Texts as ``dlmone generate`` writes references: laid out as the target of
    their source (truncated the same way), tokenised and decoded."""
    from .data import decode_targets, encode_pairs

    def to_protocol(sources: Sequence[str], texts: Sequence[str]) -> list:
        ids, mask = encode_pairs(list(zip(sources, texts)), tokenizer, seq_len)
        return decode_targets(ids, mask, tokenizer)

    return to_protocol


def _as_written(sources: Sequence[str], texts: Sequence[str]) -> list:
    return list(texts)


def frequent_targets(train: Sequence[tuple[str, str]], k: int) -> list[str]:
    """The ``k`` most frequent training targets, most frequent first (ties: first seen)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if not train:
        raise ValueError("train is empty: the constant baselines need training targets")
    return [text for text, _ in Counter(trg for _, trg in train).most_common(k)]


def best_constant(train: Sequence[tuple[str, str]], valid: Sequence[tuple[str, str]], k: int = 10,
                  to_protocol: TextProtocol | None = None) -> tuple[str, float]:
    """Among the ``k`` most frequent training targets, the one whose BLEU as the
    output for every valid source is highest, and that BLEU (standard orientation,
    the ``bleu`` column); ties go to the more frequent target."""
    if not valid:
        raise ValueError("valid is empty: choosing the best constant needs a valid split")
    to_protocol = to_protocol or _as_written
    sources = [src for src, _ in valid]
    refs = to_protocol(sources, [trg for _, trg in valid])
    best: tuple[str, float] = ("", -1.0)
    for text in frequent_targets(train, k):
        score = bleu(to_protocol(sources, [text] * len(sources)), refs)
        if score > best[1]:
            best = (text, score)
    return best


def constant_strings(train: Sequence[tuple[str, str]], valid: Sequence[tuple[str, str]], k: int = 10,
                     to_protocol: TextProtocol | None = None) -> dict[str, str]:
    """The two constant outputs, by baseline name: the most frequent training target
    and the best of the ``k`` most frequent on valid (:func:`best_constant`)."""
    return {"baseline: most frequent train target": frequent_targets(train, 1)[0],
            f"baseline: best of {k} frequent targets on valid": best_constant(train, valid, k, to_protocol)[0]}


def baseline_rows(sources: Sequence[str], refs: Sequence[str], constants: dict[str, str],
                  to_protocol: TextProtocol | None = None) -> list[dict[str, Any]]:
    """Copy-the-source and the ``constants`` (from :func:`constant_strings`) scored on
    ``sources`` against ``refs`` (already in the protocol's form, as a generation
    file holds them).

    Returns rows ``{"name", "kind": "baseline", "output", "scores"}``; ``output`` is
    the constant string (None for copy-the-source).
    """
    to_protocol = to_protocol or _as_written
    sources, refs = list(sources), list(refs)
    if len(sources) != len(refs):
        raise ValueError(f"{len(sources)} sources but {len(refs)} references")
    rows = [{"name": "baseline: copy the source", "kind": "baseline", "output": None,
             "scores": evaluate(to_protocol(sources, sources), refs)}]
    for name, text in constants.items():
        rows.append({"name": name, "kind": "baseline", "output": text,
                     "scores": evaluate(to_protocol(sources, [text] * len(sources)), refs)})
    return rows


def constant_warnings(rows: Sequence[dict[str, Any]], baselines: Sequence[dict[str, Any]]) -> list[str]:
    """A warning for every model row whose BLEU does not beat the best constant string.

    ``rows`` and ``baselines`` hold ``name`` and ``scores`` (with ``bleu``)."""
    constant = max((b for b in baselines if b.get("output") is not None),
                   key=lambda b: b["scores"]["bleu"])
    floor = constant["scores"]["bleu"]
    return [f"warning: {r['name']}: BLEU {r['scores']['bleu']:.4f} does not beat the constant string "
            f"{constant['output']!r} ({floor:.4f}); the model has not learnt the task"
            for r in rows if r["scores"]["bleu"] <= floor]

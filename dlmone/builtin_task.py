"""A built-in synthetic paraphrase task that needs no downloads.

Each example is a sentence about a *concept* — an intent (learning something,
comparing two things, an opinion, a career question, …) with its slot values
(a topic, a group of people, a place, …) — and a paraphrase of it:

* the source is the concept rendered with one of the intent's templates;
* the target is the same concept rendered with a *different* template of the
  intent, chosen at random, and with frame synonyms (``hard``/``difficult``/
  ``tough``, ``good``/``great``, ``enjoy``/``love``/``like``) drawn afresh.

So the target keeps the source's content words, possibly in another order
(``which is better for nurses, chess or golf?`` ->
``is golf worse than chess for nurses?``), and changes the frame words: it is
determined by the source up to the seeded choice of template and synonyms.
Every source has several valid targets, so diversity is measurable and BLEU
against the one reference is below 1 even for a perfect model.

Numbers: 8 intents with 3–4 templates each, 215 distinct words, 6–12
words a sentence (each side at most 13 BERT-uncased tokens, so a pair fits
``seq_len=32`` untruncated). A concept appears in at most one example, so no
source content is shared between splits. Generation uses Python's
``random.Random(seed)``, so the same arguments give the same data.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .data import Pair, PathLike, write_jsonl

__all__ = ["BUILTIN_NAME", "make_builtin_task", "write_builtin_task"]

#: Name under which the built-in task is offered in place of a data folder.
BUILTIN_NAME = "builtin"

_TOPICS = (
    "python", "chemistry", "physics", "guitar", "piano", "french", "spanish", "german",
    "math", "history", "biology", "cooking", "painting", "drawing", "photography",
    "economics", "statistics", "geometry", "algebra", "calculus", "poetry", "music",
    "chess", "swimming", "dancing", "singing", "writing", "programming", "design",
    "marketing", "philosophy", "psychology", "astronomy", "geology", "law", "medicine",
    "engineering", "accounting", "japanese", "chinese", "italian", "russian", "arabic",
    "latin", "yoga", "running", "boxing", "tennis", "golf", "football", "basketball",
    "baseball", "hockey", "cycling", "gardening", "sculpture", "architecture",
    "linguistics", "finance", "acting",
)  # fmt: skip
_GROUPS = (
    "students", "teachers", "doctors", "engineers", "parents", "scientists", "artists",
    "lawyers", "farmers", "nurses", "programmers", "writers", "musicians", "designers",
    "managers", "children",
)  # fmt: skip
_PLACES = (
    "canada", "india", "japan", "germany", "france", "brazil", "mexico", "china", "spain",
    "italy", "australia", "egypt", "kenya", "russia", "turkey", "sweden", "norway",
    "poland", "chile", "peru",
)  # fmt: skip
_JOBS = (
    "a doctor", "a lawyer", "a pilot", "a nurse", "a teacher", "an engineer", "a chef",
    "a writer", "a journalist", "a designer", "an architect", "a dentist", "a baker",
    "a scientist", "a programmer", "a photographer", "a musician", "an actor",
    "a banker", "a farmer", "a soldier", "a driver", "a translator", "a painter",
)  # fmt: skip
_ROUTES = (
    "after college", "at forty", "without a degree", "with no experience",
    "in two years", "as a student",
)  # fmt: skip
_CONTEXTS = (
    "at home", "online", "for free", "in the summer", "on their own", "without a teacher",
    "after work", "at school",
)  # fmt: skip
_RESOURCES = (
    "book", "course", "website", "video", "podcast", "textbook", "blog", "magazine",
)  # fmt: skip

#: Frame words that each rendering draws at random (the same meaning).
_SYNONYMS = {
    "hard": ("hard", "difficult", "tough"),
    "good": ("good", "great"),
    "like": ("enjoy", "love", "like"),
}

Concept = dict[str, str]


def _slot(name: str, values: Sequence[str]) -> list[Concept]:
    return [{name: value} for value in values]


_TOPIC_PAIRS = [{"a": a, "b": b} for a, b in itertools.permutations(_TOPICS, 2)]


@dataclass(frozen=True)
class _Intent:
    """Templates that all say the same thing about the same slot values."""

    name: str
    slots: tuple[list[Concept], ...]
    templates: tuple[str, ...]

    @property
    def n_concepts(self) -> int:
        return math.prod(len(values) for values in self.slots)

    def concept(self, index: int) -> Concept:
        """The slot values with mixed-radix number ``index``."""
        fields: Concept = {}
        for values in reversed(self.slots):
            index, digit = divmod(index, len(values))
            fields.update(values[digit])
        return fields


_INTENTS = (
    _Intent(
        "learn",
        (_slot("group", _GROUPS), _slot("topic", _TOPICS), _slot("context", _CONTEXTS)),
        (
            "how can {group} learn {topic} {context}?",
            "how should {group} learn {topic} {context}?",
            "is it possible for {group} to learn {topic} {context}?",
            "can {group} really learn {topic} {context}?",
        ),
    ),
    _Intent(
        "duration",
        (_slot("group", _GROUPS), _slot("topic", _TOPICS), _slot("context", _CONTEXTS)),
        (
            "how long does it take {group} to learn {topic} {context}?",
            "how much time do {group} need to learn {topic} {context}?",
            "how many months do {group} need to master {topic} {context}?",
        ),
    ),
    _Intent(
        "opinion",
        (_slot("group", _GROUPS), _slot("place", _PLACES), _slot("topic", _TOPICS)),
        (
            "what do {group} in {place} think about {topic}?",
            "how do {group} in {place} feel about {topic}?",
            "what is the opinion of {group} in {place} on {topic}?",
            "what are the views of {group} in {place} about {topic}?",
        ),
    ),
    _Intent(
        "difficulty",
        (_slot("group", _GROUPS), _slot("place", _PLACES), _slot("topic", _TOPICS)),
        (
            "why is {topic} so {hard} for {group} in {place}?",
            "why do {group} in {place} find {topic} so {hard}?",
            "what makes {topic} {hard} for {group} in {place}?",
            "why do {group} in {place} struggle with {topic}?",
        ),
    ),
    _Intent(
        "popularity",
        (_slot("group", _GROUPS), _slot("place", _PLACES), _slot("topic", _TOPICS)),
        (
            "many {group} in {place} {like} {topic}.",
            "{topic} is very popular among {group} in {place}.",
            "a lot of {group} in {place} {like} {topic}.",
            "in {place}, {topic} is a favorite hobby of {group}.",
        ),
    ),
    _Intent(
        "compare",
        (_slot("group", _GROUPS), _TOPIC_PAIRS),
        (
            "which is better for {group}, {a} or {b}?",
            "should {group} choose {a} or {b}?",
            "for {group}, is {a} better than {b}?",
            "is {b} worse than {a} for {group}?",
        ),
    ),
    _Intent(
        "recommend",
        (_slot("resource", _RESOURCES), _slot("topic", _TOPICS), _slot("group", _GROUPS)),
        (
            "what is a {good} {resource} about {topic} for {group}?",
            "can you recommend a {good} {resource} on {topic} for {group}?",
            "which {resource} about {topic} should {group} use?",
            "what {resource} would you suggest to {group} for {topic}?",
        ),
    ),
    _Intent(
        "career",
        (_slot("job", _JOBS), _slot("place", _PLACES), _slot("route", _ROUTES)),
        (
            "how do i become {job} in {place} {route}?",
            "what is needed to become {job} in {place} {route}?",
            "how can i become {job} in {place} {route}?",
        ),
    ),
)


def _render(template: str, concept: Concept, rng: random.Random) -> str:
    frame_words = {name: rng.choice(words) for name, words in _SYNONYMS.items()}
    return template.format(**concept, **frame_words)


def _allocate(total: int, capacities: Sequence[int]) -> list[int]:
    """Split ``total`` as evenly as the ``capacities`` allow (water-filling)."""
    shares = [0] * len(capacities)
    remaining = total
    open_slots = sorted(range(len(capacities)), key=lambda index: (capacities[index], index))
    for position, index in enumerate(open_slots):
        fair = math.ceil(remaining / (len(open_slots) - position))
        shares[index] = min(capacities[index], fair)
        remaining -= shares[index]
    return shares


def _check_count(value: object, argument: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{argument} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{argument} must be >= 0, got {value}")
    return value


def make_builtin_task(
    n_train: int = 20000, n_valid: int = 500, n_test: int = 500, seed: int = 0
) -> dict[str, list[Pair]]:
    """Generate the built-in paraphrase task.

    Returns:
        ``{"train": [...], "valid": [...], "test": [...]}`` lists of
        ``(src, trg)`` pairs. Every example has its own concept (intent and slot
        values), so no source, nor its content, repeats within or across splits.
        Intents are represented as evenly as their sizes allow.

    Raises:
        ValueError: more examples are asked for than the grammar has concepts.
    """
    counts = {
        "train": _check_count(n_train, "n_train"),
        "valid": _check_count(n_valid, "n_valid"),
        "test": _check_count(n_test, "n_test"),
    }
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    total = sum(counts.values())
    capacities = [intent.n_concepts for intent in _INTENTS]
    if total > sum(capacities):
        raise ValueError(
            f"n_train + n_valid + n_test = {total} exceeds the {sum(capacities)} "
            "distinct concepts of the built-in grammar"
        )
    rng = random.Random(seed)
    chosen = [
        (intent, concept_index)
        for intent, share in zip(_INTENTS, _allocate(total, capacities))
        for concept_index in rng.sample(range(intent.n_concepts), share)
    ]
    rng.shuffle(chosen)

    examples: list[Pair] = []
    for intent, concept_index in chosen:
        concept = intent.concept(concept_index)
        source_template, target_template = rng.sample(intent.templates, 2)
        examples.append(
            (_render(source_template, concept, rng), _render(target_template, concept, rng))
        )
    splits: dict[str, list[Pair]] = {}
    start = 0
    for split, count in counts.items():
        splits[split] = examples[start : start + count]
        start += count
    return splits


def write_builtin_task(
    out_dir: PathLike, n_train: int = 20000, n_valid: int = 500, n_test: int = 500, seed: int = 0
) -> Path:
    """Write :func:`make_builtin_task` as ``train/valid/test.jsonl`` in ``out_dir``.

    Each file is written atomically. Returns ``out_dir`` as a Path.
    """
    out_dir = Path(out_dir)
    for split, pairs in make_builtin_task(n_train, n_valid, n_test, seed).items():
        write_jsonl(out_dir / f"{split}.jsonl", pairs)
    return out_dir

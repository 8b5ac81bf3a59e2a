"""Tests of the generation-input readers of dlmone.data: read_sources (plain text or
jsonl, detected by name or content, stdin), read_lines and read_generations, and their
errors naming file:line."""

from __future__ import annotations

import gzip
import io
import json
import sys

import pytest

from dlmone.data import read_generations, read_lines, read_sources

PAIRS = [{"src": "how can i learn python ?", "trg": "what is the best way to learn python ?"},
         {"src": " is quora useful?", "trg": "why use quora? "}]


def _jsonl(records):
    return "".join(json.dumps(r) + "\n" for r in records)


@pytest.mark.parametrize("name", ["in.jsonl", "in", "in.data", "in.jsonl.gz"])
def test_jsonl_with_targets(tmp_path, name):
    path = tmp_path / name
    data = ("\n" + _jsonl(PAIRS) + "\n").encode()  # blank lines are skipped in jsonl
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    assert read_sources(path) == (["how can i learn python ?", "is quora useful?"],
                                  ["what is the best way to learn python ?", "why use quora?"])


def test_jsonl_without_targets_and_extra_keys(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(_jsonl([{"src": "a b", "id": 1}, {"src": "c"}]))
    assert read_sources(path) == (["a b", "c"], None)


def test_plain_text(tmp_path):
    path = tmp_path / "in.txt"
    path.write_text("\ufeffhow can i learn python ?\r\n  {not json} or so \nthird\n\n\n")
    assert read_sources(path) == (["how can i learn python ?", "{not json} or so", "third"], None)
    # without an extension the first line decides: not a JSON object with "src" -> text
    other = tmp_path / "sources"
    other.write_text('{"text": "a"}\n{"src": "b"}\n')
    assert read_sources(other) == (['{"text": "a"}', '{"src": "b"}'], None)
    # a .txt name is text whatever its lines look like
    as_text = tmp_path / "j.txt"
    as_text.write_text(_jsonl(PAIRS))
    assert read_sources(as_text)[0] == [json.dumps(p) for p in PAIRS]


def test_stdin(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(_jsonl(PAIRS).encode())))
    assert read_sources("-")[1] == ["what is the best way to learn python ?", "why use quora?"]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"a\nb\n")))
    assert read_sources("-") == (["a", "b"], None)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"x\n\ny\n")))
    with pytest.raises(ValueError, match="<stdin>:2: empty line"):
        read_lines("-")


@pytest.mark.parametrize("content, message", [
    ('{"src": "a"}\n{"src": "b"\n', r"in\.jsonl:2: not JSON"),
    ('{"src": "a"}\n[1]\n', r"in\.jsonl:2: expected a JSON object, got list"),
    ('{"src": "a"}\n{"trg": "b"}\n', r"in\.jsonl:2: missing key 'src'"),
    ('{"src": "a", "trg": null}\n', r"in\.jsonl:1: 'trg' is NoneType"),
    ('{"src": "a"}\n{"src": "b", "trg": "c"}\n', r"in\.jsonl:2: line 2 has a 'trg' and line 1 has none"),
    ('"just a string"\n', r"in\.jsonl:1: expected a JSON object, got str"),
    ("\n\n", r"in\.jsonl: no sources"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "in.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_sources(path)


def test_bad_text_names_file_and_line(tmp_path):
    path = tmp_path / "in.txt"
    path.write_bytes(b"fine\n\xff\xfe broken\n")
    with pytest.raises(ValueError, match=r"in\.txt:2: not UTF-8"):
        read_sources(path)
    path.write_text("a\n \nb\n")
    with pytest.raises(ValueError, match=r"in\.txt:2: empty line"):
        read_sources(path)
    path.write_text("\n  \n")
    with pytest.raises(ValueError, match=r"in\.txt: no lines"):
        read_sources(path)
    # a jsonl detected by its first line is then read strictly
    mixed = tmp_path / "mixed"
    mixed.write_text('{"src": "a"}\nplain text\n')
    with pytest.raises(ValueError, match=r"mixed:2: not JSON"):
        read_sources(mixed)
    with pytest.raises(FileNotFoundError):
        read_sources(tmp_path / "missing.txt")
    broken = tmp_path / "in.jsonl.gz"
    broken.write_bytes(gzip.compress(b'{"src": "a"}\n')[:-6])
    with pytest.raises(ValueError, match="corrupt gzip"):
        read_sources(broken)


def test_read_lines(tmp_path):
    path = tmp_path / "refs.txt"
    path.write_text("what is love ?\n why ?\n")
    assert read_lines(path) == ["what is love ?", "why ?"]


def test_read_generations(tmp_path):
    path = tmp_path / "gen.jsonl"
    rows = [{"source": "a", "reference": "b", "recover": "c"}, {"recover": "d", "candidates": ["d", "e"]}]
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    assert read_generations(path) == (str(path), [(1, rows[0]), (3, rows[1])])
    path.write_text(json.dumps({"recover": "a", "source": ["x"]}) + "\n")
    with pytest.raises(ValueError, match=r"gen\.jsonl:1: not a generation row \('source' is list"):
        read_generations(path)
    path.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_generations(path)

"""Tests for rayclust.vocabulary and its packaged WordNet noun list."""

from __future__ import annotations

import gzip
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from rayclust import vocabulary as V

REPO_ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build_wordnet_vocabulary.py"
WORDNET_DIR = Path("/usr/share/wordnet")


def _data_dir():
    return resources.files("rayclust.vocabulary") / "data"


def _read_rows() -> tuple[list[str], list[list[str]]]:
    raw = (_data_dir() / V.WORDNET_DATA_FILE).read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    assert lines[-1] == ""  # trailing newline
    header, *rows = (line.split("\t") for line in lines[:-1])
    return header, rows


def test_data_file_is_packaged_and_small():
    path = _data_dir() / V.WORDNET_DATA_FILE
    assert path.is_file()
    assert len(path.read_bytes()) < 1_000_000


def test_header_and_row_count_matches_constant():
    header, rows = _read_rows()
    assert header == ["noun", "tagged_sense_count", "senses", "semcor_count"]
    assert all(len(row) == 4 for row in rows)
    assert len(rows) == V.WORDNET_NOUN_COUNT
    assert V.WORDNET_NOUN_COUNT > 100_000
    assert len(V.load_wordnet_nouns()) == V.WORDNET_NOUN_COUNT


def test_nouns_are_clean_and_unique():
    nouns = V.load_wordnet_nouns()
    assert all(nouns), "empty noun"
    assert not [n for n in nouns if "_" in n]
    assert not [n for n in nouns if n != n.strip()]
    assert len(set(nouns)) == len(nouns)
    assert "physical entity" in nouns  # from physical_entity


def test_order_is_by_semcor_count_then_tagged_count():
    _, rows = _read_rows()
    keys = [(int(r[3]), int(r[1])) for r in rows]
    assert all(a >= b for a, b in zip(keys, keys[1:]))
    assert all(int(r[2]) >= 1 for r in rows)
    # Ties broken by noun ascending.
    for a, b in zip(rows, rows[1:]):
        if (a[3], a[1]) == (b[3], b[1]):
            assert a[0] < b[0]
    # File order is what the loader returns.
    assert V.load_wordnet_nouns(100) == [r[0] for r in rows[:100]]


def test_common_nouns_are_in_first_5000():
    top = set(V.load_wordnet_nouns(5000))
    for noun in ("dog", "cat", "car", "airplane", "bird", "house", "tree", "person", "horse"):
        assert noun in top, noun


def test_max_nouns_and_cache_is_not_mutable():
    first = V.load_wordnet_nouns(10)
    assert len(first) == 10
    assert first == V.load_wordnet_nouns()[:10]
    first.clear()
    assert len(V.load_wordnet_nouns(10)) == 10
    assert V.load_nouns("wordnet", max_nouns=3) == V.load_wordnet_nouns(3)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            V.load_wordnet_nouns(bad)


def test_custom_file_source(tmp_path):
    path = tmp_path / "nouns.txt"
    path.write_text(
        "# my vocabulary\n\n  dog \ncat\n#comment\ndog\nsea lion\n\ncat\nzebra\n",
        encoding="utf-8",
    )
    assert V.load_nouns(str(path)) == ["dog", "cat", "sea lion", "zebra"]
    assert V.load_nouns(path, max_nouns=2) == ["dog", "cat"]
    assert V.load_nouns(f"file://{path}") == ["dog", "cat", "sea lion", "zebra"]


def test_custom_source_with_read_text():
    calls = []

    def read_text(uri: str) -> str:
        calls.append(uri)
        return "apple\n# fruit\napple\npear\n"

    assert V.load_nouns("s3://bucket/nouns.txt", read_text=read_text) == ["apple", "pear"]
    assert calls == ["s3://bucket/nouns.txt"]
    with pytest.raises(ValueError, match="read_text"):
        V.load_nouns("s3://bucket/nouns.txt")


def test_empty_vocabulary_raises(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("# only comments\n\n   \n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        V.load_nouns(str(path))
    with pytest.raises(ValueError, match="empty"):
        V.load_nouns("mem://x", read_text=lambda uri: "")


def test_templates_and_prompts():
    assert len(V.TAC_TEMPLATES) == 7
    assert all(t.count("{}") == 1 for t in V.TAC_TEMPLATES)
    assert V.TAC_TEMPLATES[0] == "itap of a {}."
    prompts = V.prompts_for("dog")
    assert len(prompts) == 7
    assert "a photo of the small dog." in prompts
    assert V.prompts_for("sea lion", ["a photo of a {}."]) == ["a photo of a sea lion."]


def test_license_is_packaged():
    lic = _data_dir() / V.WORDNET_LICENSE_FILE
    assert lic.is_file()
    text = lic.read_text(encoding="utf-8")
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in text
    assert "build_wordnet_vocabulary.py" in text
    assert "THIS SOFTWARE AND DATABASE IS PROVIDED \"AS IS\"" in text


def test_import_does_not_pull_heavy_deps():
    code = (
        "import sys, rayclust.vocabulary; "
        "bad = [m for m in ('torch', 'ray') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


@pytest.mark.skipif(
    not (WORDNET_DIR / "index.noun").exists(),
    reason="WordNet 3.0 not installed at /usr/share/wordnet (Debian package wordnet-base)",
)
def test_build_script_is_reproducible(tmp_path):
    out = tmp_path / "wordnet_nouns.tsv.gz"
    result = subprocess.run(
        [sys.executable, str(BUILD_SCRIPT), "--wordnet-dir", str(WORDNET_DIR), "--output", str(out)],
        check=True,
        capture_output=True,
        text=True,
    )
    assert str(V.WORDNET_NOUN_COUNT) in result.stdout
    assert out.read_bytes() == (_data_dir() / V.WORDNET_DATA_FILE).read_bytes()
    lic = tmp_path / V.WORDNET_LICENSE_FILE
    assert lic.read_bytes() == (_data_dir() / V.WORDNET_LICENSE_FILE).read_bytes()

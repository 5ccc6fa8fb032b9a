"""Noun vocabularies and prompt templates for text counterparts.

Language-assisted clustering (SEIC, LAIC-RS, TAC) pairs every image with
"text counterparts" retrieved from a large noun vocabulary embedded by CLIP's
text encoder.  This module provides:

* :data:`TAC_TEMPLATES` -- the 7-prompt ensemble used by TAC;
* :func:`load_wordnet_nouns` -- the packaged WordNet 3.0 noun list
  (``data/wordnet_nouns.tsv.gz``, built by
  ``scripts/build_wordnet_vocabulary.py``; licence in
  ``data/LICENSE-WordNet.txt``);
* :func:`load_nouns` -- the WordNet list or a user-supplied text file;
* :func:`prompts_for` -- expand a noun with a template ensemble.

Only the standard library is imported here (no torch / ray).
"""

from __future__ import annotations

import csv
import functools
import gzip
import io
import os
import re
from collections.abc import Callable, Iterable, Sequence
from importlib import resources

__all__ = [
    "TAC_TEMPLATES",
    "WORDNET_NOUN_COUNT",
    "WORDNET_DATA_FILE",
    "WORDNET_LICENSE_FILE",
    "load_wordnet_nouns",
    "load_nouns",
    "parse_noun_lines",
    "prompts_for",
]

#: The 7-template ensemble used by TAC, chosen in OpenAI's CLIP "Prompt
#: Engineering for ImageNet" notebook.  Each string has exactly one ``{}``.
TAC_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

#: Number of distinct nouns (rows after the header) in the packaged
#: ``data/wordnet_nouns.tsv.gz``: every noun lemma of WordNet 3.0's
#: ``index.noun`` with underscores replaced by spaces.  Update it whenever the
#: data file is rebuilt (a test checks that they agree).
WORDNET_NOUN_COUNT: int = 117798

#: Name of the packaged noun list inside ``rayclust/vocabulary/data``.  It is a
#: gzip TSV with header ``noun, tagged_sense_count, senses, semcor_count``,
#: sorted by SemCor frequency (``semcor_count``) descending.
WORDNET_DATA_FILE = "wordnet_nouns.tsv.gz"
#: Name of the WordNet 3.0 licence shipped next to :data:`WORDNET_DATA_FILE`.
WORDNET_LICENSE_FILE = "LICENSE-WordNet.txt"

WORDNET_SOURCE = "wordnet"

_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def _check_max_nouns(max_nouns: int | None) -> None:
    if max_nouns is None:
        return
    if isinstance(max_nouns, bool) or not isinstance(max_nouns, int) or max_nouns < 1:
        raise ValueError(f"max_nouns must be a positive integer or None, got {max_nouns!r}")


@functools.lru_cache(maxsize=1)
def _wordnet_nouns() -> tuple[str, ...]:
    """All packaged nouns in file order (cached; immutable)."""
    path = resources.files(__name__) / "data" / WORDNET_DATA_FILE
    with path.open("rb") as raw, gzip.open(raw, mode="rt", encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        col = header.index("noun")
        return tuple(row[col] for row in reader if row)


def load_wordnet_nouns(max_nouns: int | None = None) -> list[str]:
    """Return the packaged WordNet 3.0 nouns, most frequent first.

    The file is ordered by SemCor occurrence count (WordNet's ``cntlist.rev``)
    descending, so ``max_nouns=N`` keeps the N nouns most frequent in SemCor
    tagging -- a cheap way to get a small vocabulary of common nouns (e.g. for
    CPU demos).  ``None`` returns all :data:`WORDNET_NOUN_COUNT` nouns.

    The file is read once and cached; each call returns a fresh list.
    """
    _check_max_nouns(max_nouns)
    nouns = _wordnet_nouns()
    return list(nouns if max_nouns is None else nouns[:max_nouns])


def parse_noun_lines(lines: Iterable[str]) -> list[str]:
    """Strip lines, drop blanks and ``#`` comments, de-duplicate (first wins)."""
    seen: set[str] = set()
    out: list[str] = []
    for line in lines:
        noun = line.strip()
        if not noun or noun.startswith("#") or noun in seen:
            continue
        seen.add(noun)
        out.append(noun)
    return out


def load_nouns(
    source: str | os.PathLike[str],
    max_nouns: int | None = None,
    read_text: Callable[[str], str] | None = None,
) -> list[str]:
    """Load a noun vocabulary.

    Args:
        source: ``"wordnet"`` for the packaged WordNet list
            (:func:`load_wordnet_nouns`); otherwise a path or URI of a UTF-8
            text file with one noun per line.  Blank lines and lines starting
            with ``#`` are ignored; nouns are stripped and de-duplicated
            keeping the first occurrence (file order is preserved).
        max_nouns: keep only the first N nouns (``None``: all).
        read_text: optional ``uri -> str`` callable used to read ``source``
            (e.g. storage-backed reading for ``s3://...``).  Without it only
            local paths (or ``file://`` URIs) can be read.

    Raises:
        ValueError: if the vocabulary is empty, ``max_nouns`` is invalid, or a
            non-local URI is given without ``read_text``.
    """
    _check_max_nouns(max_nouns)
    if isinstance(source, str) and source == WORDNET_SOURCE:
        return load_wordnet_nouns(max_nouns)

    src = os.fspath(source)
    if read_text is not None:
        text = read_text(src)
    else:
        if src.startswith("file://"):
            src = src[len("file://") :]
        elif _URI_SCHEME.match(src):
            raise ValueError(
                f"cannot read noun vocabulary {src!r}: non-local source needs a read_text callable"
            )
        with open(src, encoding="utf-8") as fh:
            text = fh.read()

    nouns = parse_noun_lines(io.StringIO(text))
    if not nouns:
        raise ValueError(
            f"noun vocabulary {src!r} is empty (no non-blank, non-comment lines)"
        )
    return nouns if max_nouns is None else nouns[:max_nouns]


def prompts_for(noun: str, templates: Sequence[str] = TAC_TEMPLATES) -> list[str]:
    """Fill every template's ``{}`` with ``noun`` (one prompt per template)."""
    return [template.format(noun) for template in templates]

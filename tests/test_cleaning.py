"""Cleaning that must not damage code and technical text, HTML pages that must be stripped, per-source
cleaning options in a mixture, and near-deduplication of documents with few or no words (issue 10.4, 10.6)."""
from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from lmtrain.data.cleaning import CleaningConfig, clean_batch, clean_text, looks_like_html, shingle_hashes
from lmtrain.data.sources import DataError, SourceSpec
from lmtrain.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]

# Code and technical text that contains `<`, tags, entities or indentation: default cleaning keeps every byte.
SURVIVES = {
    "jsx": 'function App({ title }) {\n  return <div className="app"><h1>{title}</h1>Hello</div>;\n}',
    "sql": "SELECT name FROM users WHERE a <b AND c> d ORDER BY name;",
    "special_token_string": 'tokens = ["<s>", "</s>", "<pad>"]  # sentencepiece markers',
    "escaping_code": 'def escape(s):\n    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")',
    "cpp_template": "template <typename T>\nstd::vector<std::pair<int, T>> zip(const std::vector<T>& v) {}",
    "python_indented": "    def f(x):\n        return x < 3 and x > 1\n",
    "html_in_python_string": 'html = "<ul><li>" + "</li><li>".join(items) + "</li></ul>"\nprint(html)',
    "vue_template": "<template>\n  <div class=\"box\"><p>{{ message }}</p><b>{{ count }}</b></div>\n</template>",
    "php": '<?php echo "<b>" . $name . "</b>"; ?>\n<p>Welcome back</p>',
    "rust_generics": "fn first<T: Clone>(v: &Vec<Option<T>>) -> Option<T> { v[0].clone() }",
    "maths": "For all 0 < x < 1 we have x^2 < x, and for y > 1 we have y^2 > y.",
    "entities_in_plain_text": "Tom &amp; Jerry is a cartoon; in HTML source it is written that way.",
    "markdown_about_html": "Use the <br> element for a line break inside a paragraph of Markdown text.",
    "shell": 'echo "<p>hello</p>" > index.html && cat <<EOF\nline\nEOF',
}

# HTML documents and their text, written out by hand.
STRIPPED = {
    "page": ('<!DOCTYPE html>\n<html lang="en">\n<head>\n  <meta charset="utf-8">\n  <title>Cats &amp; Dogs</title>\n'
             '  <style>body { color: red; }</style>\n  <script>var x = 1 < 2;</script>\n</head>\n<body>\n'
             '  <nav><a href="/">Home</a></nav>\n  <p>Cats are <b>great</b> &mdash; dogs too.</p>\n'
             '  <!-- tracking -->\n  <p>&copy; 2024 Pets&nbsp;Inc.</p>\n</body>\n</html>\n',
             "Cats & Dogs\n\nHome\n\nCats are great \u2014 dogs too.\n\n\u00a9 2024 Pets\u00a0Inc."),
    "page_without_doctype": ("<html><body><p class=\"intro\">Hello <b>world</b>, this is a page &amp; more.</p>"
                             "<script>alert('x')</script><!-- comment --></body></html>",
                             "Hello world, this is a page & more."),
    "xhtml": ('<?xml version="1.0" encoding="UTF-8"?>\n<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Strict//EN">\n'
              '<html><body><h1>Title</h1><p>Body text with &lt;angle&gt; brackets.</p></body></html>',
              "Title\n\nBody text with <angle> brackets."),
    "forum_fragment": ("<p>I tried this &amp; it failed:</p><ul><li>first step</li><li>second step</li></ul>"
                       "<p>Any ideas?</p>",
                       "I tried this & it failed:\n\nfirst step\n\nsecond step\n\nAny ideas?"),
    "stack_exchange_fragment": ("<p>How do I compare?</p><pre><code>if (a &lt; b) { return 1; }\n</code></pre>"
                                "<p>Thanks, <em>everyone</em>.</p>",
                                "How do I compare?\n\nif (a < b) { return 1; }\n\nThanks, everyone."),
}


@pytest.mark.parametrize("name", SURVIVES)
def test_code_and_technical_text_survive_byte_exact(name):
    text = SURVIVES[name]
    expected = text.rstrip()  # only trailing whitespace goes
    assert not looks_like_html(text)
    assert clean_text(text, CleaningConfig()) == (expected, "")


@pytest.mark.parametrize("name", STRIPPED)
def test_html_documents_are_stripped_and_their_entities_decoded(name):
    page, text = STRIPPED[name]
    assert looks_like_html(page)
    assert clean_text(page, CleaningConfig()) == (text, "")
    assert clean_text(page, CleaningConfig(strip_html=False)) == (page.rstrip(), "")  # the switch


def test_only_leading_blank_lines_and_trailing_whitespace_are_removed():
    assert clean_text("\n\n   \n    def f(x):\n        return x  \n\n", CleaningConfig()) == (
        "    def f(x):\n        return x", "")
    assert clean_text("  \t  \n \n", CleaningConfig(min_chars=0)) == ("", "")


def test_source_spec_cleaning_options():
    spec = SourceSpec.parse("code=data/code/*.parquet@0.1:strip_html=false,min_chars=0")
    assert spec == SourceSpec("code", "data/code/*.parquet", 0.1, {"strip_html": False, "min_chars": 0})
    assert spec.cleaning_config(CleaningConfig()) == CleaningConfig(strip_html=False, min_chars=0)
    assert SourceSpec.parse("data/code/:max_chars=100") == SourceSpec("code", "data/code/", 1.0, {"max_chars": 100})
    # A hub dataset's `name:config` is not an option list (no `=` after the colon).
    assert SourceSpec.parse("wiki=wikimedia/wikipedia:20231101.en@0.1") == SourceSpec(
        "wiki", "wikimedia/wikipedia:20231101.en", 0.1)
    with pytest.raises(UserError, match=r"source 'code=x.jsonl:strip_htm=false': unknown cleaning option "
                                        r"'strip_htm'; per-source options are .*strip_html"):
        SourceSpec.parse("code=x.jsonl:strip_htm=false")
    with pytest.raises(DataError, match="dedup_near.*unknown|unknown cleaning option 'dedup_near'"):
        SourceSpec.parse("code=x.jsonl:dedup_near=false")
    with pytest.raises(DataError, match="strip_html='maybe' is not true or false"):
        SourceSpec.parse("code=x.jsonl@2:strip_html=maybe")
    with pytest.raises(DataError, match="min_chars='ten' is not an integer"):
        SourceSpec.parse("code=x.jsonl:min_chars=ten")


def test_per_source_cleaning_in_a_mixture():
    """An .html file in a code corpus is code: `:strip_html=false` keeps it, while the web source's copy is
    stripped; `min_chars=0` keeps the code source's one-liner, which the global limit drops for web."""
    page, page_text = STRIPPED["page_without_doctype"]
    specs = [SourceSpec.parse("web=web.jsonl@0.9"), SourceSpec.parse("code=code/@0.1:strip_html=false,min_chars=0")]
    config = CleaningConfig()
    batch = {"text": [page, "x=1", page, "x=1"], "drop": [""] * 4, "source": ["web", "web", "code", "code"]}
    out = clean_batch(batch, config, {s.name: s.cleaning_config(config) for s in specs if s.cleaning})
    assert out["text"] == [page_text, "x=1", page, "x=1"]
    assert out["drop"] == ["", "too_short", "", ""]


def test_per_source_cleaning_through_the_pipeline(write_jsonl, prepare_data, packed_documents, tiny_tokenizer):
    page, page_text = STRIPPED["page_without_doctype"]
    path = write_jsonl([{"text": page}, {"text": "x=1"}])
    for spec, expected, dropped in [(path, [page_text], {"too_short": 1}),
                                    (f"code={path}:strip_html=false,min_chars=0", [page, "x=1"], {})]:
        dataset, report = prepare_data([spec])
        assert [tiny_tokenizer.decode(d[:-1]) for d in packed_documents(dataset["train"])] == expected
        assert report.dropped == dropped
    with pytest.raises(UserError, match="--validation_files '.*data.jsonl:min_chars=0': per-source cleaning options"):
        prepare_data([path], validation_files=[f"{path}:min_chars=0"])


def test_unknown_cleaning_option_is_one_message(tmp_path):
    """Through an entry script: exit 2, one `error:` line naming the source spec, no traceback."""
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "data_prep" / "train_tokenizer.py"), "--sources",
         "code=data/code/*.parquet@0.1:strip_htm=false", "--output_dir", str(tmp_path / "tok")],
        capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "code=data/code/*.parquet@0.1:strip_htm=false" in errors[0]
    assert "unknown cleaning option 'strip_htm'" in errors[0]


# ------------------------------------------------------------------------------------------ near dedup

def jaccard(a: str, b: str, n: int = 5) -> float:
    x, y = set(shingle_hashes(a, n).tolist()), set(shingle_hashes(b, n).tolist())
    return len(x & y) / len(x | y)


def english_text(words: int, seed: int) -> str:
    rng = random.Random(seed)
    vocabulary = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
                  for _ in range(300)]
    return " ".join(rng.choice(vocabulary) for _ in range(words)) + "."


CHINESE = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处理府研"


@pytest.mark.parametrize("a, b", [
    ("🎉🎉🎉🚀🚀🚀🎉🎉🎉🚀🚀🚀🎉🎉🎉🚀🚀🚀🎉🎉🎉", "∑∫∂√∞≈≠≤≥∀∃∈∉⊂⊃∪∩∑∫∂√∞≈≠≤≥"),  # no word characters
    ("if (a < b) { return x; }", "if (a > b) { return x; }"),                       # one operator differs
    ("x = [1, 2, 3] + [4, 5]", "x = (1, 2, 3) + (4, 5)"),
    (CHINESE[:120], CHINESE[120:240]),                                              # unspaced script
])
def test_distinct_documents_have_distinct_shingles(a, b):
    assert jaccard(a, b) < 0.5


def test_near_dedup_keeps_distinct_documents_and_drops_near_copies(write_jsonl, prepare_data):
    base = english_text(200, seed=1)
    words = base.split(" ")
    words[100] = "changedword"
    one_word_changed = " ".join(words)
    chinese = "。".join(CHINESE[i:i + 37] for i in range(0, 370, 37))
    chinese_one_char_changed = chinese[:150] + "猫" + chinese[151:]
    distinct = {
        "emoji": "🎉🎉🎉🚀🚀🚀🎉🎉🎉🚀🚀🚀🎉🎉🎉🚀🚀🚀🎉🎉🎉",
        "maths": "∑∫∂√∞≈≠≤≥∀∃∈∉⊂⊃∪∩∑∫∂√∞≈≠≤≥",
        "less": "while (lo < hi) { mid = (lo + hi) / 2; }",
        "greater": "while (lo > hi) { mid = (lo + hi) / 2; }",
        "english": base,
        "other_english": english_text(200, seed=2),
        "chinese": chinese,
        "other_chinese": CHINESE[200:] + CHINESE[:150],
    }
    near_copies = [one_word_changed, chinese_one_char_changed]
    assert jaccard(base, one_word_changed) > 0.9 and jaccard(chinese, chinese_one_char_changed) > 0.8
    path = write_jsonl({"text": t} for t in [*distinct.values(), *near_copies])
    _, report = prepare_data([path], min_chars=0)
    assert report.dropped == {"near_duplicate": 2}
    assert report.documents_kept["train"] == len(distinct)

"""Hand a trained model to llama.cpp: run llama.cpp's own `convert_hf_to_gguf.py` on it, with the two things a
tokenizer trained here would otherwise trip over.

1. The converter recognises a BPE pre-tokenizer by hashing the token ids of a fixed test string, so it only knows
   tokenizers it has seen before; any newly trained vocabulary stops it with "BPE pre-tokenizer was not
   recognized". The ids differ, but the splitting rule (the regex) is one llama.cpp implements, so when the hash
   is unknown we name the rule from tokenizer.json instead. Unknown rules still fail, with the reason.
2. Our chat template marks assistant turns with `{% generation %}` for assistant-only loss masks; that tag is a
   transformers extension that plain Jinja (llama-cpp-python, llama.cpp's server) rejects. The GGUF gets the same
   template with the markers turned into `{% if true %}` / `{% endif %}`, which renders the same text.

The converter is not vendored: users point at their llama.cpp checkout (or the copy inside a llama-cpp-python
source distribution), so its architecture and tensor mapping stay llama.cpp's.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from lmtrain.tokenizer import QWEN2_SPLIT_REGEX

# llama.cpp's names for the splitting rules it implements (src/llama-vocab.cpp), keyed by the regex that
# tokenizer.json carries for them. ByteLevel's built-in regex (use_regex=True) is GPT-2's.
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
SPLIT_REGEX_NAMES = {
    QWEN2_SPLIT_REGEX: "qwen2",
    QWEN2_SPLIT_REGEX.replace(r"\p{N}|", r"\p{N}{1,3}|"): "llama-bpe",
    GPT2_REGEX: "gpt-2",
    GPT2_REGEX.removesuffix(r"|\s+"): "gpt-2",  # llama.cpp's own spelling of it (llama-vocab.cpp)
}
# `{% generation %}` ... `{% endgeneration %}`, keeping any whitespace-control dashes of the tags
GENERATION_TAG = re.compile(r"\{%(-?)\s*(end)?generation\s*(-?)%\}")


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for the pre-tokenizer in a tokenizer.json, or ValueError saying what was found.
    Only exact matches: a normalizer other than NFC, a prefix space or another split behaviour would make
    llama.cpp tokenize differently under the same name."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    normalizer = (tokenizer_json.get("normalizer") or {}).get("type")
    name = None
    if normalizer in (None, "NFC") and not steps[-1].get("add_prefix_space", False):
        if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
            name = "gpt-2"
        elif (kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True)
              and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert", False)):
            name = SPLIT_REGEX_NAMES.get(steps[0].get("pattern", {}).get("Regex"))
    if name is None:
        raise ValueError(f"pre-tokenizer {json.dumps(pre)[:300]} with normalizer {normalizer} matches none of the "
                         f"rules llama.cpp implements ({', '.join(sorted(set(SPLIT_REGEX_NAMES.values())))}); "
                         "register it in llama.cpp's convert_hf_to_gguf_update.py as its README describes")
    return name


def strip_generation_tags(template: str) -> str:
    """The template without transformers' generation markers; `{% if true %}` keeps the markers' whitespace
    control, so the template renders the same text in plain Jinja."""
    return GENERATION_TAG.sub(lambda m: "{%" + m[1] + (" endif " if m[2] else " if true ") + m[3] + "%}", template)


def _plain_template_copy(model_dir: Path, workdir: Path) -> Path:
    """A view of model_dir (symlinks) whose chat templates have no {% generation %} markers."""
    rewritten = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")
    view = workdir / model_dir.name
    view.mkdir()
    for item in model_dir.iterdir():
        if item.name not in rewritten:
            (view / item.name).symlink_to(item.resolve())
    jinja = model_dir / "chat_template.jinja"
    if jinja.exists():
        (view / jinja.name).write_text(strip_generation_tags(jinja.read_text(encoding="utf-8")), encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        if (model_dir / name).exists():
            config = json.loads((model_dir / name).read_text(encoding="utf-8"))
            template = config.get("chat_template")
            if isinstance(template, str):
                config["chat_template"] = strip_generation_tags(template)
            elif isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
                config["chat_template"] = [{**t, "template": strip_generation_tags(t["template"])} for t in template]
            (view / name).write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
    return view


def _classes_defining(attribute: str, modules) -> list[type]:
    """Every class in modules whose own body defines attribute (the converter moved it between files)."""
    found = []
    for module in modules:
        for value in vars(module).values():
            if isinstance(value, type) and attribute in vars(value) and value not in found:
                found.append(value)
    return found


def _run_converter(model_dir: str, outfile: str, outtype: str, llama_cpp_dir: str, fallback: str) -> None:
    """In a fresh interpreter (so the converter imports its own gguf-py, not whatever gguf this process has):
    llama.cpp's main() with get_vocab_base_pre falling back to `fallback` (a rule name, or why there is none)."""
    sys.path.insert(0, llama_cpp_dir)
    sys.argv = ["convert_hf_to_gguf.py", model_dir, "--outfile", outfile, "--outtype", outtype]
    import convert_hf_to_gguf as converter

    modules = [converter] + [m for name, m in list(sys.modules.items()) if name.startswith("conversion")]
    originals = {owner: vars(owner)["get_vocab_base_pre"] for owner in _classes_defining("get_vocab_base_pre",
                                                                                          modules)}
    if not originals:
        raise SystemExit(f"{converter.__file__} has no get_vocab_base_pre: this llama.cpp differs from the one "
                         "lmtrain was checked against (the copy in llama-cpp-python 0.3.36)")

    def recognised_or_named(self, tokenizer):
        original = next(originals[cls] for cls in type(self).__mro__ if cls in originals)
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            if fallback not in SPLIT_REGEX_NAMES.values():
                raise NotImplementedError(f"llama.cpp does not know this vocabulary, and {fallback}") from None
            print(f"llama.cpp does not know this vocabulary; its pre-tokenizer is the {fallback!r} rule, so the "
                  "GGUF names that rule", flush=True)
            return fallback

    for owner in originals:
        owner.get_vocab_base_pre = recognised_or_named
    converter.main()


def check_llama_cpp_dir(llama_cpp_dir: str | None) -> Path:
    """The llama.cpp folder whose convert_hf_to_gguf.py will run, or FileNotFoundError saying what to pass."""
    script = Path(llama_cpp_dir or ".") / "convert_hf_to_gguf.py"
    if not llama_cpp_dir or not script.exists():
        raise FileNotFoundError(f"{script} not found: --llama_cpp_dir must be a llama.cpp checkout (git clone "
                                "https://github.com/ggml-org/llama.cpp) or the vendor/llama.cpp folder of a "
                                "llama-cpp-python source distribution")
    return script.parent.resolve()


def convert_to_gguf(model_dir: str, outfile: str, llama_cpp_dir: str, outtype: str = "bf16") -> Path:
    """Run llama.cpp's converter on model_dir and return the GGUF path."""
    model_dir, outfile, llama_cpp_dir = Path(model_dir).resolve(), Path(outfile).resolve(), check_llama_cpp_dir(
        llama_cpp_dir)
    fallback = f"{model_dir} has no tokenizer.json"
    if (model_dir / "tokenizer.json").exists():
        try:
            fallback = pre_tokenizer_name(json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8")))
        except ValueError as error:
            fallback = str(error)
    with tempfile.TemporaryDirectory() as workdir:
        view = _plain_template_copy(model_dir, Path(workdir))
        code = "import sys; from lmtrain.gguf import _run_converter; _run_converter(*sys.argv[1:])"
        subprocess.run([sys.executable, "-c", code, str(view), str(outfile), outtype,
                        str(llama_cpp_dir), fallback],
                       check=True, cwd=Path(__file__).resolve().parent.parent)
    return outfile

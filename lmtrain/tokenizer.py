"""Tokenizers: training the project's byte-level BPE, and loading any Hugging Face tokenizer directory.

Special tokens: `<|endoftext|>` ends every pretraining document; `<|im_start|>` / `<|im_end|>` delimit chat
turns (ChatML); `<|pad|>` is a dedicated pad token, so padding can be masked without ever masking a token
whose loss matters (padding with EOS would hide the end-of-text token from the loss).
"""
from __future__ import annotations

import logging
from typing import Iterable, Iterator

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

logger = logging.getLogger(__name__)

END_OF_TEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [END_OF_TEXT, IM_START, IM_END, PAD]

# Qwen2's split rule: words with their leading space or punctuation, each digit alone, runs of whitespace.
# It is not only a good rule: transformers loads every `model_type: qwen2` directory as Qwen2Tokenizer, which
# replaces the normalizer and pre-tokenizer in tokenizer.json with exactly NFC + this regex. A tokenizer
# trained with another rule would then tokenize SFT data, evaluation text and prompts (here and in vLLM,
# lm-eval, pipeline()) differently from the pretraining data. The same rule is llama.cpp's "qwen2".
QWEN2_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                     r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# ChatML. `{% generation %}` marks what the assistant writes (its content and its <|im_end|>), so
# `apply_chat_template(..., return_assistant_tokens_mask=True)` tells which tokens carry the SFT loss.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{- message['content'] + '<|im_end|>' -}}{% endgeneration %}{{- '\\n' -}}"
    "{%- else -%}"
    "{{- message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2,
                        show_progress: bool = True):
    """Train a byte-level BPE on `texts`; returns a `PreTrainedTokenizerFast` ready for `save_pretrained`.

    Byte-level means no text is unknown: `decode(encode(x)) == x` for any NFC-normalized input (the
    cleaning step writes NFC; other input comes back in its NFC form). The normalizer and split rule are
    the ones transformers' Qwen2Tokenizer imposes on load (see QWEN2_SPLIT_REGEX).
    """
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size {vocab_size} is too small: a byte-level BPE needs at least 261 entries")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=END_OF_TEXT,
        pad_token=PAD,
        unk_token=None,
        bos_token=None,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=1_000_000,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def sample_texts(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """The first documents of ONE text stream, until `max_chars` characters (0: all). Chained over several
    sources this would never reach the later ones: data_prep/train_tokenizer.py uses `sample_sources`."""
    total = 0
    for text in texts:
        if max_chars and total >= max_chars:
            return
        yield text
        total += len(text)


# Sampling unit: documents longer than this are cut (at a line break or space where one is near) so that one
# book cannot fill a source's share, and the share can be met to the character.
SAMPLE_PIECE_CHARS = 20_000


def split_text(text: str, max_chars: int = SAMPLE_PIECE_CHARS) -> Iterator[str]:
    """`text` in pieces of at most `max_chars` characters, cut after the last line break (else space) of the
    window's second half, so few words are cut in two (BPE sees a cut word as two words)."""
    start = 0
    while len(text) - start > max_chars:
        window = text[start:start + max_chars]
        cut = window.rfind("\n", max_chars // 2) + 1 or window.rfind(" ", max_chars // 2) + 1 or max_chars
        yield window[:cut]
        start += cut
    if start < len(text):
        yield text[start:]


def sample_pieces(texts: Iterable[str], max_chars: int, rng, scan_chars: int = 0) -> tuple[list[str], dict]:
    """A uniform random subset of a source's pieces (`split_text`) holding exactly `max_chars` characters
    (all of them when the source is smaller; 0: all), in source order, and what was seen and taken.

    One streaming pass: each piece gets a random key and the pieces with the smallest keys are kept, just
    enough to reach `max_chars` (the last one is cut). Memory holds the sample, never the whole source.
    `scan_chars` (0: no limit) stops reading after that many characters: the sample is then uniform over
    the source's first `scan_chars` characters, so a multi-terabyte source is not read to its end to
    train a tokenizer on a few hundred megabytes."""
    import heapq

    heap: list = []  # (-key, position, piece): heap[0] is the kept piece with the largest key
    kept_chars = seen_chars = seen_pieces = documents = 0
    for text in texts:
        if scan_chars and seen_chars >= scan_chars:
            break
        documents += 1
        for piece in split_text(text):
            seen_pieces += 1
            seen_chars += len(piece)
            key = rng.random()
            if max_chars and kept_chars >= max_chars and key > -heap[0][0]:
                continue  # it would be the first piece evicted
            heapq.heappush(heap, (-key, seen_pieces, piece))
            kept_chars += len(piece)
            while max_chars and kept_chars - len(heap[0][2]) >= max_chars:
                kept_chars -= len(heapq.heappop(heap)[2])
    if max_chars and kept_chars > max_chars:  # cut the piece with the largest key to meet the share exactly
        key, position, piece = heapq.heappop(heap)
        heap.append((key, position, piece[:len(piece) - (kept_chars - max_chars)]))
        kept_chars = max_chars
    pieces = [piece for _, _, piece in sorted(heap, key=lambda item: item[1])]
    return pieces, {"documents_seen": documents, "pieces_seen": seen_pieces, "chars_seen": seen_chars,
                    "pieces_sampled": len(pieces), "chars_sampled": kept_chars}


def sample_sources(sources: list, max_chars: int, seed: int = 1234, scan_factor: float = 0) -> tuple[list[str], dict]:
    """Texts to train a tokenizer on, from several sources: each source gets its weight share of `max_chars`
    (0: everything), sampled across all its documents (`sample_pieces`). `sources` holds (name, weight,
    iterable of texts). Returns the texts and a report: per source its share, target and what was sampled.

    With `scan_factor` > 0 each source is read only up to `scan_factor` times its share (`sample_pieces`).
    A source smaller than its share gives all it has; the other sources keep their shares (the sample is
    then smaller than `max_chars`, and a warning says so), so the weights still hold between them."""
    import random
    import zlib

    weight_sum = sum(weight for _, weight, _ in sources)
    texts, report = [], {"sample_chars": max_chars, "seed": seed, "scan_factor": scan_factor, "sources": {}}
    for name, weight, source_texts in sources:
        target = int(max_chars * weight / weight_sum) if max_chars else 0
        if max_chars and target == 0:
            target = 1
        rng = random.Random(seed * 1_000_003 + zlib.crc32(name.encode("utf-8")))  # per-source, order-free
        scan = int(target * scan_factor) if target and scan_factor else 0
        pieces, stats = sample_pieces(source_texts, target, rng, scan)
        texts.extend(pieces)
        report["sources"][name] = {"weight": weight, "share": weight / weight_sum, "target_chars": target, **stats}
        logger.info("tokenizer sample from %s: %d chars in %d pieces (target %s; read %d chars in "
                    "%d documents)", name, stats["chars_sampled"], stats["pieces_sampled"], target or "all",
                    stats["chars_seen"], stats["documents_seen"])
        if max_chars and stats["chars_seen"] < target:
            logger.warning("source %s holds only %d of the %d characters of its share: all of it is used, and "
                           "the sample is smaller than --sample_chars", name, stats["chars_seen"], target)
    report["chars_sampled"] = sum(info["chars_sampled"] for info in report["sources"].values())
    return texts, report


def load_tokenizer(name_or_path: str, what: str = "--tokenizer_name", **kwargs):
    """Any HF tokenizer directory or hub name.

    Label masks in this project are built from positions (where padding was added, which tokens are
    prompts), never by comparing token ids with `pad_token_id`. So a tokenizer whose pad token equals its
    EOS token (common for LLaMA-style tokenizers) is safe here: the pad id only fills input positions and
    the real end-of-text token keeps its loss. A tokenizer with no pad token gets one without growing the
    vocabulary (which would need the model's embeddings resized).
    """
    from transformers import AutoTokenizer

    from lmtrain.locations import TOKENIZER_FILES, load_from

    # A missing local path is one message, never a hub lookup (`what` names the flag it came from).
    tokenizer = load_from(AutoTokenizer.from_pretrained, name_or_path, what, needs=TOKENIZER_FILES,
                          kind="tokenizer", **kwargs)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer '{name_or_path}' defines no eos_token, so documents could not be separated; "
                         "set eos_token in its tokenizer_config.json")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = PAD if PAD in tokenizer.get_vocab() else tokenizer.eos_token
        logger.info("tokenizer '%s' has no pad token: padding with %s (labels are masked by position, "
                    "so the end-of-text token still carries loss)", name_or_path, tokenizer.pad_token)
    return tokenizer


# Digits, contractions, runs of spaces and newlines, CJK, emoji and a decomposed accent: the places where
# split rules and normalizers disagree.
RELOAD_PROBE = "I've 12345 apples,  he'LL say:\n\n\tx = f(3.14)  # ok\r\n我想在apple工作1314天 🚀 cafe\u0301 !!!"


def check_reload_consistency(tokenizer, model_config) -> None:
    """Fail before training if a saved model directory would come back with a tokenizer that splits text
    differently. transformers picks the tokenizer class from the model config's model_type, and some classes
    (Qwen2Tokenizer for `qwen2`) rebuild the normalizer and pre-tokenizer instead of reading tokenizer.json;
    a tokenizer trained with other rules would then see its training data tokenized one way and every later
    prompt, SFT sample and evaluation text another way."""
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as directory:
        tokenizer.save_pretrained(directory)
        model_config.save_pretrained(directory)
        reloaded = AutoTokenizer.from_pretrained(directory)
    before = tokenizer(RELOAD_PROBE, add_special_tokens=False)["input_ids"]
    after = reloaded(RELOAD_PROBE, add_special_tokens=False)["input_ids"]
    if before != after:
        raise ValueError(
            f"saved next to a '{model_config.model_type}' model config, this tokenizer ({type(tokenizer).__name__}) "
            f"reloads as {type(reloaded).__name__} and tokenizes differently ({len(before)} vs {len(after)} tokens "
            f"on a probe text): the model would be trained on one tokenization and used with another. Retrain the "
            f"tokenizer with data_prep/train_tokenizer.py (its rules survive a reload for qwen2 and llama), or use "
            f"a model config whose tokenizer class reads tokenizer.json as it is (e.g. configs/llama-1b.json)")


def end_of_turn_token_id(tokenizer) -> int | None:
    """The special token the chat template puts right after an assistant message (<|im_end|> for ChatML,
    <|eot_id|> for LLaMA 3, ...), read from the template itself; None without a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "lmtrain-end-of-turn-probe"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": marker}], tokenize=False)
    except Exception as err:  # templates may reject unusual conversations; then there is nothing to learn
        logger.warning("could not render the chat template to find its end-of-turn token: %s", err)
        return None
    tail = text[text.rfind(marker) + len(marker):]
    ids = tokenizer(tail, add_special_tokens=False).input_ids if tail else []
    return ids[0] if ids and ids[0] in tokenizer.all_special_ids else None

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
    """The first `max_chars` characters of a text stream (0: all): BPE merges converge long before a full
    web corpus has been seen, and training time and memory grow with the sample."""
    total = 0
    for text in texts:
        if max_chars and total >= max_chars:
            return
        yield text
        total += len(text)


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

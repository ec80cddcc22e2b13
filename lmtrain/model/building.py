"""Building the model: from a config (train from scratch) or from pretrained weights, agreeing with the
tokenizer on the vocabulary, with an attention implementation that keeps packed documents apart."""
from __future__ import annotations

import logging

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from lmtrain.arguments import ModelArguments
from lmtrain.locations import load_from
from lmtrain.model.attention import choose_attention
from lmtrain.errors import UserError
from lmtrain.model.config import apply_overrides, check_architecture, parse_overrides, resolve_config
from lmtrain.model.flops import count_parameters
from lmtrain.tokenizer import check_reload_consistency, end_of_turn_token_id

logger = logging.getLogger(__name__)
# Embedding rows are rounded up to a multiple of this when training from scratch: matmuls over the vocab
# run faster on GPUs with aligned shapes, and the extra rows are never produced by the tokenizer.
VOCAB_MULTIPLE = 64


def build_model(args: ModelArguments, tokenizer, dtype: torch.dtype | None = None):
    """From scratch (config_name) or from weights (model_name_or_path); checks the vocabulary either way."""
    hub = {"cache_dir": args.cache_dir, "revision": args.model_revision, "trust_remote_code": args.trust_remote_code}
    attention = choose_attention(args.attn_implementation)
    if args.model_name_or_path:
        config = load_from(AutoConfig.from_pretrained, args.model_name_or_path, "--model_name_or_path", **hub)
        config = apply_overrides(config, args.config_overrides)
        torch_dtype = args.torch_dtype if args.torch_dtype in (None, "auto") else getattr(torch, args.torch_dtype)
        model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, config=config, dtype=torch_dtype,
                                                     attn_implementation=attention, **hub)
        _check_vocabulary(model, tokenizer, args)
    else:
        config = resolve_config(args.config_name or "qwen2-tiny", args.config_overrides, **hub)
        check_architecture(config.to_dict(), f"--config_name {args.config_name or 'qwen2-tiny'}")
        vocab = -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        given = _vocab_size_given(args.config_overrides)
        if given is not None:
            # Reserved rows (e.g. the 151,936 of Qwen2.5 for a 151,665-token tokenizer) are kept as asked.
            if given < len(tokenizer):
                raise UserError(f"--config_overrides vocab_size={given}: the tokenizer has {len(tokenizer)} tokens, "
                                f"so the embeddings need at least that many rows (leave vocab_size out to get {vocab})")
            vocab = given
        elif config.vocab_size != vocab:
            logger.info("vocab_size %d -> %d (the tokenizer's %d tokens, rounded up to a multiple of %d)",
                        config.vocab_size, vocab, len(tokenizer), VOCAB_MULTIPLE)
            config.vocab_size = vocab
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
        config.bos_token_id = tokenizer.bos_token_id
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32, attn_implementation=attention)
    # A KV cache is useless in training and would also stop transformers from reading packed-sequence
    # boundaries from position_ids; it is switched back on in the saved config.
    model.config.use_cache = False
    check_reload_consistency(tokenizer, model.config)
    model.generation_config = generation_config_for(tokenizer, model.generation_config)
    logger.info("model: %s, %.2fM parameters, attention %s", model.config.model_type,
                count_parameters(model) / 1e6, model.config._attn_implementation)
    return model


def _vocab_size_given(overrides: str | None) -> int | None:
    pairs = dict(parse_overrides(overrides)) if overrides else {}
    return int(pairs["vocab_size"]) if "vocab_size" in pairs else None


def _check_vocabulary(model, tokenizer, args: ModelArguments):
    # num_embeddings, not weight.shape: under ZeRO-3 the weight is partitioned and its local shape is 0
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) <= rows:
        return
    if not args.resize_token_embeddings:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embeddings have {rows} rows: token ids "
            f">= {rows} would crash on the GPU with an index assert. Use the tokenizer the model was trained "
            f"with, or pass --resize_token_embeddings to grow the embeddings (new rows are trained from scratch)")
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=VOCAB_MULTIPLE)
    logger.info("resized embeddings from %d to %d rows", rows, model.get_input_embeddings().num_embeddings)


def generation_config_for(tokenizer, base: GenerationConfig | None = None) -> GenerationConfig:
    """Generation stops at end of text and, for chat tokenizers, at the end of a turn."""
    config = base or GenerationConfig()
    stop_ids = [tokenizer.eos_token_id]
    turn_end = end_of_turn_token_id(tokenizer)
    if turn_end is not None and turn_end not in stop_ids:
        stop_ids.append(turn_end)
    config.eos_token_id = stop_ids if len(stop_ids) > 1 else stop_ids[0]
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = tokenizer.bos_token_id
    return config

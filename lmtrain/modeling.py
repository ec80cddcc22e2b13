"""Building the model: from a config (train from scratch) or from pretrained weights, agreeing with the
tokenizer on the vocabulary, with an attention implementation that keeps packed documents apart."""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from lmtrain.arguments import ModelArguments
from lmtrain.tokenizer import check_reload_consistency, end_of_turn_token_id

logger = logging.getLogger(__name__)
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
# Embedding rows are rounded up to a multiple of this when training from scratch: matmuls over the vocab
# run faster on GPUs with aligned shapes, and the extra rows are never produced by the tokenizer.
VOCAB_MULTIPLE = 64


def resolve_config(name: str, overrides: str | None = None, **hub_kwargs):
    """A directory with config.json, a .json file, a name from configs/, or a hub name."""
    path = Path(name)
    if path.suffix == ".json" and path.is_file():
        config = AutoConfig.from_pretrained(str(path))
    elif (CONFIGS_DIR / f"{name}.json").is_file() and not path.is_dir():
        config = AutoConfig.from_pretrained(str(CONFIGS_DIR / f"{name}.json"))
    else:
        config = AutoConfig.from_pretrained(name, **hub_kwargs)
    return apply_overrides(config, overrides)


def apply_overrides(config, overrides: str | None):
    """`hidden_size=512,num_hidden_layers=8` applied to a config, keeping derived fields consistent."""
    if not overrides:
        return config
    config.update_from_string(overrides)
    values = config.to_dict()
    # Per-layer lists (attention types) follow the layer count; stale ones would fail validation on reload.
    if len(values.get("layer_types") or []) not in (0, values.get("num_hidden_layers")):
        values.pop("layer_types")
    logger.info("config overrides applied: %s", overrides)
    return type(config).from_dict(values)


def _attention(requested: str) -> str:
    if requested == "flash_attention_2" and not (torch.cuda.is_available() and importlib.util.find_spec("flash_attn")):
        logger.warning("flash_attention_2 needs a CUDA GPU and the flash-attn package; using sdpa instead")
        return "sdpa"
    return requested


def count_parameters(model) -> int:
    # Under ZeRO-3 parameters are partitioned and report numel 0; ds_numel holds the real size.
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def build_model(args: ModelArguments, tokenizer, dtype: torch.dtype | None = None):
    """From scratch (config_name) or from weights (model_name_or_path); checks the vocabulary either way."""
    hub = {"cache_dir": args.cache_dir, "revision": args.model_revision, "trust_remote_code": args.trust_remote_code}
    attention = _attention(args.attn_implementation)
    if args.model_name_or_path:
        config = AutoConfig.from_pretrained(args.model_name_or_path, **hub)
        config = apply_overrides(config, args.config_overrides)
        torch_dtype = args.torch_dtype if args.torch_dtype in (None, "auto") else getattr(torch, args.torch_dtype)
        model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, config=config, dtype=torch_dtype,
                                                     attn_implementation=attention, **hub)
        _check_vocabulary(model, tokenizer, args)
    else:
        config = resolve_config(args.config_name or "qwen2-tiny", args.config_overrides, **hub)
        vocab = -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        if config.vocab_size != vocab:
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

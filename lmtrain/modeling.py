"""Building the model: from a config (train from scratch) or from pretrained weights, agreeing with the
tokenizer on the vocabulary, with an attention implementation that keeps packed documents apart."""
from __future__ import annotations

import difflib
import importlib.util
import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from lmtrain.arguments import ModelArguments
from lmtrain.errors import UserError
from lmtrain.locations import load_from
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
        config = load_from(AutoConfig.from_pretrained, name, "--config_name", **hub_kwargs)  # no hub try for paths
    return apply_overrides(config, overrides)


def apply_overrides(config, overrides: str | None):
    """`hidden_size=512,num_hidden_layers=8` applied to a config, keeping derived fields consistent.

    Keys transformers 5 moved into `rope_parameters` (rope_theta, partial_rotary_factor, ...) are accepted
    under their old top-level names and set there. Values take the type of the value they replace."""
    if not overrides:
        return config
    pairs = _parse_overrides(overrides)
    values = config.to_dict()
    derived_head_dim = (values.get("head_dim") is not None and values.get("num_attention_heads")
                        and values["head_dim"] == values.get("hidden_size", 0) // values["num_attention_heads"])
    rope = values.get("rope_parameters")
    for key, raw in pairs:
        if key in values and key != "rope_parameters":
            values[key] = _typed_value(key, raw, values[key])
        elif key in ROPE_KEYS and isinstance(rope, dict):
            # Nested per layer type (e.g. {"full_attention": {...}, "sliding_attention": {...}}): set it in each.
            targets = [v for v in rope.values() if isinstance(v, dict)] or [rope]
            for target in targets:
                target[key] = _typed_value(key, raw, target.get(key, ROPE_KEYS[key]))
        elif key in ("rope_parameters", "rope_scaling"):
            raise UserError(f"--config_overrides {key}=...: {key} is a mapping; override its entries by name "
                            f"(e.g. rope_theta=10000, rope_type=linear,factor=2.0)")
        else:
            near = difflib.get_close_matches(key, [*values, *(ROPE_KEYS if isinstance(rope, dict) else ())], n=3)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise UserError(f"--config_overrides: {config.model_type} configs have no key '{key}'{hint} "
                            f"(the keys are those of the model's config.json)")
    changed = {key for key, _ in pairs}
    # head_dim that was hidden_size // heads follows a changed hidden size or head count; one set explicitly stays.
    if derived_head_dim and "head_dim" not in changed and changed & {"hidden_size", "num_attention_heads"}:
        values["head_dim"] = values["hidden_size"] // max(values["num_attention_heads"], 1)
    # Per-layer lists (attention types) follow the layer count; stale ones would fail validation on reload.
    if len(values.get("layer_types") or []) not in (0, values.get("num_hidden_layers")):
        values.pop("layer_types")
    check_architecture(values, "--config_overrides " + overrides)
    logger.info("config overrides applied: %s", overrides)
    return type(config).from_dict(values)


# The RoPE keys transformers 5 keeps inside config.rope_parameters, with the type their values take.
ROPE_KEYS = {"rope_theta": 10000.0, "rope_type": "default", "partial_rotary_factor": 1.0, "factor": 1.0,
             "original_max_position_embeddings": 0, "attention_factor": 1.0, "beta_fast": 32.0, "beta_slow": 1.0,
             "low_freq_factor": 1.0, "high_freq_factor": 1.0, "mscale": 1.0, "mscale_all_dim": 0.0}


def _parse_overrides(overrides: str) -> list[tuple[str, str]]:
    pairs = []
    for item in overrides.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or not key.strip() or "=" in value or not value.strip():
            raise UserError(f"--config_overrides: '{item}' is not KEY=VALUE; write comma-separated pairs such as "
                            "hidden_size=512,num_hidden_layers=8 (no spaces around '=')")
        pairs.append((key.strip(), value.strip()))
    return pairs


def _typed_value(key: str, raw: str, old):
    def fail(kind):
        return UserError(f"--config_overrides {key}={raw}: {key} takes {kind}")

    lowered = raw.lower()
    if isinstance(old, bool):
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise fail("true or false")
    if isinstance(old, int):
        try:
            return int(raw)
        except ValueError:
            raise fail("a whole number") from None
    if isinstance(old, float):
        try:
            return float(raw)
        except ValueError:
            raise fail("a number") from None
    if old is None:  # unset optional field (sliding_window, head_dim): infer the type from the text
        if lowered in ("none", "null"):
            return None
        if lowered in ("true", "false"):
            return lowered == "true"
        for convert in (int, float):
            try:
                return convert(raw)
            except ValueError:
                pass
        return raw
    if isinstance(old, str):
        return raw
    raise fail(f"a {type(old).__name__}, which cannot be written in an override string; edit the config file")


def check_architecture(values: dict, where: str):
    """Shapes the attention needs, checked before building: a bad combination otherwise fails only in the
    first forward pass with a bare tensor-size message."""
    def fail(problem, fix):
        raise UserError(f"{where}: {problem}. {fix}")

    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "max_position_embeddings", "head_dim"):
        value = values.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            fail(f"{key}={value!r} must be a whole number", f"Set {key} to a positive integer")
        if value <= 0:
            fail(f"{key}={value} must be positive", f"Set {key} to a positive integer")
    hidden, heads = values.get("hidden_size"), values.get("num_attention_heads")
    kv_heads = values.get("num_key_value_heads") or heads
    if not (hidden and heads):
        return
    head_dim = values.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            fail(f"hidden_size={hidden} is not divisible by num_attention_heads={heads}",
                 f"Choose a hidden_size that is a multiple of {heads} (e.g. {(hidden // heads + 1) * heads}) "
                 f"or a head count that divides {hidden}")
        head_dim = hidden // heads
    if heads % kv_heads:
        fail(f"num_attention_heads={heads} is not divisible by num_key_value_heads={kv_heads}",
             "Each key/value head serves a whole group of query heads: pick num_key_value_heads dividing "
             f"{heads}")
    rope = values.get("rope_parameters") or {}
    rope = next((v for v in rope.values() if isinstance(v, dict)), rope)
    rotary = int(head_dim * float(rope.get("partial_rotary_factor") or values.get("partial_rotary_factor") or 1.0))
    if rotary % 2:
        fail(f"the head dimension is {head_dim} (hidden_size={hidden} / num_attention_heads={heads})"
             + (f", rotated over {rotary} dims" if rotary != head_dim else "")
             + ", but RoPE rotates pairs of dimensions and needs an even size",
             f"Choose hidden_size and num_attention_heads so that hidden_size / num_attention_heads is even "
             f"(e.g. hidden_size={2 * heads * max(1, -(-head_dim // 2))})")


# Names transformers accepts for attn_implementation ("eager" is built in; the rest are registered kernels).
def attention_implementations() -> list[str]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ["eager", *(name for name in ALL_ATTENTION_FUNCTIONS.keys() if "|" not in name)]


def check_attention_name(name: str):
    """An unknown --attn_implementation is refused at argument parsing, before any data is prepared."""
    valid = attention_implementations()
    if name not in valid:
        near = difflib.get_close_matches(name, valid, n=1)
        raise ValueError(f"--attn_implementation {name}: not an attention implementation"
                         + (f" (did you mean {near[0]}?)" if near else "") + f"; choose one of {', '.join(valid)}")


def _attention(requested: str) -> str:
    check_attention_name(requested)
    if requested == "flash_attention_2" and not (torch.cuda.is_available() and importlib.util.find_spec("flash_attn")):
        logger.warning("flash_attention_2 needs a CUDA GPU and the flash-attn package; using sdpa instead")
        return "sdpa"
    if requested == "flex_attention" and not torch.cuda.is_available():
        # PyTorch's FlexAttention has no backward pass on the CPU: training would crash at the first step.
        logger.warning("flex_attention cannot train on a CPU (PyTorch's FlexAttention has no CPU backward pass); "
                       "using sdpa instead, which keeps packed documents apart just the same")
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

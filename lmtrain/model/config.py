"""Model configs: a name from configs/, a .json file, a directory or a hub name, with --config_overrides
applied by key and type, and the architecture's shapes checked before anything is built."""
from __future__ import annotations

import difflib
import logging
from pathlib import Path

from transformers import AutoConfig

from lmtrain.errors import UserError
from lmtrain.locations import load_from

logger = logging.getLogger(__name__)
CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"


def resolve_config(name: str, overrides: str | None = None, **hub_kwargs):
    """A directory with config.json, a .json file, a name from configs/, or a hub name."""
    path = Path(name)
    if path.suffix == ".json" and path.is_file():
        try:
            config = AutoConfig.from_pretrained(str(path))
        except (OSError, ValueError) as error:  # not JSON, or no model_type
            raise UserError(f"--config_name {name}: not a model config transformers can read ({error}); a "
                            "config.json needs a model_type, e.g. configs/qwen2.5-0.5b.json") from error
    elif (CONFIGS_DIR / f"{name}.json").is_file() and not path.is_dir():
        config = AutoConfig.from_pretrained(str(CONFIGS_DIR / f"{name}.json"))
    else:
        try:
            config = load_from(AutoConfig.from_pretrained, name, "--config_name", **hub_kwargs)  # no hub for paths
        except UserError as error:
            raise UserError(f"{error}{_builtin_hint(name)}") from error
    return apply_overrides(config, overrides)


def _builtin_hint(name: str) -> str:
    """A typo of a built-in config went to the hub: name the built-in ones it is close to."""
    close = difflib.get_close_matches(name, sorted(p.stem for p in CONFIGS_DIR.glob("*.json")), n=2)
    return f" (built-in configs close to it: {', '.join(close)})" if close else ""


def apply_overrides(config, overrides: str | None):
    """`hidden_size=512,num_hidden_layers=8` applied to a config, keeping derived fields consistent.

    Keys transformers 5 moved into `rope_parameters` (rope_theta, partial_rotary_factor, ...) are accepted
    under their old top-level names and set there. Values take the type of the value they replace."""
    if not overrides:
        return config
    pairs = parse_overrides(overrides)
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


def parse_overrides(overrides: str) -> list[tuple[str, str]]:
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


"""A decoder-only model's shape and parameter count from its config alone (no weights, no model built), so
the planner can size a 70B model on a laptop. The arithmetic covers the LLaMA-style families the project
builds (llama, qwen2, qwen3, mistral); tests/test_plan.py checks it against num_parameters() of every config
in configs/, instantiated on the meta device."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from lmtrain.errors import UserError

# Which projections carry a bias, per model_type: Qwen2 always biases q/k/v (its config has no switch);
# LLaMA follows attention_bias / mlp_bias; Qwen3 normalises q and k per head (q_norm, k_norm).
KNOWN_TYPES = ("llama", "qwen2", "qwen3", "mistral")


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tied_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_parameters(self) -> int:
        h, q, kv, inter = self.hidden_size, self.q_dim, self.kv_dim, self.intermediate_size
        attention = h * q + 2 * h * kv + q * h + self.qkv_bias * (q + 2 * kv) + self.o_bias * h
        mlp = 3 * h * inter + self.mlp_bias * (2 * inter + h)
        norms = 2 * h + self.qk_norm * 2 * self.head_dim
        return attention + mlp + norms

    def embedding_parameters(self) -> int:
        """The input embedding, plus the LM head when it is a separate matrix."""
        return self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)

    def non_embedding_parameters(self) -> int:
        return self.num_layers * self.layer_parameters() + self.hidden_size  # + the final norm

    def parameters(self) -> int:
        return self.embedding_parameters() + self.non_embedding_parameters()

    def largest_module_parameters(self) -> int:
        """The biggest single module (a decoder layer or the vocabulary matrix): what ZeRO-3 gathers at once."""
        return max(self.layer_parameters(), self.vocab_size * self.hidden_size)

    def to_dict(self) -> dict:
        return asdict(self)


def shape_of(config, where: str = "model config") -> ModelShape:
    """The shape of a transformers config (a text config; multimodal wrappers are not planned); `where` names
    the config in error messages."""
    model_type = getattr(config, "model_type", "?")
    if model_type not in KNOWN_TYPES:
        raise UserError(f"the planner knows the layer layout of {', '.join(KNOWN_TYPES)} models; this config is "
                        f"'{model_type}'. Plan a config of one of those families (e.g. --config_name qwen2.5-0.5b)")
    sizes = {name: getattr(config, name, None) for name in ("vocab_size", "hidden_size", "intermediate_size",
                                                            "num_hidden_layers", "num_attention_heads")}
    sizes["num_key_value_heads"] = getattr(config, "num_key_value_heads", None) or sizes["num_attention_heads"]
    for name, value in sizes.items():
        if not isinstance(value, int) or value <= 0:
            raise UserError(f"{where}: {name} {value!r} must be a positive whole number")
    heads = config.num_attention_heads
    if heads % sizes["num_key_value_heads"]:
        raise UserError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads "
                        f"{sizes['num_key_value_heads']}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if head_dim <= 0:
        raise UserError(f"{where}: head_dim {head_dim} (hidden_size / num_attention_heads) must be positive")
    return ModelShape(
        model_type=model_type, vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_layers=config.num_hidden_layers, num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or bool(getattr(config, "attention_bias", False)),
        o_bias=model_type in ("llama", "qwen3") and bool(getattr(config, "attention_bias", False)),
        mlp_bias=bool(getattr(config, "mlp_bias", False)), qk_norm=model_type == "qwen3")


def shape_of_run(model_args, tokenizer=None) -> ModelShape:
    """The shape of the model a training run would build: its config (lmtrain.training.preflight.model_config:
    a small file, no weights) and, from scratch, the tokenizer's vocabulary rounded up as build_model does."""
    from lmtrain.model.building import VOCAB_MULTIPLE
    from lmtrain.training.preflight import model_config

    where = f"--config_name {model_args.config_name}" if model_args.config_name else \
        f"--model_name_or_path {model_args.model_name_or_path}"
    try:
        config = model_config(model_args)
    except (OSError, ValueError) as error:  # transformers' words for a malformed or typeless config.json
        raise UserError(f"{where}: not a model config transformers can read ({error}); a config.json "
                        "needs a model_type, e.g. configs/qwen2.5-0.5b.json") from error
    if tokenizer is not None and not model_args.model_name_or_path:
        config.vocab_size = -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    return shape_of(config, where)

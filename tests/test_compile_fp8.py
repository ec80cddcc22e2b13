"""--compile_layers and --fp8 as a user meets them beyond one training forward: KV-cache decoding (the
--sample_prompts samples, generate) on compiled layers, LoRA adapters under --fp8, a model whose decoder
linears cannot be float8. CPU only, aot_eager / a counting backend instead of Inductor."""
import pytest
import torch


def tiny_model(layers: int = 2, hidden: int = 32, intermediate: int = 64):
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=128, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                         initializer_range=0.1)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def test_compiled_layers_decode_eagerly_and_train_compiled():
    """Decoding with a KV cache guarded on each layer's index (one compiled variant per layer): a 20-layer
    model hit Dynamo's recompile limit during the first samples. The compiled layers now decode eagerly
    (nothing compiled, the same tokens as the eager model) and still compile the training forward."""
    from torch._dynamo.testing import CompileCounter

    from lmtrain.model.compiling import compile_decoder_layers

    prompt = torch.randint(0, 128, (1, 5))
    eager = tiny_model(layers=6).eval()
    expected = eager.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    counter = CompileCounter()
    compiled = tiny_model(layers=6).eval()
    assert compile_decoder_layers(compiled, backend=counter) == 6
    try:
        tokens = compiled.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
        assert counter.frame_count == 0
        assert torch.equal(tokens, expected)
        compiled.train()
        compiled.config.use_cache = False
        ids = torch.randint(0, 128, (2, 16))
        compiled(input_ids=ids, labels=ids).loss.backward()
        assert counter.frame_count >= 1  # the layers' training forward ran through Dynamo
        assert set(compiled.state_dict()) == set(eager.state_dict())
    finally:
        torch._dynamo.reset()


def test_fp8_keeps_lora_adapters_in_bf16_and_converts_their_base_layers():
    pytest.importorskip("torchao")
    from peft import LoraConfig, get_peft_model
    from torchao.float8.float8_linear import Float8Linear

    from lmtrain.model.fp8 import convert_decoder_linears_to_fp8

    model = get_peft_model(tiny_model(), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    keys = set(model.state_dict())
    assert convert_decoder_linears_to_fp8(model) == 2 * 7
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, Float8Linear)
    assert not isinstance(q_proj.lora_A["default"], Float8Linear)
    assert not isinstance(q_proj.lora_B["default"], Float8Linear)
    assert set(model.state_dict()) == keys
    ids = torch.randint(0, 128, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    assert q_proj.lora_B["default"].weight.grad is not None


def test_fp8_names_the_divisibility_rule_when_no_decoder_linear_fits():
    pytest.importorskip("torchao")
    from lmtrain.errors import UserError
    from lmtrain.model.fp8 import convert_decoder_linears_to_fp8

    with pytest.raises(UserError, match="divisible by 16"):
        convert_decoder_linears_to_fp8(tiny_model(hidden=40, intermediate=72))

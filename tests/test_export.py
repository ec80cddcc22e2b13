"""export.py: a bf16 export (and a LoRA merge) loads in a fresh process with AutoModelForCausalLM and
pipeline("text-generation"), and keeps the trained weights."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

import export
from lmtrain.arguments import LoraArguments
from lmtrain.model.lora import apply_lora
from lmtrain.model.config import resolve_config

TINY = "hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=2,num_key_value_heads=1"


def test_bf16_export_and_lora_merge_load_in_a_fresh_process(tiny_tokenizer, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = resolve_config("qwen2-tiny", TINY + f",vocab_size={len(tiny_tokenizer)}")
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "trained")
    tiny_tokenizer.save_pretrained(tmp_path / "trained")

    export.main(["--model", str(tmp_path / "trained"), "--output_dir", str(tmp_path / "bf16"), "--dtype", "bfloat16"])
    exported = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in exported.values())
    for name, tensor in model.state_dict().items():
        if name in exported:
            torch.testing.assert_close(exported[name].float(), tensor, atol=1e-2, rtol=1e-2)

    peft_model = apply_lora(AutoModelForCausalLM.from_pretrained(tmp_path / "trained"),
                            LoraArguments(use_lora=True, lora_r=4, lora_dropout=0.0))
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name:
            parameter.data.fill_(0.05)
    peft_model.save_pretrained(tmp_path / "adapter")
    export.main(["--model", str(tmp_path / "trained"), "--adapter", str(tmp_path / "adapter"),
                 "--output_dir", str(tmp_path / "merged"), "--dtype", "float32"])
    ids = torch.tensor([tiny_tokenizer("to be or not to be").input_ids])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(merged(input_ids=ids).logits, peft_model.eval()(input_ids=ids).logits,
                               atol=1e-4, rtol=1e-4)

    check = textwrap.dedent(f"""
        from transformers import AutoModelForCausalLM, pipeline
        for path in [{str(tmp_path / 'bf16')!r}, {str(tmp_path / 'merged')!r}]:
            AutoModelForCausalLM.from_pretrained(path)
            out = pipeline("text-generation", model=path, device="cpu")("to be", max_new_tokens=5, do_sample=False)
            assert out[0]["generated_text"].startswith("to be"), out
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]

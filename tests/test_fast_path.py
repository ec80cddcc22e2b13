"""The GPU fast path, as far as a CPU can check it: the varlen attention plumbing (document boundaries from
position_ids, the kernel call, the SDPA fallback for generation) against per-document SDPA, the defaults that
switch themselves off without a GPU, the explicit vocab_size, and bench/throughput.py kept working."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lmtrain.model.attention as attention

ROOT = Path(__file__).resolve().parents[1]


def reference_varlen(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, scale=None, window_size=(-1, -1), enable_gqa=False):
    """What torch.nn.attention.varlen.varlen_attn computes (causal within each segment), from plain SDPA."""
    assert window_size == (-1, 0), "the kernel must be asked for causal attention"
    bounds = cu_seq_q.tolist()
    # An upper bound on the longest document is all the kernel needs (compiled layers pass the row length).
    assert bounds == cu_seq_k.tolist() and max_q >= max(b - a for a, b in zip(bounds, bounds[1:])) and max_q == max_k
    out = [F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1),
                                          is_causal=True, scale=scale, enable_gqa=enable_gqa).transpose(0, 1)
           for a, b in zip(bounds, bounds[1:])]
    return torch.cat(out)


def tiny_model(implementation: str):
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=implementation).eval()
    model.config.use_cache = False
    return model


def test_document_boundaries_restart_at_zero_jumps_and_row_starts():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 4], [5, 6, 7, 8, 0, 1, 2, 0, 1, 2]])
    bounds, longest = attention.document_boundaries(positions)
    assert bounds.dtype == torch.int32
    assert bounds.tolist() == [0, 3, 5, 10, 14, 17, 20] and longest == 5


def test_varlen_packed_rows_equal_documents_alone(monkeypatch):
    monkeypatch.setattr(attention, "varlen_kernel", lambda: reference_varlen)
    model = tiny_model("varlen")
    lengths = [(5, 7), (12,), (3, 4, 5)]
    ids = torch.randint(0, 128, (3, 12))
    positions = torch.tensor([[i for n in row for i in range(n)] for row in lengths])
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=positions).logits
        model.set_attn_implementation("sdpa")
        for row, row_lengths in enumerate(lengths):
            start = 0
            for n in row_lengths:
                alone = model(input_ids=ids[row:row + 1, start:start + n]).logits[0]
                torch.testing.assert_close(packed[row, start:start + n], alone, atol=2e-5, rtol=1e-4)
                start += n


def test_boundaries_are_computed_once_per_forward(monkeypatch):
    monkeypatch.setattr(attention, "varlen_kernel", lambda: reference_varlen)
    calls = []
    real = attention.document_boundaries
    monkeypatch.setattr(attention, "document_boundaries", lambda p: calls.append(1) or real(p))
    monkeypatch.setattr(attention, "_boundaries", attention._BoundaryCache())
    model = tiny_model("varlen")
    ids, positions = torch.randint(0, 128, (2, 10)), torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]] * 2)
    with torch.no_grad():
        model(input_ids=ids, position_ids=positions)
        assert len(calls) == 1  # two layers, one computation
        positions[0, 5] = 7  # an in-place change is seen
        model(input_ids=ids, position_ids=positions)
    assert len(calls) == 2


def test_generation_with_varlen_goes_through_sdpa_and_matches_it(monkeypatch):
    monkeypatch.setattr(attention, "varlen_kernel", lambda: reference_varlen)
    model = tiny_model("varlen")
    model.config.use_cache = True
    prompt = torch.randint(0, 128, (2, 6))
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0  # left padding: a real attention mask reaches the fallback
    with torch.no_grad():
        ours = model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=5, do_sample=False,
                              pad_token_id=0)
        model.set_attn_implementation("sdpa")
        theirs = model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_auto_attention_and_liger_switch_themselves_off_without_a_gpu(caplog):
    assert attention.choose_attention("auto") == ("varlen" if attention.varlen_kernel() else "sdpa")
    if not torch.cuda.is_available():
        assert attention.choose_attention("varlen") == "sdpa"
        assert "varlen attention needs a CUDA GPU" in caplog.text
        from lmtrain.arguments import TrainArguments

        arguments = TrainArguments(output_dir="/tmp/x", report_to="none")
        assert arguments.use_liger_kernel is False
        assert arguments.dataloader_num_workers == 0  # -1: 2 workers on a GPU, none on a CPU


def test_explicit_vocab_size_is_kept_and_a_too_small_one_refused(tiny_tokenizer):
    from lmtrain.arguments import ModelArguments
    from lmtrain.errors import UserError
    from lmtrain.model.building import build_model

    model = build_model(ModelArguments(config_name="qwen2-tiny", config_overrides="vocab_size=2000"), tiny_tokenizer)
    assert model.get_input_embeddings().num_embeddings == 2000
    default = build_model(ModelArguments(config_name="qwen2-tiny"), tiny_tokenizer)
    assert default.get_input_embeddings().num_embeddings == -(-len(tiny_tokenizer) // 64) * 64
    with pytest.raises(UserError, match="at least that many rows"):
        build_model(ModelArguments(config_name="qwen2-tiny", config_overrides="vocab_size=100"), tiny_tokenizer)


def _load_bench(name: str):
    from conftest import load_repo_script

    return load_repo_script(f"bench/{name}.py")


def test_throughput_bench_runs_the_real_path_on_a_cpu(tmp_path):
    bench = _load_bench("throughput")
    result = bench.main(["--config", "qwen2-tiny", "--seq", "32", "--batch", "2", "--steps", "8", "--skip_steps", "2",
                         "--logging_steps", "2", "--vocab", "0", "--data", "markov", "--doc_length", "8",
                         "--workdir", str(tmp_path / "w"), "--output_json", str(tmp_path / "r.jsonl")])
    assert result["windows"] == 3 and result["tok_s_gpu"] > 0 and result["step_s"] > 0
    assert result["attention"] == "sdpa" and result["liger"] is False
    assert len(result["losses"]) == 4 and all(loss > 0 for loss in result["losses"])
    assert (tmp_path / "r.jsonl").read_text().count("\n") == 1
    from lmtrain.cli import pretrain
    from lmtrain.training.trainer import save_final_model

    assert pretrain.save_final_model is save_final_model  # the bench's patch does not outlive its call


def test_isolation_check_tells_a_leak_from_rounding():
    bench = _load_bench("attention_isolation")
    error, leak = bench.isolation_error("sdpa", torch.float32, "cpu", lengths=(9, 17, 4))
    assert error < 1e-4 < 0.1 < leak


def test_training_losses_with_varlen_equal_sdpa(monkeypatch, tiny_tokenizer_dir, plays_dir, tmp_path):
    """The same pretraining run (packed scenes, position_ids restarting per document) through the varlen path
    (kernel stood in by per-segment SDPA) and through SDPA's document mask: the same per-step losses."""
    from conftest import tiny_pretrain_argv

    from lmtrain.cli import pretrain

    monkeypatch.setattr(attention, "varlen_kernel", lambda: reference_varlen)
    losses = {}
    for name in ("varlen", "sdpa"):
        trainer, _ = pretrain.main(tiny_pretrain_argv(tiny_tokenizer_dir, plays_dir, tmp_path / name, "--max_steps",
                                                      "6", "--attn_implementation", name, "--save_strategy", "no"))
        assert trainer.model.config._attn_implementation == name
        losses[name] = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses["sdpa"]) == 6
    assert losses["varlen"] == pytest.approx(losses["sdpa"], rel=1e-4)


def test_torch_compile_turns_liger_off():
    """Compiled together they gave NaN from the first step on the H200 (docs/PERFORMANCE.md): a run that asks for
    torch.compile trains with the model's own layers, and a run without compile keeps Liger."""
    from types import SimpleNamespace

    from lmtrain.arguments import liger_off_under_compile

    compiled = SimpleNamespace(torch_compile=True, use_liger_kernel=True)
    liger_off_under_compile(compiled)
    assert compiled.use_liger_kernel is False
    eager = SimpleNamespace(torch_compile=False, use_liger_kernel=True)
    liger_off_under_compile(eager)
    assert eager.use_liger_kernel is True


def test_compile_layers_keeps_only_liger_loss_and_refuses_torch_compile_too():
    from types import SimpleNamespace

    from lmtrain.arguments import TrainArguments, liger_off_under_compile

    layered = SimpleNamespace(torch_compile=False, compile_layers=True, use_liger_kernel=True,
                              liger_kernel_config=None)
    liger_off_under_compile(layered)
    assert layered.use_liger_kernel is True  # the fused linear cross-entropy stays, outside the compiled layers
    assert layered.liger_kernel_config == {"rope": False, "rms_norm": False, "swiglu": False}
    with pytest.raises(ValueError, match="pick one"):
        TrainArguments(output_dir="unused", compile_layers=True, torch_compile=True, report_to="none")


def test_compiled_layers_train_as_eager_ones_on_packed_rows(monkeypatch):
    """--compile_layers: the same logits and gradients as the eager model on packed rows, through Dynamo and
    AOTAutograd (aot_eager: Inductor's code generation would take minutes on a CI CPU), with the varlen
    boundary read running eagerly between the graphs."""
    from lmtrain.model.compiling import compile_decoder_layers

    longest_seen = []

    def spied_varlen(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, scale=None, window_size=(-1, -1), enable_gqa=False):
        longest_seen.append(max_q)
        return reference_varlen(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, scale, window_size, enable_gqa)

    monkeypatch.setattr(attention, "varlen_kernel", lambda: spied_varlen)
    ids = torch.randint(0, 128, (2, 12))
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]])
    results = []
    for compiled in (False, True):
        model = tiny_model("varlen").train()
        if compiled:
            assert compile_decoder_layers(model, backend="aot_eager") == 2
        loss = model(input_ids=ids, position_ids=positions, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        assert set(model.state_dict()) == set(tiny_model("varlen").state_dict())  # checkpoints keep their keys
    torch._dynamo.reset()
    # Eager layers pass the batch's longest document; compiled ones the row length (no recompile per batch).
    assert longest_seen[:2] == [8, 8] and set(longest_seen[2:]) == {12}
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-6, rtol=1e-5)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, atol=1e-6, rtol=1e-4)


def test_fp8_converts_the_decoder_linears_only_and_tracks_the_bf16_loss():
    """--fp8 on a CPU (torchao emulates the float8 matmuls): every linear layer inside the decoder layers
    becomes Float8Linear, the LM head does not, the state_dict keys stay, and the loss and gradients stay near
    the unconverted model's (float8 rounding, not a different model)."""
    pytest.importorskip("torchao")
    from torchao.float8.float8_linear import Float8Linear

    from lmtrain.model.fp8 import convert_decoder_linears_to_fp8

    ids = torch.randint(0, 128, (2, 16))
    plain, fp8 = tiny_model("sdpa").train(), tiny_model("sdpa").train()
    keys = set(fp8.state_dict())
    assert convert_decoder_linears_to_fp8(fp8) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert not isinstance(fp8.lm_head, Float8Linear) and set(fp8.state_dict()) == keys
    losses = []
    for model in (plain, fp8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert losses[1] == pytest.approx(losses[0], rel=0.02) and losses[1] != losses[0]
    cosine = F.cosine_similarity(plain.model.layers[0].mlp.up_proj.weight.grad.flatten(),
                                 fp8.model.layers[0].mlp.up_proj.weight.grad.flatten(), dim=0)
    assert cosine > 0.95

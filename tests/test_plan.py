"""The planner (plan.py, lmtrain/planning/): parameter counts against instantiated models, FLOPs against a hand
count, memory terms that add up, the activation formula against the tensors autograd really saves on the CPU,
the measured GPU runs it must reproduce, `--per_device_train_batch_size auto`, and one-line errors."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lmtrain.errors import EXIT_USER_ERROR, UserError, run_entry_point
from lmtrain.planning.memory import STRATEGIES, TERMS, TrainingSetup, activation_terms, estimate_memory
from lmtrain.planning.shape import shape_of

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.json"))


def _config(name: str):
    from lmtrain.model.config import resolve_config

    return resolve_config(name)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_parameter_count_equals_the_instantiated_model(path):
    from transformers import AutoModelForCausalLM

    config = _config(str(path))
    with torch.device("meta"):  # no memory, no weights: 7B costs nothing
        model = AutoModelForCausalLM.from_config(config)
    shape = shape_of(config)
    assert shape.parameters() == model.num_parameters()
    embedding = model.get_input_embeddings().weight.numel() * (1 if shape.tied_embeddings else 2)
    assert shape.embedding_parameters() == embedding
    assert shape.non_embedding_parameters() == model.num_parameters() - embedding


@pytest.mark.parametrize("family", ["qwen3", "mistral", "llama-bias"])
def test_parameter_count_of_other_families(family):
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen3Config

    small = dict(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    config = {"qwen3": lambda: Qwen3Config(head_dim=32, attention_bias=True, **small),
              "mistral": lambda: MistralConfig(**small),
              "llama-bias": lambda: LlamaConfig(attention_bias=True, mlp_bias=True, **small)}[family]()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert shape_of(config).parameters() == model.num_parameters()


def test_flops_per_token_against_a_hand_count():
    from lmtrain.planning.compute import training_flops_per_token

    # qwen2.5-0.5b by hand: 24 layers of q/k/v (biased) + o + MLP + 2 norms, the final norm, one tied embedding
    h, inter, layers, vocab, kv = 896, 4864, 24, 151936, 2 * 64
    layer = h * h + h + 2 * (h * kv + kv) + h * h + 3 * h * inter + 2 * h
    parameters = layers * layer + h + vocab * h
    assert parameters == 494_032_768
    assert training_flops_per_token(shape_of(_config("qwen2.5-0.5b")), 2048) == 6 * parameters + 12 * layers * h * 2048


def test_chinchilla_and_compute_optimal():
    from lmtrain.planning.compute import chinchilla_tokens, compute_optimal, parse_amount

    assert chinchilla_tokens(1_000_000) == 20_000_000
    best = compute_optimal(6 * 1e9 * 20e9)  # C = 6 N D at N = 1B, D = 20B
    assert best["parameters"] == pytest.approx(1e9) and best["tokens"] == pytest.approx(20e9)
    assert parse_amount("20B", "--train_tokens") == 20e9 and parse_amount("1.5e21", "--x") == 1.5e21


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_memory_terms_add_up_to_the_peak(strategy, checkpointing):
    shape = shape_of(_config("qwen2.5-1.5b"))
    setup = TrainingSetup(4, 2048, strategy=strategy, num_gpus=8, gradient_checkpointing=checkpointing)
    estimate = estimate_memory(shape, setup)
    assert set(estimate.terms) == set(TERMS)
    assert estimate.total == sum(estimate.terms.values())
    assert estimate.total == max(sum(terms.values()) for terms in estimate.moments.values())
    assert estimate.moments[estimate.peak_moment] == estimate.terms
    bigger = estimate_memory(shape, replace(setup, micro_batch=8))
    assert bigger.moments["backward start"]["activations"] > estimate.moments["backward start"]["activations"]


def test_higher_zero_stages_hold_less_model_state():
    shape = shape_of(_config("llama-7b"))
    totals = [estimate_memory(shape, TrainingSetup(1, 2048, strategy=s, num_gpus=8, gradient_checkpointing=True,
                                                   fused_cross_entropy=True)).total for s in STRATEGIES[1:]]
    assert totals == sorted(totals, reverse=True)


def _saved_bytes(model, batch: int, seq: int, autocast: bool) -> int:
    """Bytes of the tensors autograd saves for backward in one forward (deduplicated by storage; parameters
    and their views left out): what the activation formula predicts."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(input_ids=ids, labels=ids)
    return sum(seen.values())


@pytest.mark.parametrize("regime", ["bf16", "fp32", "autocast"])
def test_activation_formula_matches_saved_tensors_on_the_cpu(regime):
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True)
    dtype = torch.bfloat16 if regime == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    shape = shape_of(config)
    for batch, seq in [(1, 64), (2, 64), (1, 128), (4, 128)]:
        setup = TrainingSetup(batch, seq, precision="fp32" if regime == "fp32" else "bf16",
                              strategy="none" if regime != "bf16" else "zero2", attention_mask=False,
                              repeat_kv=False)
        saved, _, _ = activation_terms(shape, setup)
        tokens = batch * seq
        # + the loss's saved fp32 log-softmax (4V per token); the formula's position_ids (8 per token) stay in
        # the batch and are not a saved tensor here
        predicted = saved + tokens * 4 * config.vocab_size - tokens * 8
        measured = _saved_bytes(model, batch, seq, autocast=regime == "autocast")
        if regime == "autocast":  # the bf16 weight copies each linear saved: a term of their own
            measured -= sum(2 * m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        assert measured == pytest.approx(predicted, rel=0.005), (batch, seq)


def test_the_measured_gpu_runs_are_reproduced_within_15_percent():
    """docs/PLANNER.md's validation table: every recorded run with a peak memory figure, within 15%, except the
    demo's SFT run, the one known miss (-19%, cause not found; see the document), held to its current error."""
    from lmtrain.planning.gpus import MEASURED_RUNS

    within = 0
    for run in MEASURED_RUNS:
        if run.peak_memory_gib is None:
            continue
        predicted = estimate_memory(run.shape(), run.setup()).total / 2 ** 30
        known_miss = run.source.endswith("SFT") and run.config == "qwen2-tiny"
        assert predicted == pytest.approx(run.peak_memory_gib, rel=0.2 if known_miss else 0.15), run
        within += not known_miss
    assert within >= 5


def test_default_mfu_comes_from_the_closest_measured_run():
    from lmtrain.model.flops import flops_per_token
    from lmtrain.planning.gpus import default_mfu_run, gpu_kind

    run = default_mfu_run("H100", "zero2", True, 400_000_000)
    assert (run.recipe, run.strategy, run.vocab_size) == ("lmtrain", "zero2", 32000)
    shape = run.shape()
    expected = run.tokens_per_second * flops_per_token(shape.parameters(), shape.num_layers, shape.hidden_size,
                                                       run.seq_length) / (gpu_kind("H100").peak_tflops * 1e12)
    assert run.mfu(989.0) == pytest.approx(expected)
    assert default_mfu_run("H100", "zero3", True, 400_000_000).strategy == "zero3"
    assert default_mfu_run("4090", "zero2", True, 400_000_000) is None


def test_h200_rows_cite_their_results_file_and_match_it():
    """Every H200 row of 2026-12-02 quotes its result line (tokens/s, peak) and its peak is predicted within 5%
    (the ZeRO-3 rows of Qwen2.5-3B/7B shapes included: they fix the per-sub-group fp32 gradient)."""
    import json

    from lmtrain.planning.gpus import MEASURED_RUNS

    results = {}
    for name in ("h200-2026-12-02/call1", "h200-2026-12-02/call2", "h200-2026-12-02b/call-memory"):
        with open(f"docs/gpu_logs/{name}-results.jsonl", encoding="utf-8") as handle:
            for line in handle:
                row = json.loads(line)
                results[row["label"]] = row.get("reference", row)
    rows = [run for run in MEASURED_RUNS if "h200-2026-12-02" in run.source]
    assert len(rows) >= 11 and sum(run.strategy == "zero3" for run in rows) >= 2
    for run in rows:
        label = max((name for name in results if f", {name}" in run.source), key=len)
        assert run.tokens_per_second == results[label]["tok_s_gpu"], label
        assert run.peak_memory_gib == results[label]["peak_mem_GiB"], label
        predicted = estimate_memory(run.shape(), run.setup()).total / 2 ** 30
        assert predicted == pytest.approx(run.peak_memory_gib, rel=0.05), label


def test_h200_default_mfu_is_our_fast_path_nearest_in_work_per_micro_batch():
    from lmtrain.planning.gpus import default_mfu_run, micro_batch_flops
    from lmtrain.planning.shape import shape_of
    from lmtrain.model.config import resolve_config

    shape = shape_of(resolve_config("qwen2.5-1.5b", None))
    run = default_mfu_run("H200", "zero2", False, shape.parameters(), liger=True,
                          flops_per_micro_batch=micro_batch_flops(shape, 16, 2048))
    assert (run.recipe, run.liger, run.gradient_checkpointing, run.micro_batch) == ("lmtrain", True, False, 16)
    assert run.mfu(989.0) == pytest.approx(0.495, abs=0.001)   # 47,442 tokens/s through the MFU formula
    small = default_mfu_run("H200", "zero2", False, shape.parameters(), liger=True,
                            flops_per_micro_batch=micro_batch_flops(shape, 1, 2048))
    assert small.micro_batch * small.shape().parameters() < 16 * shape.parameters()


def test_plan_writes_json_and_its_figures_agree(tmp_path, capsys):
    from lmtrain.cli.plan import main
    from lmtrain.planning.memory import GIB, attention_layout

    plan = main(["--config_name", "qwen2.5-0.5b", "--use_liger_kernel", "false", "--attn_implementation", "sdpa",
                 "--block_size", "2048", "--bf16", "--deepspeed",
                 "ds_configs/zero2.json", "--gradient_checkpointing", "--gpu", "H100", "--num_gpus", "8",
                 "--train_tokens", "10B", "--price_per_gpu_hour", "2", "--output_dir", str(tmp_path)])
    written = json.loads((tmp_path / "plan.json").read_text())
    assert written == json.loads(json.dumps(plan))
    assert written["model"]["parameters"] == 494_032_768
    memory = written["memory"]
    assert memory["run_strategy"] == "zero2"
    zero2 = memory["strategies"]["zero2"]
    assert zero2["total_gib"] == pytest.approx(sum(zero2["terms_gib"].values()), abs=0.01)
    largest = zero2["largest_micro_batch"]
    shape = shape_of(_config("qwen2.5-0.5b"))
    setup = TrainingSetup(largest, 2048, strategy="zero2", num_gpus=8, gradient_checkpointing=True,
                          **attention_layout("sdpa"))
    usable = 80 * GIB * 0.9
    one_more = replace(setup, micro_batch=largest + 1)
    assert estimate_memory(shape, setup).total <= usable < estimate_memory(shape, one_more).total
    time = written["time"]
    expected = time["mfu"] * 989e12 / written["compute"]["flops_per_token"]
    assert time["tokens_per_second_per_gpu"] == pytest.approx(expected, rel=1e-3)
    assert time["cost"] == pytest.approx(2 * time["gpu_hours"])
    assert time["gpu_hours"] == pytest.approx(1e10 / time["tokens_per_second_per_gpu"] / 3600, rel=1e-3)
    printed = capsys.readouterr().out
    assert "largest micro-batch" in printed
    # ZeRO-3 offload's host memory, shown beside the GPU table: 20 bytes per parameter over 8 processes
    host = memory["strategies"]["zero3_offload"]["cpu_memory_gib_per_process"]
    assert host == pytest.approx(20 * 494_032_768 / 8 / GIB, abs=0.01)
    assert f"zero3_offload also needs {host:,.2f} GiB of host RAM per process" in printed
    with_liger = main(["--config_name", "qwen2.5-0.5b", "--block_size", "2048", "--bf16", "--output_dir",
                       str(tmp_path)])
    unfused = plan["memory"]["strategies"]["none"]["terms_gib"]["logits"]  # 12 bytes x vocabulary per token
    assert with_liger["memory"]["strategies"]["none"]["terms_gib"]["logits"] < unfused / 10  # no logits tensor


def test_compute_budget_gives_the_compute_optimal_size(tmp_path):
    from lmtrain.cli.plan import main

    plan = main(["--config_name", "llama-1b", "--compute_budget", "1.2e21", "--bf16", "--output_dir", str(tmp_path)])
    assert plan["compute"]["compute_optimal"]["parameters"] == pytest.approx((1.2e21 / 120) ** 0.5)
    assert plan["compute"]["train_tokens_from"] == "the compute budget"


def test_gpu_hours_budget_and_fp32_time(tmp_path):
    from lmtrain.cli.plan import main

    plan = main(["--config_name", "qwen2.5-0.5b", "--gpu_hours", "100", "--mfu", "0.3", "--bf16", "--gpu", "H200",
                 "--output_dir", str(tmp_path)])
    assert plan["compute"]["compute_optimal"]["compute_flops"] == pytest.approx(100 * 3600 * 989e12 * 0.3)
    assert plan["time"]["gpu_hours"] == pytest.approx(100, rel=1e-6)  # the tokens it buys take the hours it has
    fp32 = main(["--config_name", "qwen2.5-0.5b", "--output_dir", str(tmp_path)])
    assert "pass --mfu" in fp32["time"]["skipped"]
    # hours of fp32 are not turned into FLOPs at a bf16 run's MFU (the time is not estimated either)
    with pytest.raises(UserError, match="--gpu_hours needs an MFU .* bf16 runs"):
        main(["--config_name", "qwen2.5-0.5b", "--gpu_hours", "100", "--gpu", "H200", "--output_dir", str(tmp_path)])


def test_plan_with_auto_micro_batch_decides_as_training_would(tmp_path):
    from lmtrain.cli.plan import main
    from lmtrain.model.config import resolve_config
    from lmtrain.planning.memory import attention_layout, largest_micro_batch

    shape = shape_of(resolve_config("qwen2.5-0.5b"))
    flags = ["--config_name", "qwen2.5-0.5b", "--bf16", "--per_device_train_batch_size", "auto",
             "--output_dir", str(tmp_path)]
    usable = 141 * 2 ** 30 * 0.9
    fit = largest_micro_batch(shape, TrainingSetup(1, 1024, strategy="none", liger=True, fused_cross_entropy=True,
                                                   **attention_layout("auto")), usable)
    plan = main(flags + ["--gpu", "H200"])
    assert plan["memory"]["strategies"]["none"]["largest_micro_batch"] == fit
    assert plan["compute"]["tokens_per_step"] == fit * 1024 and "auto_micro_batch" in plan
    lowered = main(flags + ["--gpu", "H200", "--global_batch_size", "256"])
    micro = max(b for b in range(1, fit + 1) if 256 % b == 0)
    assert lowered["compute"]["tokens_per_step"] == 256 * 1024
    assert f"micro-batch {micro} (" in lowered["auto_micro_batch"]
    # one row of 16,384 tokens fits a 4090 only with checkpointing: turned on, unless refused on purpose
    long_rows = main(flags + ["--gpu", "4090", "--block_size", "16384"])
    assert long_rows["auto_micro_batch"].startswith("gradient checkpointing turned on")
    with pytest.raises(UserError, match="not even a micro-batch of 1 fits 4090"):
        main(flags + ["--gpu", "4090", "--block_size", "16384", "--gradient_checkpointing", "false"])
    with pytest.raises(UserError, match="a whole number of rows, or auto"):
        main(["--config_name", "qwen2.5-0.5b", "--per_device_train_batch_size", "2.5", "--output_dir", str(tmp_path)])


def test_the_mfu_warning_is_given_once(tmp_path, caplog):
    from lmtrain.cli.plan import main

    main(["--config_name", "qwen2-tiny", "--bf16", "--gpu", "H200", "--gpu_hours", "10", "--output_dir", str(tmp_path)])
    assert caplog.text.count("the default MFU comes from a run that differs") == 1


def test_length_statistics_of_raw_pretraining_files(tmp_path, write_jsonl, tiny_tokenizer_dir, tiny_tokenizer):
    from lmtrain.cli.plan import main

    texts = ["word " * n for n in (5, 50, 500, 20, 80)]
    path = write_jsonl([{"text": t} for t in texts])
    plan = main(["--config_name", "qwen2-tiny", "--tokenizer_name", str(tiny_tokenizer_dir), "--train_files", path,
                 "--block_size", "64", "--output_dir", str(tmp_path)])
    stats = plan["dataset"]
    lengths = sorted(len(tiny_tokenizer(t)["input_ids"]) + 1 for t in texts)  # + EOS, as the pipeline adds
    assert stats["count"] == 5 and stats["max"] == lengths[-1] and stats["p50"] == lengths[2]
    assert stats["tokens"] == sum(lengths) and stats["share_longer_than_row"] == pytest.approx(
        sum(n > 64 for n in lengths) / 5)
    assert Path(stats["histogram"]).stat().st_size > 0
    assert plan["compute"]["train_tokens_from"] == "the dataset x --num_train_epochs"


def test_length_statistics_of_raw_sft_files(tmp_path, write_jsonl, tiny_tokenizer_dir, tiny_tokenizer):
    from lmtrain.cli.plan import main
    from lmtrain.data.chat_render import render_conversation

    conversations = [[{"role": "user", "content": "hi " * n}, {"role": "assistant", "content": "ok " * n}]
                     for n in (3, 30, 300)]
    path = write_jsonl([{"messages": m} for m in conversations] + [{"messages": "not a list"}])
    plan = main(["--stage", "sft", "--config_name", "qwen2-tiny", "--tokenizer_name", str(tiny_tokenizer_dir),
                 "--train_files", path, "--max_length", "128", "--output_dir", str(tmp_path)])
    lengths = [len(render_conversation(tiny_tokenizer, m)[0]) for m in conversations]
    assert plan["dataset"]["max"] == max(lengths) and plan["dataset"]["count"] == 3
    assert plan["dataset"]["dropped_records"] == 1


def test_sft_files_without_a_usable_conversation_say_why(tmp_path, write_jsonl, tiny_tokenizer_dir):
    from lmtrain.cli.plan import main

    path = write_jsonl([{"text": "plain text, not a conversation"}] * 3)
    with pytest.raises(UserError, match=r"no usable conversation \(3 record\(s\) dropped; the first: .*'text'"):
        main(["--stage", "sft", "--config_name", "qwen2-tiny", "--tokenizer_name", str(tiny_tokenizer_dir),
              "--train_files", path, "--output_dir", str(tmp_path)])


def test_a_default_mfu_from_a_much_larger_model_is_warned(tmp_path, caplog):
    from lmtrain.cli.plan import main

    plan = main(["--config_name", "qwen2-tiny", "--bf16", "--deepspeed", "ds_configs/zero2.json", "--gpu", "H200",
                 "--output_dir", str(tmp_path)])
    assert any("model size" in difference for difference in plan["time"]["mfu_run_differs"])
    assert "pass --mfu" in caplog.text
    matched = main(["--config_name", "qwen2.5-0.5b", "--bf16", "--deepspeed", "ds_configs/zero2.json", "--gpu",
                    "H200", "--block_size", "2048", "--per_device_train_batch_size", "16",
                    "--output_dir", str(tmp_path)])
    assert matched["time"]["mfu_run_differs"] == []
    assert matched["time"]["tokens_per_second_per_gpu"] == pytest.approx(96942, rel=1e-3)  # fast-0.5b-bs16 itself
    eight = main(["--config_name", "qwen2.5-0.5b", "--bf16", "--deepspeed", "ds_configs/zero2.json", "--gpu", "H200",
                  "--block_size", "2048", "--per_device_train_batch_size", "16", "--num_gpus", "8",
                  "--output_dir", str(tmp_path)])
    assert eight["time"]["mfu_run_differs"] == ["GPUs 1 there, 8 here"]


def test_prepared_directory_segments(tmp_path, prepare_data, tiny_tokenizer):
    from lmtrain.data.prepared import save_prepared
    from lmtrain.planning.lengths import prepared_lengths

    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": "alpha beta " * n}) for n in (3, 7, 11)) + "\n")
    dataset, report = prepare_data([corpus], block_size=256, clean=False)
    save_prepared(dataset, report, str(tmp_path / "prepared"), tiny_tokenizer)
    lengths, _ = prepared_lengths(str(tmp_path / "prepared"), None)
    expected = sorted(len(tiny_tokenizer("alpha beta " * n)["input_ids"]) + 1 for n in (3, 7, 11))
    assert sorted(lengths.tolist()) == expected
    from lmtrain.cli.plan import main

    plan = main(["--config_name", "qwen2-tiny", "--dataset_path", str(tmp_path / "prepared"), "--bf16",
                 "--output_dir", str(tmp_path / "plan")])
    assert plan["dataset"]["row_length"] == 256 and plan["compute"]["tokens_per_step"] == 8 * 256
    assert plan["dataset"]["tokens"] == sum(expected) == plan["compute"]["train_tokens"]
    # the data fixes the row length and the stage: an explicit flag saying otherwise is refused, as training does
    same = main(["--config_name", "qwen2-tiny", "--dataset_path", str(tmp_path / "prepared"), "--block_size", "256",
                 "--output_dir", str(tmp_path / "plan")])
    assert same["dataset"]["row_length"] == 256
    with pytest.raises(UserError, match="--block_size 512, but --dataset_path .* has rows of 256 tokens"):
        main(["--config_name", "qwen2-tiny", "--dataset_path", str(tmp_path / "prepared"), "--block_size", "512",
              "--output_dir", str(tmp_path / "plan")])
    with pytest.raises(UserError, match="--stage sft, but --dataset_path .* holds pretrain data"):
        main(["--config_name", "qwen2-tiny", "--dataset_path", str(tmp_path / "prepared"), "--stage", "sft",
              "--output_dir", str(tmp_path / "plan")])


def _parse_training(argv, tmp_path):
    from lmtrain.arguments import DataArguments, ModelArguments, TrainArguments
    from lmtrain.cli.parsing import parse_arguments

    return parse_arguments([ModelArguments, DataArguments, TrainArguments], argv + ["--output_dir", str(tmp_path)])


def test_auto_batch_without_a_gpu_uses_the_default_and_keeps_the_global_batch(tmp_path, monkeypatch):
    from lmtrain.planning import auto_batch

    monkeypatch.setattr(auto_batch, "visible_gpu", lambda: None)
    _, _, training = _parse_training(["--per_device_train_batch_size", "auto", "--global_batch_size", "32"], tmp_path)
    assert (training.per_device_train_batch_size, training.gradient_accumulation_steps) == (8, 4)
    assert "no CUDA GPU" in training.batch_size_choice


def test_auto_batch_on_a_gpu_takes_the_largest_fitting_micro_batch(tmp_path, monkeypatch, tiny_tokenizer_dir):
    from lmtrain.planning import auto_batch
    from lmtrain.planning.memory import attention_layout, largest_micro_batch
    from lmtrain.planning.shape import shape_of_run
    from lmtrain.tokenizer import load_tokenizer

    total = 24 * 2 ** 30
    monkeypatch.setattr(auto_batch, "visible_gpu", lambda: ("NVIDIA GeForce RTX 4090", total))
    argv = ["--config_name", "qwen2.5-0.5b", "--tokenizer_name", str(tiny_tokenizer_dir), "--block_size", "2048",
            "--bf16", "--gradient_checkpointing", "--per_device_train_batch_size", "auto"]
    model_args, _, training = _parse_training(argv + ["--global_batch_size", "60"], tmp_path)
    shape = shape_of_run(model_args, load_tokenizer(str(tiny_tokenizer_dir)))
    # this CPU machine builds with sdpa (no varlen kernel) and without Liger (a GPU-only option)
    setup = TrainingSetup(1, 2048, strategy="none", gradient_checkpointing=True, **attention_layout("sdpa"))
    fit = largest_micro_batch(shape, setup, total * 0.9)
    micro = max(b for b in range(1, fit + 1) if 60 % b == 0)
    assert training.per_device_train_batch_size == micro
    assert training.per_device_train_batch_size * training.gradient_accumulation_steps == 60
    assert "largest micro-batch" in training.batch_size_choice
    _, _, plain = _parse_training(argv, tmp_path)
    assert (plain.per_device_train_batch_size, plain.gradient_accumulation_steps) == (fit, 1)
    monkeypatch.setattr(auto_batch, "visible_gpu", lambda: ("tiny", 2 ** 28))
    with pytest.raises(UserError, match="not even a micro-batch of 1 fits"):
        _parse_training(argv, tmp_path)


def test_auto_batch_turns_checkpointing_on_only_when_one_row_needs_it(tmp_path, monkeypatch, tiny_tokenizer_dir):
    from lmtrain.planning import auto_batch
    from lmtrain.planning.memory import attention_layout
    from lmtrain.planning.shape import shape_of_run
    from lmtrain.tokenizer import load_tokenizer

    argv = ["--config_name", "qwen2.5-0.5b", "--tokenizer_name", str(tiny_tokenizer_dir), "--block_size", "2048",
            "--bf16", "--per_device_train_batch_size", "auto"]
    model_args, _, _ = _parse_training(argv[:4], tmp_path)
    shape = shape_of_run(model_args, load_tokenizer(str(tiny_tokenizer_dir)))
    one_row = {checkpointing: estimate_memory(shape, TrainingSetup(
        1, 2048, strategy="none", gradient_checkpointing=checkpointing, **attention_layout("sdpa"))).total
        for checkpointing in (False, True)}
    assert one_row[True] < one_row[False]
    # usable memory (90%) between one checkpointed row and one plain row
    total = (one_row[True] + one_row[False]) / 2 / 0.9
    monkeypatch.setattr(auto_batch, "visible_gpu", lambda: ("stub GPU", total))
    _, _, training = _parse_training(argv, tmp_path)
    assert training.gradient_checkpointing and training.per_device_train_batch_size >= 1
    assert "gradient checkpointing turned on" in training.batch_size_choice
    # an explicit choice is kept: off is refused with the reason, on is used as given (and not announced)
    with pytest.raises(UserError, match="off here as you asked"):
        _parse_training(argv + ["--gradient_checkpointing", "false"], tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text("gradient_checkpointing: false\n")   # a config file's choice is as explicit as a flag
    with pytest.raises(UserError, match="off here as you asked"):
        _parse_training([str(config)] + argv, tmp_path)
    _, _, given = _parse_training(argv + ["--gradient_checkpointing"], tmp_path)
    assert given.gradient_checkpointing and "turned on" not in given.batch_size_choice
    # memory enough without it: it stays off
    monkeypatch.setattr(auto_batch, "visible_gpu", lambda: ("stub GPU", 4 * one_row[False] / 0.9))
    _, _, roomy = _parse_training(argv, tmp_path)
    assert not roomy.gradient_checkpointing and "turned on" not in roomy.batch_size_choice
    # not even with it: refused, saying so
    monkeypatch.setattr(auto_batch, "visible_gpu", lambda: ("stub GPU", one_row[True] / 2))
    with pytest.raises(UserError, match="checkpointing alone is not enough"):
        _parse_training(argv, tmp_path)


def test_auto_batch_is_refused_for_preference_tuning(tmp_path, monkeypatch):
    from lmtrain.arguments import DPOTrainArguments, LoraArguments, ModelArguments, PreferenceDataArguments
    from lmtrain.cli.parsing import parse_arguments
    from lmtrain.planning import auto_batch

    monkeypatch.setattr(auto_batch, "visible_gpu", lambda: ("NVIDIA H100 80GB HBM3", 80 * 2 ** 30))
    with pytest.raises(UserError, match="sizes pretraining and SFT runs"):
        parse_arguments([ModelArguments, PreferenceDataArguments, LoraArguments, DPOTrainArguments],
                        ["--per_device_train_batch_size", "auto", "--output_dir", str(tmp_path)])


def test_global_batch_that_does_not_divide_is_refused(tmp_path):
    with pytest.raises(UserError, match="not a multiple"):
        _parse_training(["--per_device_train_batch_size", "3", "--global_batch_size", "32"], tmp_path)


def test_plan_is_an_lmtrain_command():
    from lmtrain.cli.main import COMMANDS

    assert COMMANDS["plan"][:2] == ("plan", "plan.py")


@pytest.mark.parametrize("flags, message", [
    (["--config_name", "qwen2.5-0.5b", "--gpu", "X100"], "--gpu X100: not a GPU kind"),
    (["--config_name", "no-such-config"], "no-such-config"),
    (["--config_name", "qwen2.5-0.5b", "--num_gpus", "0"], "--num_gpus 0: must be positive"),
    (["--config_name", "qwen2.5-0.5b", "--train_tokens", "-5"], "--train_tokens -5: expected a positive number"),
    (["--config_name", "qwen2.5-0.5b", "--per_device_train_batch_size", "-1"], "must be positive"),
    (["--config_name", "qwen2.5-0.5b", "--mfu", "35"], "--mfu 35"),
    ([], "give the model to plan"),
])
def test_bad_input_is_one_error_line_and_exit_2(flags, message, tmp_path, capsys):
    from lmtrain.cli.plan import main

    with pytest.raises(SystemExit) as exit_info:
        run_entry_point(main, flags + ["--output_dir", str(tmp_path)])
    assert exit_info.value.code == EXIT_USER_ERROR
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: ") and message in error[0]


@pytest.mark.parametrize("flags, message", [
    (["--train_tokens", "5B", "--max_steps", "100"], "both set the tokens of the run"),
    (["--strategy", "zero3", "--deepspeed", "ds_configs/zero2.json"], "disagree: give one of them"),
    (["--global_batch_size", "64", "--gradient_accumulation_steps", "3"], "--gradient_accumulation_steps 3 and"),
    (["--compute_budget", "1e20", "--gpu_hours", "10"], "not both"),
    (["--dataset_path", "no/such/dir"], "--dataset_path no/such/dir: not a prepared directory"),
])
def test_conflicting_or_missing_inputs_are_refused(flags, message, tmp_path, capsys):
    from lmtrain.cli.plan import main

    with pytest.raises(SystemExit):
        run_entry_point(main, ["--config_name", "qwen2.5-0.5b", *flags, "--output_dir", str(tmp_path)])
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0], error


@pytest.mark.parametrize("text, flag, message", [
    ('{"hidden_size": 64,', "--config_name", "not a model config transformers can read"),
    ('{"hidden_size": 64}', "--config_name", "needs a model_type"),
    ('{"model_type": "qwen2", "hidden_size": -5}', "--config_name", "hidden_size -5 must be a positive"),
    ('{"model_type": "qwen2", "num_attention_heads": 14, "num_key_value_heads": 4}', "--config_name",
     "not a multiple of num_key_value_heads"),
    ('{"zero_optimization": {"stage": 2', "--deepspeed", "cannot be read as JSON"),
    ('[1, 2]', "--deepspeed", "expected a DeepSpeed config"),
])
def test_malformed_files_name_the_flag_and_file(text, flag, message, tmp_path, capsys):
    from lmtrain.cli.plan import main

    path = tmp_path / "given.json"
    path.write_text(text)
    flags = [flag, str(path)] + (["--config_name", "qwen2.5-0.5b"] if flag == "--deepspeed" else [])
    with pytest.raises(SystemExit) as exit_info:
        run_entry_point(main, flags + ["--output_dir", str(tmp_path / "plan")])
    assert exit_info.value.code == EXIT_USER_ERROR
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and f"{flag} {path}" in error[0] and message in error[0], error


def test_zero2_memory_of_qwen2_5_0_5b_by_hand():
    """Parameters and the ZeRO-2 peak at 8 x 2048 (bf16, Liger, varlen with repeated k/v heads), counted here from
    the config's numbers alone, term by term, as docs/PLANNER.md derives them."""
    from lmtrain.model.config import resolve_config
    from lmtrain.planning.memory import attention_layout

    h, inter, layers, heads, kv_heads, vocab = 896, 4864, 24, 14, 2, 151936
    head_dim, tokens = h // heads, 8 * 2048
    layer = (h * h + h) + 2 * (h * kv_heads * head_dim + kv_heads * head_dim) + h * h + 3 * h * inter + 2 * h
    n = vocab * h + layers * layer + h          # tied embedding, final norm
    assert n == 494_032_768
    per_layer_token = 2 * (2 * h + 4) + 2 * 2 * h + (2 * h + 4 * h + 2 * h + 4 * heads) + 3 * 2 * inter
    activations = tokens * (layers * per_layer_token + (2 * h + 4) + 24) + 2048 * 2 * head_dim * 2
    chunk = 128                                  # next_pow2(ceil(16384 / ceil(151936 / 896))) = next_pow2(97)
    logits = tokens * (2 * h + 4) + chunk * vocab * 2 + vocab * h * 2
    expected = 2 * n + 12 * n + activations + logits   # bf16 weights, fp32 master + m + v; no gradients yet
    shape = shape_of(resolve_config("qwen2.5-0.5b"))
    estimate = estimate_memory(shape, TrainingSetup(8, 2048, strategy="zero2", liger=True, fused_cross_entropy=True,
                                                    **attention_layout("varlen", False)))
    assert shape.parameters() == n
    assert estimate.peak_moment == "backward start" and estimate.total == expected
    assert round(expected / 2 ** 30, 2) == 22.75   # measured 23.65 GiB (loss-fast-0.5b, H200, 2026-12-02)


def test_auto_batch_counts_the_logits_that_label_smoothing_and_z_loss_need(monkeypatch, tiny_tokenizer_dir):
    """Liger's fused loss never materializes the logits; label smoothing and z-loss are computed from them, so
    with either one the auto micro-batch must be sized with the logits tensor (else it runs out of memory)."""
    import importlib.util

    from lmtrain.arguments import DataArguments, ModelArguments, TrainArguments
    from lmtrain.planning import auto_batch, memory

    monkeypatch.setattr(auto_batch, "visible_gpu", lambda: ("stub GPU", 80 * 2 ** 30))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",   # as on a GPU machine with liger-kernel installed
                        lambda name, *a: object() if name == "liger_kernel" else real_find_spec(name, *a))
    sized_with = []
    real_largest = memory.largest_micro_batch
    monkeypatch.setattr(memory, "largest_micro_batch",
                        lambda shape, setup, usable: sized_with.append(setup) or real_largest(shape, setup, usable))
    argv = ["--config_name", "qwen2.5-0.5b", "--tokenizer_name", str(tiny_tokenizer_dir), "--block_size", "2048",
            "--bf16", "--per_device_train_batch_size", "auto"]
    fused = {}
    for extra in ([], ["--z_loss_coefficient", "1e-4"], ["--label_smoothing_factor", "0.1"],
                  ["--z_loss_coefficient", "0"]):
        flags = auto_batch.training_flags(argv + extra, {})
        auto_batch.fitting_micro_batch([ModelArguments, DataArguments, TrainArguments], argv + extra, {}, flags, 1)
        fused[" ".join(extra)] = (sized_with[-1].liger, sized_with[-1].fused_cross_entropy)
    assert fused == {"": (True, True), "--z_loss_coefficient 1e-4": (True, False),
                     "--label_smoothing_factor 0.1": (True, False), "--z_loss_coefficient 0": (True, True)}

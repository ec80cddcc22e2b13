"""Serve a model trained here with vLLM and check it against transformers on the same GPU.

    python scripts/check_vllm.py outputs/demo/sft --sft_eval_file outputs/demo/sft_data/eval.jsonl

What it checks, in vLLM's offline engine (the one `vllm serve` runs):
1. the directory loads as is (config, safetensors, tokenizer, chat template, generation_config);
2. greedy continuations of plain prompts follow transformers' greedy tokens (bf16 on both sides). Where
   they part, transformers' own top-2 logit gap at that step must be within bf16 noise (--tie_margin): two
   correct bf16 kernels may break a near-tie differently, and nothing else may differ. vLLM's log-probability
   of every token it chose must match transformers' (teacher-forced) within --logprob_tolerance;
3. chat: `LLM.chat` renders the chat template and stops at the end-of-turn token (finish_reason "stop"
   when the model ends its answer), and with --sft_eval_file the exact-match accuracy on the SFT demo's
   held-out prompts, from vLLM's answers and from transformers', must agree within --max_accuracy_gap.
Prints one JSON line per check and a summary; exits 1 if a check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROMPTS = ["ROMEO.", "KING HENRY. Now, lords,", "To be, or not to be", "The quick brown fox", "我想在"]


def emit(record: dict) -> None:
    print(json.dumps(record, ensure_ascii=False), flush=True)


def hf_greedy_with_margins(model, prompt_ids: list[int], steps: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and, at each step, the gap between the best and second-best logit."""
    import torch

    ids, tokens, margins = list(prompt_ids), [], []
    with torch.inference_mode():
        for _ in range(steps):
            logits = model(torch.tensor([ids], device=model.device)).logits[0, -1].float()
            top = torch.topk(logits, 2)
            tokens.append(int(top.indices[0]))
            margins.append(float(top.values[0] - top.values[1]))
            ids.append(tokens[-1])
    return tokens, margins


def hf_logprobs_of(model, prompt_ids: list[int], tokens: list[int]) -> list[float]:
    """transformers' log-probabilities of `tokens` following the prompt (teacher-forced)."""
    import torch

    with torch.inference_mode():
        logits = model(torch.tensor([prompt_ids + tokens], device=model.device)).logits[0].float()
    logprobs = torch.log_softmax(logits[len(prompt_ids) - 1:-1], dim=-1)
    return logprobs.gather(1, torch.tensor(tokens, device=model.device)[:, None])[:, 0].tolist()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("--sft_eval_file", default=None)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--tie_margin", type=float, default=0.125,
                        help="top-2 logit gap (bf16 noise) under which vLLM may pick the other token")
    parser.add_argument("--max_accuracy_gap", type=float, default=0.02,
                        help="largest allowed gap between vLLM's and transformers' exact-match accuracy")
    parser.add_argument("--logprob_tolerance", type=float, default=0.25,
                        help="largest allowed difference between vLLM's and transformers' token log-probabilities")
    args = parser.parse_args(argv)

    import torch
    import vllm
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    from lmtrain.evaluation import greedy_chat_answers, load_chat_eval, score_answers

    emit({"versions": {"vllm": vllm.__version__, "torch": torch.__version__,
                       "gpu": torch.cuda.get_device_name(0)}})
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    started = time.time()
    llm = LLM(model=args.model, dtype="bfloat16", gpu_memory_utilization=0.3, max_model_len=1024, seed=0)
    emit({"check": "load", "ok": True, "seconds": round(time.time() - started, 1)})
    hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).cuda().eval()
    failures = []

    # 2. plain greedy continuations (EOS ignored so every prompt runs the full length)
    prompt_ids = [tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS]
    greedy = SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens, ignore_eos=True, logprobs=1)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], greedy)
    agreeing = 0
    for prompt, ids, output in zip(PROMPTS, prompt_ids, outputs):
        theirs = list(output.outputs[0].token_ids)
        ours, margins = hf_greedy_with_margins(hf, ids, args.max_new_tokens)
        first = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), None)
        logprob_gap = max(abs(a - b) for a, b in zip(
            [step[token].logprob for step, token in zip(output.outputs[0].logprobs, theirs)],
            hf_logprobs_of(hf, ids, theirs)))
        ok = (first is None or margins[first] <= args.tie_margin) and logprob_gap <= args.logprob_tolerance
        agreeing += first is None
        emit({"check": "greedy", "prompt": prompt, "ok": ok, "identical": first is None, "first_difference": first,
              "top2_gap_there": None if first is None else round(margins[first], 4),
              "max_logprob_difference": round(logprob_gap, 4),
              "vllm": output.outputs[0].text, "transformers": tokenizer.decode(ours, skip_special_tokens=True)})
        if not ok:
            failures.append(f"greedy '{prompt}': first difference at token {first}, logprobs differ by up to "
                            f"{logprob_gap:.3f}")

    # 3. chat through the chat template, stopping at the end-of-turn token
    if args.sft_eval_file:
        records = load_chat_eval(args.sft_eval_file)
        replies = llm.chat([r["messages"] for r in records], SamplingParams(temperature=0.0, max_tokens=16),
                           use_tqdm=False)
        vllm_answers = [(reply.outputs[0].text, reply.outputs[0].finish_reason == "stop") for reply in replies]
        hf_answers = greedy_chat_answers(hf, tokenizer, records, max_new_tokens=16, batch_size=1)
        vllm_scores, hf_scores = score_answers(records, vllm_answers), score_answers(records, hf_answers)
        same = sum(v.strip() == h for (v, _), (h, _) in zip(vllm_answers, hf_answers)) / len(records)
        emit({"check": "chat", "prompts": len(records), "vllm_exact_match": round(vllm_scores["accuracy"], 4),
              "transformers_exact_match": round(hf_scores["accuracy"], 4), "same_answer": round(same, 4),
              "vllm_stop_rate": round(vllm_scores["stop_rate"], 4),
              "example": {"prompt": records[0]["messages"][-1]["content"], "vllm": vllm_answers[0][0]}})
        if vllm_scores["stop_rate"] == 0:
            failures.append("no chat answer ended at the end-of-turn token")
        if abs(vllm_scores["accuracy"] - hf_scores["accuracy"]) > args.max_accuracy_gap:
            failures.append(f"exact match {vllm_scores['accuracy']:.3f} in vLLM against {hf_scores['accuracy']:.3f} "
                            "in transformers")
    emit({"summary": "ok" if not failures else "failed", "greedy_identical": f"{agreeing}/{len(PROMPTS)}",
          "failures": failures})
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""Chat with a GGUF export through llama.cpp (llama-cpp-python) and score it like evaluate.py does.

    python export.py --model outputs/demo/sft --output_dir exports/sft --gguf exports/sft.gguf \
        --llama_cpp_dir ~/llama.cpp --gguf_type f32
    python scripts/check_gguf.py exports/sft.gguf --sft_eval_file outputs/demo/sft_data/eval.jsonl

Greedy answers through the chat template stored in the GGUF (`create_chat_completion`), exact match per
task and how often the answer ended at the end-of-turn token; the figures to set beside
`evaluate.py --sft_eval_file` on the HF directory.
"""
from __future__ import annotations

import argparse
import json

from lmtrain.evaluation import load_chat_eval, score_answers


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("gguf")
    parser.add_argument("--sft_eval_file", required=True)
    parser.add_argument("--max_new_tokens", type=int, default=16)
    args = parser.parse_args(argv)

    from llama_cpp import Llama

    llm = Llama(model_path=args.gguf, n_ctx=512, verbose=False)
    records = load_chat_eval(args.sft_eval_file)
    answers = []
    for record in records:
        reply = llm.create_chat_completion(messages=record["messages"], temperature=0.0, top_k=1,
                                           max_tokens=args.max_new_tokens)["choices"][0]
        answers.append((reply["message"]["content"], reply["finish_reason"] == "stop"))
    llm.close()
    scores = score_answers(records, answers)
    result = {"accuracy": scores["accuracy"], "stop_rate": scores["stop_rate"],
              "per_task": {task: f"{row['correct']}/{row['total']}" for task, row in scores["per_task"].items()}}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

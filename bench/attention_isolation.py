"""Packed-document isolation for every attention implementation we offer: the logits of documents packed
into one row (position_ids restarting per document, no attention mask) must equal the logits of each
document run alone. Run on the GPU for varlen/flex_attention and the Liger kernels; on a CPU the
implementations that run there are checked (tests/test_fast_path.py calls this too).

    python bench/attention_isolation.py                      # every implementation this machine runs
    python bench/attention_isolation.py --implementations varlen sdpa --liger

Prints one line "ISOLATION {json}" per implementation: the largest absolute logit difference between the
packed row and the documents alone, the difference the same row makes without document boundaries (what a
leak looks like), and "isolated": the first is below a tenth of the second.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmtrain.model.attention import VARLEN, choose_attention, varlen_kernel  # noqa: E402  (registers varlen)

# Isolated: the packed-vs-alone difference is rounding noise, far below what a leak between documents makes.
NOISE_FACTOR = 10


def isolation_error(implementation: str, dtype: torch.dtype, device: str, liger: bool = False,
                    lengths=(37, 300, 5, 170), seed: int = 0) -> tuple[float, float]:
    """Largest |packed - alone| over the logits of the packed documents, and for scale the same difference
    when the row is NOT cut into documents (positions 0..n-1: every token sees the documents before it),
    which is what a leak between documents would look like."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         initializer_range=0.1)  # larger than usual, so attention moves the logits visibly
    model = AutoModelForCausalLM.from_config(config, attn_implementation=implementation, dtype=dtype).to(device)
    if liger:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model)
    model.eval()
    model.config.use_cache = False  # with a KV cache transformers ignores packed position_ids (as training does)
    documents = [torch.randint(0, config.vocab_size, (n,), device=device) for n in lengths]
    ids = torch.cat(documents)[None]
    positions = torch.cat([torch.arange(n, device=device) for n in lengths])[None]
    worst = leak = 0.0
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=positions).logits[0].float()
        joined = model(input_ids=ids).logits[0].float()
        start = 0
        for document in documents:
            alone = model(input_ids=document[None]).logits[0].float()
            worst = max(worst, (packed[start:start + len(document)] - alone).abs().max().item())
            leak = max(leak, (joined[start:start + len(document)] - alone).abs().max().item())
            start += len(document)
    return worst, leak


def available_implementations(device: str) -> list[str]:
    names = ["eager", "sdpa"]
    if device == "cuda":
        names.append("flex_attention")
        if varlen_kernel() is not None:
            names.append(VARLEN)
    return names


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--implementations", nargs="+", default=None, help="default: all this machine runs")
    parser.add_argument("--liger", action="store_true", help="also with the Liger kernels applied (GPU)")
    options = parser.parse_args(argv)
    from lmtrain.model.attention import check_attention_name

    for name in options.implementations or []:
        try:
            check_attention_name(name)
        except ValueError as error:
            parser.error(str(error))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    results = []
    for name in options.implementations or available_implementations(device):
        if choose_attention(name) != name:  # not runnable here (the warning above says why)
            print("ISOLATION " + json.dumps({"implementation": name, "skipped": "not available here"}), flush=True)
            continue
        for liger in ([False, True] if options.liger else [False]):
            error, leak = isolation_error(name, dtype, device, liger=liger)
            row = {"implementation": name, "liger": liger, "dtype": str(dtype), "max_abs_logit_diff": error,
                   "diff_if_documents_leaked": leak, "isolated": error * NOISE_FACTOR < leak}
            print("ISOLATION " + json.dumps(row), flush=True)
            results.append(row)
    return results


if __name__ == "__main__":
    from lmtrain.errors import run_entry_point

    run_entry_point(main)

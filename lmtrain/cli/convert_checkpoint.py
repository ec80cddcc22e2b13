"""Convert a training checkpoint: to a DeepSpeed universal checkpoint (resume on another number of GPUs) or,
from its ZeRO states, to a Hugging Face model (DeepSpeed's zero_to_fp32: the fp32 master weights).

    # saved on 2 GPUs, resumed on 1 (or 8): convert once, then rerun the training command as it was
    lmtrain convert-checkpoint --checkpoint outputs/run/checkpoint-1000 --to universal
    python pretrain.py ... --per_device_train_batch_size auto --global_batch_size 256 --output_dir outputs/run

    # the fp32 weights of a ZeRO-2/ZeRO-3 checkpoint as a model directory
    lmtrain convert-checkpoint --checkpoint outputs/run/checkpoint-1000 --to hf --output_dir exports/step-1000
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from lmtrain.cli.parsing import parse_arguments
from lmtrain.errors import UserError


@dataclass
class ConvertArguments:
    checkpoint: str = field(metadata={"help": "A checkpoint-N directory written with --deepspeed."})
    to: str = field(default="universal", metadata={
        "help": "universal: add a DeepSpeed universal checkpoint (resumable on any number of processes); "
                "hf: write a Hugging Face model from the ZeRO states to --output_dir."})
    output_dir: str | None = field(default=None, metadata={"help": "--to hf: the model directory to write."})
    dtype: str = field(default="float32", metadata={"help": "--to hf: float32 (the master weights), bfloat16, "
                                                            "float16 or auto."})
    workers: int = field(default=min(4, os.cpu_count() or 1), metadata={
        "help": "--to universal: processes that extract and merge the ZeRO partitions."})

    def __post_init__(self):
        if self.to not in ("universal", "hf"):
            raise ValueError(f"--to {self.to}: choose universal or hf")
        if self.to == "hf" and not self.output_dir:
            raise ValueError("--to hf needs --output_dir (where the model goes)")
        if self.workers < 1:
            raise ValueError(f"--workers {self.workers}: give 1 or more")


def main(argv=None):
    import logging

    from lmtrain.training.checkpoint_conversion import convert_to_universal, export_zero_checkpoint

    (args,) = parse_arguments([ConvertArguments], argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.to == "universal":
        path = convert_to_universal(args.checkpoint, args.workers)
        print(f"universal checkpoint: {path}\nrerun the training command (any number of processes, the same global "
              "batch) to resume from it")
        return str(path)
    if not os.path.isdir(args.checkpoint):
        raise UserError(f"--checkpoint {args.checkpoint}: no such directory")
    path = export_zero_checkpoint(args.checkpoint, args.output_dir, args.dtype)
    print(f"exported to {path}")
    return str(path)


if __name__ == "__main__":
    from lmtrain.errors import run_entry_point

    run_entry_point(main)

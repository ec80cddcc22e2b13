"""The planner (plan.py, `lmtrain plan`): size, compute, memory, time and cost of a run before paying for it.

- shape.py: the model's shape and parameter count from its config alone;
- memory.py: GPU memory per device by term, per DeepSpeed stage, and the largest micro-batch that fits;
- gpus.py: GPU kinds (memory, peak) and the MFU this project measured on each;
- compute.py: tokens, FLOPs, Chinchilla and compute-optimal sizes, step time, GPU-hours, cost;
- lengths.py: dataset length statistics and their histogram;
- auto_batch.py: `--per_device_train_batch_size auto` for pretrain.py and sft.py.
"""

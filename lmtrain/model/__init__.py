"""The model: building it from a config or weights and checking the vocabulary (building.py), configs and
their overrides (config.py), the attention choice and document masks (attention.py), LoRA (lora.py), and
the sizes that the MFU log and the planner read: parameters, FLOPs per token, peak TFLOP/s (flops.py).
Fused kernels go in a module of their own here."""

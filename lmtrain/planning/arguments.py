"""The options of plan.py (`lmtrain plan`). Flags shared with pretrain.py / sft.py keep their names and meaning
(--per_device_train_batch_size, --gradient_accumulation_steps, --gradient_checkpointing, --bf16, --deepspeed,
--block_size, --max_length, --dataset_path, --train_files, --max_steps, --num_train_epochs), so a training
command's flags plan that very run; the model comes from lmtrain.arguments.ModelArguments."""
from __future__ import annotations

from dataclasses import dataclass, field

from lmtrain.planning.memory import STRATEGIES


@dataclass
class PlanArguments:
    stage: str = field(default="pretrain", metadata={
        "help": "pretrain (rows of --block_size tokens) or sft (rows of --max_length tokens)."})
    block_size: int = field(default=1024, metadata={"help": "Tokens per pretraining row (as pretrain.py)."})
    max_length: int = field(default=1024, metadata={"help": "Tokens per SFT row (as sft.py)."})
    dataset_path: str | None = field(default=None, metadata={
        "help": "A prepared directory (data_prep/prepare_pretrain.py or prepare_sft.py): its length statistics, "
                "its token count and its row length."})
    train_files: list[str] | None = field(default=None, metadata={
        "help": "Raw files, globs or directories (text for --stage pretrain, conversations for sft): length "
                "statistics and token count, tokenized as training would (needs --tokenizer_name)."})
    text_field: str = field(default="text", metadata={"help": "The text field of jsonl/json/parquet records."})
    txt_unit: str = field(default="file", metadata={"help": "A .txt document is a whole file, a line or a paragraph."})
    max_samples: int | None = field(default=None, metadata={
        "help": "Read at most this many documents / samples for the statistics (default: all)."})
    train_tokens: str | None = field(default=None, metadata={
        "help": "Token budget of the run, e.g. 20B or 3e11 (default: --max_steps, else the dataset x "
                "--num_train_epochs, else what --compute_budget buys, else the Chinchilla-optimal count)."})
    compute_budget: str | None = field(default=None, metadata={
        "help": "Training compute in FLOPs, e.g. 1e21: the compute-optimal size and the tokens it buys."})
    gpu_hours: float | None = field(default=None, metadata={
        "help": "Compute budget in GPU-hours of --gpu at the plan's MFU (instead of --compute_budget)."})
    max_steps: int | None = field(default=None, metadata={"help": "Optimizer steps (as pretrain.py)."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs over the dataset, for its token count."})
    per_device_train_batch_size: str = field(default="8", metadata={
        "help": "Micro-batch per GPU, in rows, or auto: the largest that fits --gpu, as pretrain.py's auto picks it "
                "(lowered to divide --global_batch_size)."})
    gradient_accumulation_steps: int | None = field(default=None, metadata={
        "help": "Micro-batches per optimizer step (default 1, or what --global_batch_size makes it)."})
    global_batch_size: int | None = field(default=None, metadata={
        "help": "Rows per optimizer step over all GPUs; sets the accumulation (as in pretrain.py)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute layers in the backward."})
    bf16: bool = field(default=False, metadata={
        "help": "bf16 mixed precision (fp32 master weights), as pretrain.py --bf16; without it fp32."})
    fp16: bool = field(default=False, metadata={"help": "fp16 mixed precision: the same memory as --bf16."})
    deepspeed: str | None = field(default=None, metadata={
        "help": "The DeepSpeed config of the run (e.g. ds_configs/zero2.json): its stage, offload, optimizer "
                "and bucket sizes."})
    strategy: str | None = field(default=None, metadata={
        "help": f"The run's memory strategy, one of {', '.join(STRATEGIES)} (default: from --deepspeed, else none). "
                "Memory is shown for every strategy; time and the micro-batch search use this one."})
    use_liger_kernel: bool = field(default=True, metadata={
        "help": "Liger's kernels, as pretrain.py runs them on a GPU with liger-kernel installed (its default): a "
                "fused linear cross-entropy (no logits tensor), RMSNorm, SwiGLU and RoPE that save less."})
    fused_cross_entropy: bool | None = field(default=None, metadata={
        "help": "Only the fused linear cross-entropy, on or off (default: as --use_liger_kernel)."})
    num_gpus: int = field(default=1, metadata={"help": "Data-parallel GPUs (ZeRO partitions over them)."})
    gpu: str = field(default="H100", metadata={
        "help": "GPU kind: H100, H200, H800, B200, A100-80GB, A100-40GB, A800, L40S, 4090."})
    gpu_memory_gib: float | None = field(default=None, metadata={"help": "Memory per GPU, GiB (overrides --gpu's)."})
    peak_tflops: float | None = field(default=None, metadata={
        "help": "Dense bf16 peak per GPU, TFLOP/s (overrides --gpu's)."})
    memory_headroom: float = field(default=0.1, metadata={
        "help": "Share of GPU memory kept free (CUDA context, allocator fragmentation, NCCL buffers)."})
    mfu: float | None = field(default=None, metadata={
        "help": "Model FLOPs utilization to plan with, e.g. 0.35 (default: this project's measurement on --gpu)."})
    price_per_gpu_hour: float | None = field(default=None, metadata={"help": "Price of one GPU-hour, for the cost."})
    output_dir: str = field(default="outputs/plan", metadata={
        "help": "Where plan.json (and lengths.png with a dataset) are written."})

    def __post_init__(self):
        if self.stage not in ("pretrain", "sft"):
            raise ValueError(f"--stage {self.stage}: choose pretrain or sft")
        if self.strategy is not None and self.strategy not in STRATEGIES:
            raise ValueError(f"--strategy {self.strategy}: choose one of {', '.join(STRATEGIES)}")
        if self.txt_unit not in ("file", "line", "paragraph"):
            raise ValueError("--txt_unit must be file, line or paragraph")
        if self.dataset_path and self.train_files:
            raise ValueError("--dataset_path is already prepared data; do not also give --train_files")
        if self.compute_budget and self.gpu_hours:
            raise ValueError("give --compute_budget (FLOPs) or --gpu_hours, not both")
        if self.train_tokens and self.max_steps:
            raise ValueError(f"--train_tokens {self.train_tokens} and --max_steps {self.max_steps} both set the tokens "
                             "of the run: give one of them")
        self.auto_micro_batch = str(self.per_device_train_batch_size).strip().lower() == "auto"
        if self.auto_micro_batch:
            self.per_device_train_batch_size = None   # set by the plan once the model and the GPU are known
        else:
            try:
                self.per_device_train_batch_size = int(self.per_device_train_batch_size)
            except ValueError:
                raise ValueError(f"--per_device_train_batch_size {self.per_device_train_batch_size}: a whole number "
                                 "of rows, or auto") from None
        for name in ("block_size", "max_length", "per_device_train_batch_size", "gradient_accumulation_steps",
                     "num_gpus", "max_steps", "global_batch_size", "max_samples", "num_train_epochs", "gpu_hours",
                     "gpu_memory_gib", "peak_tflops", "mfu", "price_per_gpu_hour"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"--{name} {value}: must be positive")
        if self.mfu is not None and self.mfu > 1:
            raise ValueError(f"--mfu {self.mfu}: a share of the peak, between 0 and 1 (e.g. 0.35)")
        if not 0 <= self.memory_headroom < 1:
            raise ValueError(f"--memory_headroom {self.memory_headroom}: a share between 0 and 1 (e.g. 0.1)")
        if not self.auto_micro_batch:
            self.resolve_accumulation()

    def resolve_accumulation(self):
        """gradient_accumulation_steps from --global_batch_size (or 1), once the micro-batch is known."""
        if self.global_batch_size is not None:
            per_step = self.per_device_train_batch_size * self.num_gpus
            if self.global_batch_size % per_step:
                raise ValueError(f"--global_batch_size {self.global_batch_size} is not a multiple of "
                                 f"--per_device_train_batch_size x --num_gpus = {per_step}")
            accumulation = self.global_batch_size // per_step
            if self.gradient_accumulation_steps not in (None, accumulation):  # as pretrain.py refuses it
                raise ValueError(f"--gradient_accumulation_steps {self.gradient_accumulation_steps} and "
                                 f"--global_batch_size {self.global_batch_size} disagree ({self.global_batch_size} = "
                                 f"{self.per_device_train_batch_size} x {accumulation} x {self.num_gpus} GPUs): "
                                 "give one of them")
            self.gradient_accumulation_steps = accumulation
        elif self.gradient_accumulation_steps is None:
            self.gradient_accumulation_steps = 1

    @property
    def seq_length(self) -> int:
        return self.block_size if self.stage == "pretrain" else self.max_length

    @property
    def precision(self) -> str:
        return "bf16" if (self.bf16 or self.fp16) else "fp32"

"""Launch environment: a plain `python pretrain.py --deepspeed ...` runs as a one-process job, and
`torchrun --nproc_per_node N` on a machine without a GPU trains as N-process data parallel on the CPU."""
from __future__ import annotations

import logging
import os
import socket
from contextlib import contextmanager
from datetime import timedelta

logger = logging.getLogger(__name__)

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# How long the other ranks wait for the main process to prepare data on the fly. Not --ddp_timeout: that
# bounds collectives that should take seconds (a hung rank is found within it), while tokenizing a corpus
# can take hours. The ranks wait in a barrier of their own gloo group, whose timeout is this one.
PREPARATION_TIMEOUT = timedelta(days=7)


def default_single_process_environment(deepspeed: str | dict | None):
    """With --deepspeed and no launcher (`deepspeed`, `torchrun` and `accelerate launch` set RANK,
    WORLD_SIZE and LOCAL_RANK), set a one-process world on this machine. Without them DeepSpeed tries to
    discover the world through MPI and fails with "No module named 'mpi4py'". Must run before
    TrainingArguments sets up the distributed state. Variables already set are kept."""
    if not deepspeed or any(name in os.environ for name in LAUNCHER_VARIABLES):
        return
    defaults = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "LOCAL_RANK": "0",
                "WORLD_SIZE": "1"}
    for name, value in defaults.items():
        os.environ.setdefault(name, value)
    logger.info("--deepspeed without a launcher: running as one process (MASTER_ADDR=%s MASTER_PORT=%s); use "
                "`deepspeed --num_gpus N` or `torchrun` for several", os.environ["MASTER_ADDR"],
                os.environ["MASTER_PORT"])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launched_world_size() -> int:
    """The number of processes a launcher (torchrun, deepspeed, accelerate launch) started; 1 without one."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def cpu_only_machine() -> bool:
    import torch

    xpu = getattr(torch, "xpu", None)
    return not torch.cuda.is_available() and not (xpu is not None and xpu.is_available()) \
        and not torch.backends.mps.is_available()


def cpu_data_parallel(use_cpu: bool, deepspeed) -> bool:
    """True when several launched processes train on CPUs (no GPU here, or --use_cpu): then use_cpu must be
    set and the gloo process group made here (init_cpu_process_group), before TrainingArguments.

    Without --use_cpu, accelerate only counts a launched world as distributed when it finds a GPU backend
    (accelerate/state.py _prepare_backend): on a CPU-only machine every rank then trained alone on the full
    data, the process group was still initialized (transformers warns "parallel_mode !=
    ParallelMode.DISTRIBUTED") and the logged loss was the ranks' losses summed (12.5 for 6.2). use_cpu makes
    it MULTI_CPU (gloo), i.e. DistributedDataParallel with a distributed sampler: N processes of batch B
    train like one process of batch N*B.

    DeepSpeed on CPUs is supported in one process only (README): several launched processes with
    --deepspeed and no GPU are refused (ValueError: a UserError through parse_arguments)."""
    if launched_world_size() <= 1 or not (use_cpu or cpu_only_machine()):
        return False
    if deepspeed:
        raise ValueError(f"--deepspeed with {launched_world_size()} processes on CPUs: lmtrain runs DeepSpeed on "
                         "CPUs in one process only. Run `python pretrain.py --deepspeed ...` (one process), or "
                         "drop --deepspeed for CPU data parallel (`torchrun --nproc_per_node N pretrain.py ...`)")
    return True


def init_cpu_process_group(timeout_seconds: int):
    """The gloo process group of a CPU data-parallel job, with --ddp_timeout as its timeout: accelerate's
    CPU path creates it with torch's 30-minute default, ignoring --ddp_timeout (it passes the timeout on the
    GPU and DeepSpeed paths only). Rendezvous through the launcher's MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_seconds))


@contextmanager
def main_process_first(training_args, desc: str):
    """Each node's main process runs the block first (it prepares and caches the data); the other ranks wait,
    then run it on the cache. Like TrainingArguments.main_process_first, but the wait does not time out after
    --ddp_timeout (the default 30 min, or less): a preparation slower than that used to crash the waiting
    ranks with a gloo/NCCL timeout. If the main process fails the others are not released: the launcher
    (torchrun, deepspeed) ends them when it exits non-zero."""
    import torch.distributed as dist

    if training_args is None or training_args.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        yield
        return
    group = dist.new_group(backend="gloo", timeout=PREPARATION_TIMEOUT)  # every rank creates it, in the same order
    first = training_args.local_process_index == 0
    if not first:
        logger.info("rank %d waits for the main process: %s", training_args.process_index, desc)
        dist.barrier(group=group)
    yield
    if first:
        dist.barrier(group=group)


def global_batch_rows(training_args) -> int:
    """Rows per optimizer step over all processes. accelerate gives each rank its own micro-batches of
    --per_device_train_batch_size rows (a distributed sampler), so the optimizer step averages
    per-device batch x accumulation x world size rows; the learning rate and the steps per epoch follow it."""
    return (training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
            * max(training_args.world_size, 1))


def log_global_batch(training_args):
    """One line on rank 0: the global batch and its factors, so a run on another GPU count shows at once whether
    it still takes steps of the same size (a resume on another world size needs the same global batch)."""
    if training_args.process_index != 0:
        return
    logger.info("global batch: %d rows per optimizer step = %d per device x %d accumulation x %d process%s",
                global_batch_rows(training_args), training_args.per_device_train_batch_size,
                training_args.gradient_accumulation_steps, training_args.world_size,
                "" if training_args.world_size == 1 else "es")


def single_process_deepspeed(training_args):
    """ZeRO-1/2's overlap_comm reduces gradients on a side stream while the backward pass goes on; in a single
    process there is nothing to reduce, and the overlap still costs a device synchronization per gradient
    bucket and one at the end of each backward pass (DeepSpeed 0.19). Turned off there: measured on one H200
    (docs/PERFORMANCE.md, 2026-12-02) +1.7% tokens/s for the 1.5B shape, +0.8% for 0.5B. With more processes
    the config is used as written."""
    hf = getattr(training_args, "hf_deepspeed_config", None)
    if hf is None or training_args.world_size != 1:
        return
    zero = hf.config.get("zero_optimization") or {}
    if zero.get("stage") in (1, 2) and zero.get("overlap_comm") is True:
        zero["overlap_comm"] = False  # the dict accelerate's DeepSpeedPlugin hands to deepspeed.initialize
        logger.info("one process: DeepSpeed overlap_comm off (no gradient reduction to overlap)")

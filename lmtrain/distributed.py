"""Launch environment: a plain `python pretrain.py --deepspeed ...` runs as a one-process job."""
from __future__ import annotations

import logging
import os
import socket

logger = logging.getLogger(__name__)

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


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

"""The multi-node preflight (lmtrain/preflight_nodes.py) with two gloo processes on this machine, one given
other data: every rank stops with the same message naming the rank and the file that differs. And the
launchers: scripts/pretrain_multinode.sh prints its commands for a hostfile of local slots (DRY_RUN=1), and
the Slurm example's torchrun route is checked the same way."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCHER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
# One process of a two-process job: rank R checks the data file given as argument R + 1.
WORKER = '''
import sys
from types import SimpleNamespace
import torch.distributed as dist
from lmtrain.errors import run_entry_point
from lmtrain.preflight_nodes import check_nodes_agree

def main(argv):
    import logging, os
    logging.basicConfig(level=logging.INFO)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    training = SimpleNamespace(world_size=dist.get_world_size(), process_index=rank)
    check_nodes_agree(training, SimpleNamespace(dataset_path=None, train_files=[argv[rank]], validation_files=None))
    print(f"rank {rank}: nodes agree", flush=True)

run_entry_point(main, sys.argv[1:])
'''


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def two_ranks(tmp_path: Path, files: list, directories: list[Path] | None = None) -> list[subprocess.CompletedProcess]:
    """Both ranks started directly (not through torchrun, which would end one rank as soon as the other fails:
    here each rank must be seen to stop by itself), rank R in directories[R] (default: the repository)."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    port = str(free_port())
    processes = []
    for rank in range(2):
        environment = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
        environment.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), LOCAL_RANK=str(rank),
                           WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
        processes.append(subprocess.Popen([sys.executable, str(worker), *map(str, files)],
                                          cwd=(directories or [REPO, REPO])[rank], env=environment,
                                          text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=120), p.communicate()[0], None) for p in processes]


def test_two_ranks_with_the_same_data_agree(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "to be or not to be"}\n')
    results = two_ranks(tmp_path, [data, data])
    for rank, result in enumerate(results):
        assert result.returncode == 0, result.stdout[-3000:]
        assert f"rank {rank}: nodes agree" in result.stdout
    assert "preflight: 2 processes on 1 node(s)" in results[0].stdout


def test_a_rank_with_other_data_stops_every_rank_with_one_message(tmp_path):
    ours, theirs = tmp_path / "node0", tmp_path / "node1"
    for root, text in ((ours, "to be or not to be"), (theirs, "to be or not to bee")):  # a stale copy
        root.mkdir()
        (root / "train.jsonl").write_text(f'{{"text": "{text}"}}\n')
    # the same path on both "nodes" (train.jsonl in each rank's working directory), as on node-local disks
    results = two_ranks(tmp_path, ["train.jsonl", "train.jsonl"], [ours, theirs])
    for rank, result in enumerate(results):
        assert result.returncode == 2, (rank, result.stdout[-3000:])
        assert "error: the nodes of this job disagree, so it stops before training" in result.stdout, rank
        assert "data: rank 1 (" in result.stdout and "sees other data than rank 0" in result.stdout, rank
        assert "train.jsonl: 32:" in result.stdout and "on rank 1, 31:" in result.stdout, rank  # the file, both sizes
        assert "nodes agree" not in result.stdout


def test_compare_facts_names_code_and_gpu_differences():
    from lmtrain.preflight_nodes import compare_facts

    base = {"host": "a", "code": {"commit": "abc1234", "files": "111"}, "data": {"d/x.arrow": "10:ff"}, "gpus": 8,
            "processes_per_node": 8}
    other = {**base, "host": "b", "code": {"commit": "def5678", "files": "222"}, "gpus": 7}
    problems = compare_facts([base, dict(base), other])
    assert problems == ["code: rank 2 (b) has commit def5678, files 222; rank 0 (a) has abc1234, files 111",
                        "GPUs: rank 2 (b) has 7, rank 0 (a) 8"]
    assert compare_facts([base, dict(base)]) == []


def test_data_fingerprints_see_content_and_size_not_mtime(tmp_path):
    from lmtrain.preflight_nodes import data_fingerprints

    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "data-00000.arrow").write_bytes(os.urandom(3 << 20))
    (prepared / "meta.json").write_text("{}")
    before = data_fingerprints([str(prepared), str(tmp_path / "absent.jsonl")])
    assert set(before) == {f"{prepared}/data-00000.arrow", f"{prepared}/meta.json", str(tmp_path / "absent.jsonl")}
    os.utime(prepared / "meta.json", (1, 1))
    assert data_fingerprints([str(prepared), str(tmp_path / "absent.jsonl")]) == before
    with open(prepared / "data-00000.arrow", "r+b") as handle:  # the last MiB changed, size kept
        handle.seek((3 << 20) - 10)
        handle.write(b"0123456789")
    assert data_fingerprints([str(prepared)])[f"{prepared}/data-00000.arrow"] != before[f"{prepared}/data-00000.arrow"]

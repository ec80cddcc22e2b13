"""The multi-node preflight (lmtrain/preflight_nodes.py) with two gloo processes on this machine, one given
other data: every rank stops with the same message naming the rank and the file that differs. And the
launchers: scripts/pretrain_multinode.sh prints its commands for a hostfile of local slots (DRY_RUN=1), the
Slurm example's torchrun route is checked the same way (stand-in srun/scontrol), and (slow) the script's
torchrun route trains a two-"node" CPU job on this machine."""
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
    try:  # torn down before exit: gloo's threads otherwise may abort the interpreter's exit (SIGABRT)
        rank = dist.get_rank()
        training = SimpleNamespace(world_size=dist.get_world_size(), process_index=rank)
        check_nodes_agree(training, SimpleNamespace(dataset_path=None, train_files=[argv[rank]],
                                                    validation_files=None))
        print(f"rank {rank}: nodes agree", flush=True)
    finally:
        dist.destroy_process_group()

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


# --- the launchers ---------------------------------------------------------------------------------------

def launch(env: dict, *args: str, path_prefix: Path | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES and not k.startswith("NCCL_")}
    environment.update(DRY_RUN="1", **env)
    if path_prefix is not None:
        environment["PATH"] = f"{path_prefix}:{environment['PATH']}"
    script = env.pop("SCRIPT", "scripts/pretrain_multinode.sh")
    return subprocess.run(["bash", script, *args], cwd=REPO, env=environment, text=True, capture_output=True,
                          timeout=60)


def test_the_deepspeed_route_reads_a_hostfile_of_local_slots(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n# the second node\n127.0.0.1 slots=2   # same slots\n")
    result = launch({"HOSTFILE": str(hostfile), "NCCL_SOCKET_IFNAME": "lo", "NCCL_IB_DISABLE": "1"}, "--max_steps", "5")
    assert result.returncode == 0, result.stderr
    assert "deepspeed: 2 node(s), 4 GPU(s) in all, master localhost:29500" in result.stderr
    assert "NCCL_SOCKET_IFNAME=lo" in result.stderr and "NCCL_IB_DISABLE=1" in result.stderr
    assert "NCCL_DEBUG=WARN" in result.stderr  # exported for DeepSpeed's launcher to forward (NCCL_*)
    command = result.stdout.split()
    assert command[:7] == ["deepspeed", "--hostfile", str(hostfile), "--master_addr", "localhost", "--master_port",
                           "29500"]
    assert command[7] == "pretrain.py" and command[-2:] == ["--max_steps", "5"]  # extra flags passed through last


@pytest.mark.parametrize("text,message", [
    ("a slots=2\nb slots=4\n", "the nodes have different slot counts"),
    ("a slots=2\nb 4\n", ":2: expected 'HOST slots=N'"),
    ("# nothing\n\n", "lists no node"),
])
def test_a_bad_hostfile_stops_before_anything_starts(tmp_path, text, message):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(text)
    result = launch({"HOSTFILE": str(hostfile)})
    assert result.returncode == 2 and message in result.stderr and not result.stdout, result.stderr


def test_the_torchrun_route_runs_one_command_per_node():
    result = launch({"LAUNCHER": "torchrun", "NNODES": "2", "NODE_RANK": "1", "NPROC_PER_NODE": "8",
                     "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:12] == ["torchrun", "--nnodes", "2", "--node_rank", "1", "--nproc_per_node", "8",
                                          "--master_addr", "10.0.0.1", "--master_port", "29400", "pretrain.py"]
    wrong = launch({"LAUNCHER": "torchrun", "NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "10.0.0.1",
                    "NPROC_PER_NODE": "1"})
    assert wrong.returncode == 2 and "NODE_RANK=2 is outside 0..1" in wrong.stderr
    assert "set MASTER_ADDR" in launch({"LAUNCHER": "torchrun"}).stderr


def test_the_slurm_example_starts_the_torchrun_route_on_each_node(tmp_path):
    """srun and scontrol replaced by stand-ins: srun runs its command once per node of a 2-node allocation,
    with that node's SLURM_NODEID, as Slurm does with --ntasks-per-node=1."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\nprintf "gpu-a\\ngpu-b\\n"\n')
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
                                  'for node in 0 1; do SLURM_NODEID=$node "$@"; done\n')
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    result = launch({"SCRIPT": "scripts/slurm/pretrain.sbatch", "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2",
                     "SLURM_JOB_NODELIST": "gpu-[a-b]", "SLURM_GPUS_ON_NODE": "4", "SLURM_SUBMIT_DIR": str(REPO)},
                    "--max_steps", "7", path_prefix=bin_dir)
    assert result.returncode == 0, result.stderr
    commands = [line.split() for line in result.stdout.splitlines()]
    assert len(commands) == 2
    for node, command in enumerate(commands):
        assert command[:11] == ["torchrun", "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "4",
                                "--master_addr", "gpu-a", "--master_port", str(20000 + 4242)], command
        assert command[-2:] == ["--max_steps", "7"]


@pytest.mark.slow  # ~50 s on 2 cores: preparation, then two interpreters importing torch/transformers
def test_two_nodes_on_this_machine_train_through_the_torchrun_route(tmp_path):
    """The script's torchrun route for real: two "nodes" (NODE_RANK 0 and 1, one CPU process each) meet at
    MASTER_ADDR:MASTER_PORT and train as one gloo data-parallel job of world size 2, on prepared data."""
    import json

    from lmtrain.cli.prepare import main as prepare
    from lmtrain.data.demo_corpus import ensure_demo_corpus
    from lmtrain.tokenizer import train_bpe_tokenizer

    lines = ensure_demo_corpus().read_text(encoding="utf-8").splitlines()[:4]
    (tmp_path / "plays.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    train_bpe_tokenizer([json.loads(line)["text"] for line in lines], vocab_size=512,
                        show_progress=False).save_pretrained(tmp_path / "tokenizer")
    prepare(["--tokenizer_name", str(tmp_path / "tokenizer"), "--train_files", str(tmp_path / "plays.jsonl"),
             "--block_size", "32", "--validation_split_percentage", "0", "--output_dir", str(tmp_path / "prepared")])
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES and not k.startswith("NCCL_")}
    env.update(LAUNCHER="torchrun", NNODES="2", NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), MODEL_CONFIG="qwen2-tiny", TOKENIZER=str(tmp_path / "tokenizer"),
               DATA=str(tmp_path / "prepared"), OUTPUT_DIR=str(out))
    flags = ["--deepspeed", "", "--bf16", "false", "--gradient_checkpointing", "false", "--config_overrides",
             "hidden_size=32,intermediate_size=64,num_hidden_layers=2,num_attention_heads=2,num_key_value_heads=1",
             "--per_device_train_batch_size", "2", "--max_steps", "2", "--save_steps", "2", "--report_to", "none",
             "--plot_curves", "false", "--dataloader_num_workers", "0", "--disable_tqdm", "true", "--logging_steps",
             "1"]
    nodes = [subprocess.Popen(["bash", "scripts/pretrain_multinode.sh", *flags], cwd=REPO,
                              env={**env, "NODE_RANK": str(r)}, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for r in range(2)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    for rank, node in enumerate(nodes):
        assert node.returncode == 0, outputs[rank][-3000:]
    assert "torchrun: node 1 of 2, 1 process(es) here" in outputs[1]
    assert "global batch: 4 rows per optimizer step = 2 per device x 1 accumulation x 2 processes" in outputs[0]
    marker = json.loads((out / "checkpoint-2" / "lmtrain_checkpoint.json").read_text())
    assert marker["world_size"] == 2 and marker["global_batch"] == 4
    assert (out / "checkpoint-2" / "rng_state_1.pth").is_file() and (out / "model.safetensors").is_file()

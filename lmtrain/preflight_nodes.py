"""Before a multi-node run trains: does every process see the same code, the same data and the same number of
GPUs per node? Each rank fingerprints what it sees, the fingerprints are exchanged (all_gather_object over the
job's process group) and every rank compares them, so a node with another checkout, a stale copy of the
prepared data or one GPU fewer stops the job on every rank with the same message, before any training.
Without it such a node trains on: other code or other data silently, or it hangs the first collective.

Fingerprints are cheap by design (seconds on a terabyte corpus): a file counts by its path relative to the
data root, its size and the SHA-1 of its first and last MiB (the whole file when it is smaller), never its
mtime (copies to node-local disks differ there). Code: the git commit where there is one, and the SHA-1 of
the toolkit's own files (lmtrain/, the entry scripts, ds_configs/, configs/): uncommitted edits count.
"""
from __future__ import annotations

import glob
import hashlib
import logging
import os
import socket
import subprocess
from pathlib import Path

from lmtrain.errors import UserError

logger = logging.getLogger(__name__)

REPOSITORY = Path(__file__).resolve().parents[1]
CODE_PATTERNS = ("lmtrain/**/*.py", "*.py", "ds_configs/*.json", "configs/*.json")
SAMPLE_BYTES = 1 << 20  # the head and the tail hashed per file
DATA_FIELDS = ("dataset_path", "train_files", "validation_files")  # the data options of every stage


def file_fingerprint(path: Path) -> str:
    size = path.stat().st_size
    digest = hashlib.sha1(str(size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(SAMPLE_BYTES))
        if size > 2 * SAMPLE_BYTES:
            handle.seek(size - SAMPLE_BYTES)
        digest.update(handle.read(SAMPLE_BYTES))
    return f"{size}:{digest.hexdigest()[:12]}"


def data_fingerprints(locations: list[str]) -> dict[str, str]:
    """{name: fingerprint} for each data location (a prepared dataset directory, a file or a glob); a name
    that is no local path (a hub dataset) is recorded as such, so nodes still agree on the name itself."""
    found = {}
    for location in locations:
        matches = sorted(glob.glob(location)) or [location]
        for match in matches:
            path = Path(match)
            if path.is_dir():
                for file in sorted(p for p in path.rglob("*") if p.is_file()):
                    found[f"{match}/{file.relative_to(path)}"] = file_fingerprint(file)
            elif path.is_file():
                found[match] = file_fingerprint(path)
            else:
                found[match] = "not a local path"
    return found


def code_fingerprint(root: Path = REPOSITORY) -> dict[str, str]:
    digest = hashlib.sha1()
    for pattern in CODE_PATTERNS:
        for file in sorted(root.glob(pattern)):
            if "__pycache__" not in file.parts and file.is_file():
                digest.update(str(file.relative_to(root)).encode() + b"\0" + file.read_bytes() + b"\0")
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or "no git"
    except (OSError, subprocess.SubprocessError):
        commit = "no git"
    return {"commit": commit, "files": digest.hexdigest()[:12]}


def node_facts(data_locations: list[str], code_root: Path = REPOSITORY) -> dict:
    import torch

    return {"host": socket.gethostname(), "code": code_fingerprint(code_root),
            "data": data_fingerprints(data_locations), "gpus": torch.cuda.device_count(),
            "processes_per_node": int(os.environ.get("LOCAL_WORLD_SIZE", "1"))}


def data_locations(data_args) -> list[str]:
    found = []
    for name in DATA_FIELDS:
        value = getattr(data_args, name, None)
        found += [value] if isinstance(value, str) else list(value or [])
    return found


def _first_difference(seen: dict, reference: dict, rank: int) -> str:
    """The first file that differs, as `name: SIZE:HASH on rank R, SIZE:HASH on rank 0`."""
    for name in sorted(set(seen) | set(reference)):
        if seen.get(name) != reference.get(name):
            return f"{name}: {seen.get(name, 'missing')} on rank {rank}, {reference.get(name, 'missing')} on rank 0"
    return "same files"


def compare_facts(facts: list[dict]) -> list[str]:
    """What differs from rank 0, one line per rank and fact (empty when every rank agrees)."""
    reference, problems = facts[0], []
    for rank, seen in enumerate(facts[1:], start=1):
        where = f"rank {rank} ({seen['host']})"
        if seen["code"]["files"] != reference["code"]["files"]:
            problems.append(f"code: {where} has commit {seen['code']['commit']}, files {seen['code']['files']}; "
                            f"rank 0 ({reference['host']}) has {reference['code']['commit']}, files "
                            f"{reference['code']['files']}")
        if seen["data"] != reference["data"]:
            problems.append(f"data: {where} sees other data than rank 0 ({reference['host']}): "
                            f"{_first_difference(seen['data'], reference['data'], rank)}")
        for key, what in (("gpus", "GPUs"), ("processes_per_node", "processes per node")):
            if seen[key] != reference[key]:
                problems.append(f"{what}: {where} has {seen[key]}, rank 0 ({reference['host']}) {reference[key]}")
    return problems


def check_nodes_agree(training_args, data_args=None, code_root: Path = REPOSITORY):
    """Run on every rank after the process group exists and before the data is prepared or the model built.
    Raises the same UserError on every rank when a rank sees other code, data or GPU count than rank 0."""
    import torch.distributed as dist

    if training_args.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return
    facts = node_facts(data_locations(data_args) if data_args is not None else [], code_root)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, facts)
    problems = compare_facts(gathered)
    if problems:
        raise UserError("the nodes of this job disagree, so it stops before training:\n  " + "\n  ".join(problems)
                        + "\nGive every node the same checkout (git commit), the same prepared data (copy it again "
                          "or use a shared filesystem) and the same GPUs, then start the job again")
    if training_args.process_index == 0:
        hosts = sorted({seen["host"] for seen in gathered})
        logger.info("preflight: %d processes on %d node(s) (%s) see the same code (%s), data (%d files) and GPUs "
                    "per node (%d)", len(gathered), len(hosts), ", ".join(hosts), facts["code"]["commit"],
                    len(facts["data"]), facts["gpus"])

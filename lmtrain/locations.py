"""Where a model, tokenizer or adapter comes from: a local directory or a Hugging Face hub name; and the one
parser for --dtype spellings.

transformers treats every name that is not an existing directory as a hub repository, so a mistyped path
(`outputs/nope`, or `outputs/demo/sft` run from another directory) turns into dozens of lines of
tracebacks about the hub, after a minute of retries when offline mode is not set. Here a name that can only
be a path is checked locally and never reaches the hub; a name that looks like a hub repository is loaded
from the hub, and a failure there is one message.
"""
from __future__ import annotations

import os
from pathlib import Path

from lmtrain.errors import UserError, first_line

# What makes a directory a model, a tokenizer or a LoRA adapter (any one of the files is enough).
MODEL_FILES = ("config.json",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")
ADAPTER_FILES = ("adapter_config.json",)
# Hub repository names may contain dots (Qwen/Qwen2.5-0.5B), so only these endings mark a file path.
FILE_SUFFIXES = {".json", ".jsonl", ".yaml", ".yml", ".txt", ".bin", ".safetensors", ".pt", ".pth", ".model",
                 ".gguf", ".py", ".parquet", ".csv"}


def looks_local(name: str) -> bool:
    """True when `name` can only be meant as a path on this machine.

    A hub name is `repo` or `org/repo`. A path is anything else: more than one slash, a leading '.', '/' or
    '~', a file suffix, a backslash on Windows, or `dir/x` whose first part is a directory here (`outputs/nope`
    next to an `outputs/` folder is a mistyped run directory, not the hub organisation "outputs")."""
    if os.path.exists(os.path.expanduser(name)):
        return True
    if name.startswith((".", "/", "~")) or (os.sep != "/" and os.sep in name):
        return True
    if name.count("/") > 1 or name.endswith("/") or Path(name).suffix.lower() in FILE_SUFFIXES:
        return True
    first = name.split("/")[0]
    return "/" in name and os.path.isdir(first)


def _contents_hint(path: Path) -> str:
    """What a directory holds instead, when that tells the user which path they meant."""
    checkpoints = sorted(p.name for p in path.glob("checkpoint-*") if (p / "config.json").exists())
    if checkpoints:
        return f" (it holds {', '.join(checkpoints[-3:])}: pass one of those, or wait for the run to save its model)"
    if any((path / f).exists() for f in ADAPTER_FILES):
        return " (it is a LoRA adapter: give its base model as --model and the adapter as --adapter)"
    models = sorted(p.name for p in path.iterdir() if p.is_dir() and (p / "config.json").exists())[:5]
    return f" (model directories inside it: {', '.join(models)})" if models else ""


def check_location(name: str, what: str = "--model", needs: tuple[str, ...] = MODEL_FILES,
                   kind: str = "model") -> str:
    """Refuse a local-looking `name` that is not a directory with one of `needs`; return the name to load.

    Hub-looking names pass unchecked (unless offline mode is set and the hub cache lacks them); loading them
    goes through `load_from` so a failure is one message."""
    if name is None or not str(name).strip():
        raise UserError(f"{what} is empty: give a {kind} directory or a hub name")
    name = str(name)
    path = Path(os.path.expanduser(name))
    if looks_local(name):
        if not path.exists():
            where = "" if path.is_absolute() else f" (relative to the working directory {os.getcwd()})"
            thing = "file or directory" if path.suffix.lower() in FILE_SUFFIXES else "directory"
            raise UserError(f"{what}: no such {thing}: {name}{where}")
        if not path.is_dir():
            raise UserError(f"{what}: {name} is a file, not a {kind} directory")
        if not any((path / f).exists() for f in needs):
            files = " or ".join(needs[:2]) + (" or ..." if len(needs) > 2 else "")
            raise UserError(f"{what}: {name} has no {files}: not a {kind} directory{_contents_hint(path)}")
        return str(path)
    if _offline() and not _in_hub_cache(name, needs):
        raise UserError(f"{what}: no such directory: {name}, and offline mode (HF_HUB_OFFLINE) is set and the "
                        f"Hugging Face cache does not hold '{name}': give the {kind}'s local directory, or "
                        f"download it first (`hf download {name}`)")
    return name


def check_output_directory(output_dir: str, what: str = "--output_dir") -> Path:
    """Refuse, before any work, an output directory that is a file or lies under one (writing into it would
    fail later with a traceback, or save_pretrained would only log an error). It is created later if missing."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {output_dir} is a file: give a directory (it is created if missing)")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UserError(f"{what} {output_dir}: {parent} is a file, so the directory cannot be created")
    return path


def check_model_location(name: str, what: str = "--model") -> str:
    return check_location(name, what, MODEL_FILES, "model")


def check_tokenizer_location(name: str, what: str = "--tokenizer_name") -> str:
    return check_location(name, what, TOKENIZER_FILES, "tokenizer")


def check_adapter_location(name: str, what: str = "--adapter") -> str:
    return check_location(name, what, ADAPTER_FILES, "LoRA adapter")


def load_from(loader, name: str, what: str = "--model", *args, needs: tuple[str, ...] = MODEL_FILES,
              kind: str = "model", **kwargs):
    """`loader(name, *args, **kwargs)` (e.g. `AutoConfig.from_pretrained`) after `check_location`; a failed
    hub download or a broken directory becomes one UserError instead of chained tracebacks."""
    name = check_location(name, what, needs, kind)
    unreachable = None if kwargs.get("local_files_only") else hub_unreachable_for(name)
    if unreachable:
        kwargs["local_files_only"] = True
    try:
        return loader(name, *args, **kwargs)
    except OSError as error:  # transformers reports hub and file problems as OSError (EnvironmentError)
        first = first_line(error)
        if looks_local(name):
            raise UserError(f"{what}: could not load the {kind} in {name}: {first}") from error
        if unreachable:
            raise UserError(f"{what}: no such directory: {name}, and could not load '{name}' from the hub: it "
                            f"cannot be reached from here ({unreachable}) and the Hugging Face cache does not "
                            f"hold it") from error
        raise UserError(f"{what}: no such directory: {name}, and could not load '{name}' from the hub "
                        f"(offline?): {first}") from error


def hub_unreachable_for(name: str) -> str | None:
    """Why the hub cannot be reached for `name`, or None: it is local, offline mode is set, or the hub answers.
    huggingface_hub retries an unreachable hub for about a minute per file (retry warnings included) before
    falling back to its cache; one quick connection attempt decides whether to go straight to the cache."""
    if looks_local(name) or _offline():
        return None
    return _hub_unreachable()


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the hub endpoint cannot be reached (name resolution or connection), or None when it can, or when
    a proxy is configured (then only the real request can tell)."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                                        "all_proxy")):
        return None
    try:
        from huggingface_hub import constants

        endpoint = urlparse(constants.ENDPOINT)
    except Exception:  # pragma: no cover - an unusual huggingface_hub: let the real request decide
        return None
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return None
    except OSError as error:
        return f"{endpoint.scheme}://{endpoint.netloc}: {error.strerror or error}"


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _in_hub_cache(name: str, needs: tuple[str, ...]) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return True
    try:
        return any(isinstance(try_to_load_from_cache(name, f), str) for f in needs)
    except Exception:  # an invalid repo id, or an unusual cache: let the real loader decide
        return True


DTYPE_SPELLINGS = {"auto": "auto", "bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16",
                   "float16": "float16", "half": "float16", "fp32": "float32", "float32": "float32",
                   "float": "float32"}


def parse_dtype(text: str | None, what: str = "--dtype", allow_auto: bool = True):
    """'bf16' / 'bfloat16', 'fp16' / 'float16' / 'half', 'fp32' / 'float32' / 'float' -> a torch.dtype;
    'auto' (keep the dtype the weights were saved in) -> "auto"."""
    import torch

    key = str(text if text is not None else "auto").strip().lower().removeprefix("torch.")
    canonical = DTYPE_SPELLINGS.get(key)
    if canonical is None or (canonical == "auto" and not allow_auto):
        choices = [s for s in DTYPE_SPELLINGS if allow_auto or s != "auto"]
        raise UserError(f"{what} {text!r} is not a dtype: use one of {', '.join(choices)}")
    return "auto" if canonical == "auto" else getattr(torch, canonical)

"""Loading helpers shared by sample.py and app.py: the bundled default model, --model checks, device and dtype, and
loading a TTT-Video pipeline (or a stock CogVideoX one plus a TTT adapter). Errors are one line each: UsageError for
flags (exit 2), InputError for a model that cannot be loaded (exit 1)."""

from __future__ import annotations

import argparse
import json
import os
import struct
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "default"
DTYPES = ("auto", "float32", "bfloat16", "float16")


class UsageError(Exception):
    """Bad flags or a missing model: reported in one line, exit code 2."""


class InputError(Exception):
    """A model or adapter that cannot be loaded: reported in one line, exit code 1."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage block
        raise UsageError(f"{message} (see --help)")


def default_model(path: str | os.PathLike = DEFAULT_MODEL) -> str:
    """The bundled models/default/ (the --model default), or a UsageError saying how to get it."""
    if not Path(path).is_dir():
        raise UsageError(f"the default model is missing: no folder {path}; restore it with `git checkout "
                         "models/default`, retrain it with `bash scripts/train_default_model.sh`, or pass --model "
                         "<pipeline directory or hub id>")
    return str(path)


def check_model_path(model: str) -> None:
    """A local directory must exist and hold a pipeline with every component that model_index.json names; "owner/name"
    may be a hub id unless "owner" is a local folder (then a missing "name" is a typo here, not something to look for
    on the hub). With HF_HUB_OFFLINE set, a hub id must be in the local cache: said in one line, without the
    download attempts and retries of from_pretrained."""
    path = Path(model).expanduser()
    local_parent = model.count("/") == 1 and path.parent.is_dir()
    if path.exists() or local_parent or model.startswith((".", "/", "~")) or model.count("/") != 1:
        if not path.is_dir():
            raise UsageError(f"--model: no such directory: {model}")
        if not (path / "model_index.json").is_file():
            raise InputError(f"--model {model}: no pipeline there (no model_index.json; save one with "
                             "TTTVideoPipeline.save_pretrained)")
        problem = missing_component(path)
        if problem:
            raise InputError(f"--model {model}: {problem}")
        return
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(model, "model_index.json"), str):
        raise InputError(f"--model {model}: not available offline (HF_HUB_OFFLINE is set and the hub id is not in the "
                         "local Hugging Face cache); download it first or pass a local pipeline directory")


_CONFIG_FILES = ("config.json", "scheduler_config.json", "tokenizer_config.json", "tokenizer.json")
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json",
                    "packaged_weights.json")  # the last: pipeline/packaged_text_encoder.py


def missing_component(path: Path) -> str | None:
    """What a saved pipeline directory lacks, in one line, or None: every component model_index.json names needs its
    subfolder with a config, a model (a folder with config.json) needs weights, and a .safetensors file must be as
    long as its header says (a cut-off copy or download). Cheap: reads only file names and headers."""
    try:
        index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"model_index.json is not valid JSON ({first_line(e)})"
    if not isinstance(index, dict):
        return "model_index.json: expected an object naming the pipeline's components"
    for name, value in index.items():
        if name.startswith("_") or not (isinstance(value, (list, tuple)) and len(value) == 2 and all(value)):
            continue  # config entries (fps, ...) and components saved as None
        folder = path / name
        what = f"the {name} component ({value[1]} in model_index.json)"
        if not folder.is_dir():
            return f"{what} is missing: no folder {name}/"
        if not any((folder / config).is_file() for config in _CONFIG_FILES):
            return f"{what} is incomplete: no config in {name}/ (expected one of {', '.join(_CONFIG_FILES)})"
        if not (folder / "config.json").is_file():
            continue  # a scheduler or a tokenizer: no weights
        weights = sorted(f for pattern in _WEIGHT_PATTERNS for f in folder.glob(pattern) if f.is_file())
        if not weights:
            return f"{what} has no weights: no .safetensors or .bin file in {name}/"
        for file in weights:
            if file.name.endswith(".safetensors"):
                problem = _safetensors_problem(file)
                if problem:
                    return f"{name}/{file.name}: {problem}"
    return None


def _safetensors_problem(file: Path) -> str | None:
    """None when the file is as long as its header says; else what is wrong (safetensors: an 8-byte little-endian
    header length, a JSON header with each tensor's data_offsets, then the data)."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"not a safetensors file ({size} bytes)"
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            return f"cut off: {size} bytes, shorter than its header says"
        try:
            header = json.loads(f.read(header_len))
            end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError):
            return "not a safetensors file (unreadable header)"
    if 8 + header_len + end > size:
        return f"cut off: {size} bytes, its header says {8 + header_len + end}"
    return None


def resolve_device(device: str | None, dtype: str = "auto", offload: bool = False):
    """(torch.device, torch.dtype) from --device / --dtype / --offload; auto: bfloat16 on a GPU, float32 on a CPU."""
    import torch

    try:
        resolved = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UsageError(f"--device: unknown device {device!r}; expected e.g. cpu, cuda or cuda:1") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is available")
    if offload and resolved.type == "cpu":
        raise UsageError("--offload moves models between the CPU and a GPU; it needs a CUDA --device")
    name = dtype if dtype != "auto" else ("bfloat16" if resolved.type == "cuda" else "float32")
    return resolved, getattr(torch, name)


def cpu_threads(cores: int, load: float, current: int) -> int:
    """Threads for sampling on the CPU: torch's own count (`current`, one per core) less one for every core that other
    jobs keep busy (`load`, rounded), at least 1. Each of the many small operations of a denoising step waits for all
    of its threads, so a thread that shares its core with another job stalls the step: on 2 cores beside one busy
    training process, `python sample.py` took 448 s with 2 threads and 51 s with 1 (docs/performance.md)."""
    return max(1, min(current, cores - round(load)))


def busy_cores(before: str, after: str) -> float:
    """How many cores were busy between two readings of /proc/stat: the share of the machine's CPU time (its first
    line, "cpu user nice system idle iowait irq softirq steal ...") not spent idle or waiting for I/O, times the
    number of cores (its "cpuN" lines). Guest time is already inside user and nice, so only the first eight count."""
    def times(stat: str) -> tuple[list[int], int]:
        lines = stat.splitlines()
        fields = lines[0].split()
        if fields[0] != "cpu" or len(fields) < 9:
            raise ValueError(f"/proc/stat: expected a first line 'cpu <8 or more times>', got {lines[0]!r}")
        cores = sum(1 for line in lines[1:] if line.startswith("cpu") and line[3:4].isdigit())
        return [int(f) for f in fields[1:9]], cores

    (t0, cores), (t1, _) = times(before), times(after)
    delta = [b - a for a, b in zip(t0, t1)]
    total = sum(delta)
    return 0.0 if total <= 0 else cores * (total - delta[3] - delta[4]) / total


def current_load(interval: float = 0.3, stat: str | os.PathLike = "/proc/stat") -> float | None:
    """Cores other jobs keep busy now: `busy_cores` over `interval` seconds while this process sleeps, or where
    /proc/stat is missing the 1-minute load average (which lags: just after a job ends it still counts it), or None."""
    import time

    stat = Path(stat)
    try:
        before = stat.read_text()
        time.sleep(interval)
        return busy_cores(before, stat.read_text())
    except (OSError, ValueError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def fit_cpu_threads() -> int | None:
    """Sets torch's thread count by `cpu_threads` from this machine's free cores, unless OMP_NUM_THREADS chose it;
    returns the new count where it lowered it, else None."""
    import torch

    if "OMP_NUM_THREADS" in os.environ or (load := current_load()) is None:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    current = torch.get_num_threads()
    threads = cpu_threads(cores, load, current)
    if threads >= current:
        return None
    torch.set_num_threads(threads)
    return threads


def load_pipeline(model: str, adapter: Path | None, dtype):
    """A TTTVideoPipeline from a saved TTT-Video folder (plus an optional adapter), or from a stock CogVideoX
    pipeline and a TTT adapter; InputError / UsageError in one line otherwise."""
    from .pipeline_ttt_video import TTTVideoPipeline

    try:
        index = TTTVideoPipeline.load_config(model)  # reads a TTT-Video folder's class entry as "TTTVideoPipeline"
    except OSError as e:
        raise InputError(f"--model {model}: no pipeline there ({first_line(e)})") from None
    if index.get("_class_name") == TTTVideoPipeline.__name__:
        pipe = TTTVideoPipeline.from_pretrained(model, dtype=dtype)
        if adapter is not None:
            pipe.transformer.load_adapter(adapter)
        return pipe
    if adapter is None:
        raise UsageError(f"--model {model} is a {index.get('_class_name')}, not a TTT-Video pipeline; pass "
                         "--ttt-adapter to add trained TTT layers to it")
    return TTTVideoPipeline.from_cogvideox(model, ttt_adapter=adapter, dtype=dtype)


def first_line(error: Exception) -> str:
    """The first line of an exception's message (library errors can run to pages)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__

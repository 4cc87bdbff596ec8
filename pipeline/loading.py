"""Loading helpers shared by sample.py and app.py: the bundled default model, --model checks, device and dtype, and
loading a TTT-Video pipeline (or a stock CogVideoX one plus a TTT adapter). Errors are one line each: UsageError for
flags (exit 2), InputError for a model that cannot be loaded (exit 1)."""

from __future__ import annotations

import argparse
import os
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
    """A local directory must exist and hold a pipeline; "owner/name" may be a hub id unless "owner" is a local
    folder (then a missing "name" is a typo here, not something to look for on the hub)."""
    path = Path(model).expanduser()
    local_parent = model.count("/") == 1 and path.parent.is_dir()
    if path.exists() or local_parent or model.startswith((".", "/", "~")) or model.count("/") != 1:
        if not path.is_dir():
            raise UsageError(f"--model: no such directory: {model}")
        if not (path / "model_index.json").is_file():
            raise InputError(f"--model {model}: no pipeline there (no model_index.json; save one with "
                             "TTTVideoPipeline.save_pretrained)")


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

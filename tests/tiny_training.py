"""A tiny pipeline directory and a tiny video dataset for training tests and the debug config.

    python tests/tiny_training.py outputs/debug    # writes outputs/debug/pipeline and outputs/debug/dataset

configs/debug.yaml reads exactly these paths. The pipeline is a stock diffusers CogVideoXPipeline of the random
components in tests/tiny.py, saved with save_pretrained (so training loads it through the real from_pretrained).
The dataset's videos are written with PyAV at 8 fps, 48x64 pixels: moving coloured squares over a background that
changes at every scene cut, so the model fps (4), the resize/crop and scene boundaries are all exercised.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import numpy as np
from diffusers import CogVideoXPipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when run as a script
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny import tiny_components  # noqa: E402

from models import CogVideoXTTTTransformer3DModel  # noqa: E402
from pipeline.data import SEGMENT_SECONDS, SegmentInfo, VideoRecord, write_metadata  # noqa: E402
from pipeline.training.components import prepare_transformer, register_builder  # noqa: E402
from pipeline.training.config import ModelConfig, TrainConfig  # noqa: E402
from pipeline.video_io import write_video  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "debug.yaml"
SOURCE_FPS = 8
SOURCE_HEIGHT, SOURCE_WIDTH = 48, 64
# (segments, indices of segments that open a new scene) per video
DEFAULT_VIDEOS = ((3, (2,)), (2, ()), (4, (1, 3)))
TEXTS = ("a red square slides to the right", "a green square falls", "a blue square circles the centre",
         "two squares meet in the middle")


def save_tiny_pipeline(path: str | Path, seed: int = 0) -> Path:
    """The tiny stock CogVideoX pipeline (tokenizer, T5, VAE, transformer, DDIM scheduler) saved to `path`."""
    CogVideoXPipeline(**tiny_components(seed)).save_pretrained(path)
    return Path(path)


def render_video(num_segments: int, cuts: tuple[int, ...], seed: int) -> np.ndarray:
    """(F, H, W, 3) uint8 frames of a test video: num_segments x 3 s at SOURCE_FPS."""
    rng = np.random.default_rng(seed)
    frames = []
    background = rng.integers(0, 255, 3)
    per_segment = round(SOURCE_FPS * SEGMENT_SECONDS)
    for segment in range(num_segments):
        if segment in cuts:
            background = rng.integers(0, 255, 3)
        colour = rng.integers(0, 255, 3)
        for i in range(per_segment):
            frame = np.empty((SOURCE_HEIGHT, SOURCE_WIDTH, 3), dtype=np.uint8)
            frame[:] = background
            x = (4 * (segment * per_segment + i)) % (SOURCE_WIDTH - 12)
            frame[16:28, x:x + 12] = colour
            frames.append(frame)
    return np.stack(frames)


def write_tiny_dataset(root: str | Path, videos=DEFAULT_VIDEOS, seed: int = 0) -> list[VideoRecord]:
    """mp4 files plus metadata.jsonl in the dataset format (docs/dataset.md)."""
    root = Path(root)
    records = []
    for v, (num_segments, cuts) in enumerate(videos):
        name = f"clips/video{v}.mp4"
        write_video(render_video(num_segments, cuts, seed + v), root / name, SOURCE_FPS)
        segments = tuple(SegmentInfo(start=s * SEGMENT_SECONDS, text=TEXTS[(v + s) % len(TEXTS)],
                                     scene_start=s in cuts) for s in range(num_segments))
        records.append(VideoRecord(video=name, fps=SOURCE_FPS, segments=segments))
    write_metadata(root, records)
    return records


@register_builder("tiny")
def build_tiny(model: ModelConfig, train: TrainConfig, parts) -> dict:
    """Components made from scratch in code (tests/tiny.py, seed `model.builder_args.seed`), no directory: the
    from-scratch builder path (`model.builder=tiny_training:tiny`). Same weights as `save_tiny_pipeline`."""
    components = tiny_components(model.builder_args.get("seed", 0))
    out = {name: components[name] for name in parts if name != "transformer"}
    if "transformer" in parts:
        ttt = CogVideoXTTTTransformer3DModel.from_base(components["transformer"], **dataclasses.asdict(model.ttt))
        out["transformer"] = prepare_transformer(ttt, train)
    return out


def debug_overrides(base: str | Path) -> list[str]:
    """configs/debug.yaml overrides that point it at a tiny pipeline/dataset/cache under `base`."""
    base = Path(base)
    return [f"model.pretrained={base / 'pipeline'}", f"data.root={base / 'dataset'}", f"data.cache={base / 'cache'}",
            f"output_dir={base / 'run'}"]


def cpu_launch(processes: int) -> tuple[list[str], dict[str, str]]:
    """Command prefix and environment for `accelerate launch` of `processes` CPU processes over gloo.

    `accelerate launch --cpu --num_processes N` starts a single process unless MPI is installed (its CPU launcher is
    mpirun); Accelerate's torchrun launcher (--multi_gpu) with ACCELERATE_USE_CPU=true starts N CPU processes.
    """
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return command, {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}


_PREPARED: dict[str, Path] = {}


def prepared(base: str | Path) -> Path:
    """Tiny pipeline + dataset + precomputed float32 cache under `base`, made once per test session (later calls
    return the first base); tests that change files work on copies."""
    if "base" not in _PREPARED:
        import torch
        from accelerate import Accelerator

        from pipeline.data.precompute import precompute
        from pipeline.training.config import load_config

        base = Path(base)
        save_tiny_pipeline(base / "pipeline")
        write_tiny_dataset(base / "dataset")
        cfg = load_config(CONFIG, debug_overrides(base))
        precompute(cfg, torch.float32, Accelerator(cpu=True))
        _PREPARED["base"] = base
    return _PREPARED["base"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder to write pipeline/ and dataset/ into")
    args = parser.parse_args()
    save_tiny_pipeline(Path(args.out) / "pipeline")
    write_tiny_dataset(Path(args.out) / "dataset")
    print(f"wrote {args.out}/pipeline and {args.out}/dataset")


if __name__ == "__main__":
    main()

"""How far a model's prediction moves with its texts, on the same noisy training windows.

    python benchmarks/text_dependence.py MODEL [MODEL ...] [--windows 48] [--segments 5] [--t-min 600]
        [--root outputs/toy/dataset --cache outputs/toy/cache --told-cache outputs/toy/cache-dense]

Each MODEL is an exported pipeline directory (a train.py `final/`). Every model sees the same windows of `--segments`
segments from the dataset (drawn by --seed), each at one noise level in [t_min, 1000), with the same noise, and
predicts v three times: from the cache's texts (the story register), from the told cache's (the dense register,
which tells every look) and from the null text. The table gives the mean squared difference of those predictions:
story against null on segment 1 and on segments 2..n (how much the texts count), and story against told on segments
2..n (how far the prediction without the look told is from the one with it); and story against the first MODEL's told
prediction on segments 2..n, the target of a told term with a frozen teacher (train.told_teacher "initial") when the
first MODEL is the run's start. A term that pulls the story prediction toward the model's own told one
(train.told_weight) can close that distance by heeding the texts less, which the first two columns show
(docs/results.md, "A training term toward the told prediction").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COLUMNS = ("story - null, segment 1", "story - null, segments 2-n", "story - told, segments 2-n",
           "story - first model's told, segments 2-n")


def windows(root: Path, cache: Path, told_cache: Path, segments: int, count: int, t_min: int, seed: int,
            batch_size: int = 4) -> tuple[list[dict], torch.Tensor, torch.Tensor]:
    """`count` windows of the dataset, drawn by `seed`, noised at one level each in [t_min, 1000), in batches that
    carry the told texts (told_text, told_text_mask); and the cache's null text and mask."""
    from pipeline.data import SequenceDataset
    from pipeline.training.config import NoiseConfig
    from pipeline.training.loss import DiffusionCollate

    dataset = SequenceDataset(root, cache, segments, 1, 0.0, told_cache=told_cache)
    if count > len(dataset):
        raise ValueError(f"--windows: the dataset has {len(dataset)} windows of {segments} segments, asked for {count}")
    collate = DiffusionCollate(1000, dataset.scaling_factor, NoiseConfig(t_min=t_min))
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count].tolist()
    batches = [collate([dataset[(i, seed + i)] for i in chosen[k:k + batch_size]])
               for k in range(0, count, batch_size)]
    return batches, dataset.null_text, dataset.null_mask


@torch.no_grad()
def text_dependence(model: torch.nn.Module, scheduler, batches: list[dict], null_text: torch.Tensor,
                    null_mask: torch.Tensor, reference: list[torch.Tensor] | None = None
                    ) -> tuple[dict[str, float], list[torch.Tensor]]:
    """The mean squared differences of COLUMNS (over each window's elements, then over the windows of `batches`), the
    last against `reference`, told predictions per batch (None: the model's own); and the model's told predictions.
    `scheduler`: the model's training schedule (`training_scheduler`), which noises the windows as the loss does."""
    from pipeline.training.loss import predict_v

    first = model.config.latent_frames_first
    sums, count, tolds = torch.zeros(len(COLUMNS), dtype=torch.float64), 0, []
    for index, batch in enumerate(batches):
        story, told, null = (
            predict_v(model, scheduler, {**batch, "text": text, "text_mask": mask}).double()
            for text, mask in ((batch["text"], batch["text_mask"]), (batch["told_text"], batch["told_text_mask"]),
                               (null_text.expand_as(batch["text"]), null_mask.expand_as(batch["text_mask"]))))
        target = told if reference is None else reference[index]
        parts = ((story - null)[:, :first], (story - null)[:, first:], (story - told)[:, first:],
                 (story - target)[:, first:])
        sums += torch.stack([part.pow(2).flatten(1).mean(dim=1).sum() for part in parts])
        count += len(story)
        tolds.append(told)
    return dict(zip(COLUMNS, (sums / count).tolist(), strict=True)), tolds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="exported pipeline directories")
    p.add_argument("--root", type=Path, default=ROOT / "outputs" / "toy" / "dataset", help="the dataset")
    p.add_argument("--cache", type=Path, default=ROOT / "outputs" / "toy" / "cache", help="its story-text cache")
    p.add_argument("--told-cache", type=Path, default=ROOT / "outputs" / "toy" / "cache-dense",
                   help="its cache of texts that tell every look")
    p.add_argument("--windows", type=int, default=48)
    p.add_argument("--segments", type=int, default=5)
    p.add_argument("--t-min", type=int, default=600, help="noise levels from [t_min, 1000)")
    p.add_argument("--seed", type=int, default=7000)
    args = p.parse_args(argv)
    if args.windows < 1 or args.segments < 2 or not 0 <= args.t_min < 1000:
        p.error("expected --windows >= 1, --segments >= 2 and --t-min in [0, 1000)")
    for model in args.models:
        if not all((Path(model) / part / name).is_file() for part, name in (("transformer", "config.json"),
                                                                             ("scheduler", "scheduler_config.json"))):
            p.error(f"{model}: no exported pipeline (transformer/config.json, scheduler/scheduler_config.json) there")

    from diffusers import CogVideoXDDIMScheduler

    from models import CogVideoXTTTTransformer3DModel
    from pipeline.training.components import training_scheduler

    batches, null_text, null_mask = windows(args.root, args.cache, args.told_cache, args.segments, args.windows,
                                            args.t_min, args.seed)
    print(f"| model | {' | '.join(COLUMNS)} |\n|---|{'---|' * len(COLUMNS)}")
    reference = None
    for model in args.models:
        transformer = CogVideoXTTTTransformer3DModel.from_pretrained(Path(model) / "transformer").eval()
        scheduler = training_scheduler(CogVideoXDDIMScheduler.from_pretrained(Path(model) / "scheduler"))
        values, tolds = text_dependence(transformer, scheduler, batches, null_text, null_mask, reference)
        reference = tolds if reference is None else reference
        print(f"| {model} | " + " | ".join(f"{v:.4f}" for v in values.values()) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training metrics: when to log, what, and the stop on a non-finite loss (torchtitan's MetricsProcessor idea).

Losses and gradient norms stay on the device between logging steps and are read (`.item()`) only when
`should_log(step)`: no per-step host sync. A non-finite value is recorded on the device with its step and checked
(one gather) on logging, saving and validation steps.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)
METRICS_FILE = "metrics.jsonl"


class MetricLogger:
    """Scalars every `log.every` steps (and at `stop_at`) to Accelerate's trackers, output_dir/metrics.jsonl and a
    progress bar. `start`: the step the run continues from; metrics.jsonl lines after it (logged by a run that died
    before its next checkpoint) are dropped, so a resumed run's lines are not duplicated."""

    def __init__(self, accelerator: Accelerator, output_dir: str | Path, every: int, total: int, start: int,
                 stop_at: int):
        self.accelerator, self.every, self.stop_at = accelerator, every, stop_at
        self.path = Path(output_dir) / METRICS_FILE
        device = accelerator.device
        self.loss_sum = torch.zeros((), device=device)
        self.replay_sum = torch.zeros((), device=device)  # the loss of steps that replay single segments
        self.grad_norm: torch.Tensor | None = None
        # on segments 2..n (multi-segment runs): loss sum and frame count, then the loss mask's error sum and weight,
        # then the loss sum and frame count on the first frames of the segments that continue a scene, then the
        # distance from the told prediction and its frame count
        self.later = torch.zeros(8, device=device)
        self.first_bad_step = torch.full((), -1, device=device)
        self.items: dict[int, list[str]] = {}  # step -> the batch items seen since the last check (host only)
        self.steps, self.replay_steps, self.last_time = 0, 0, time.perf_counter()
        if accelerator.is_main_process:
            truncate_metrics(self.path, start)
        self.bar = tqdm(total=total, initial=start, desc="train", disable=not accelerator.is_local_main_process)

    def record(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | None, items: list[str],
               accumulation: int, later: tuple[torch.Tensor, torch.Tensor] | None = None,
               later_masked: tuple[torch.Tensor, torch.Tensor] | None = None, replay: bool = False,
               boundary: tuple[torch.Tensor, torch.Tensor] | None = None,
               told: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """One micro-batch of optimizer step `step` (1-based): its mean loss, the clipped-before norm on the
        synchronising micro-batch, the names of its items (for the non-finite stop), (sum, count) of its loss on
        the noisy frames of segments 2..n (`LossTerms.later_segments`), (sum, weight) of its mask-weighted error
        there (`LossTerms.later_masked`), whether the step replays single segments (data.replay: its loss is
        kept apart), and (sum, count) of its loss on the first frames of segments that continue a scene
        (`LossTerms.boundary`), and of its distance from the told prediction (`LossTerms.told`)."""
        if replay:
            self.replay_sum += loss.detach() / accumulation
        else:
            self.loss_sum += loss.detach() / accumulation
        if later is not None:
            self.later[:2] += torch.stack([later[0].detach().float(), later[1].float()])
        if later_masked is not None:
            self.later[2:4] += torch.stack([later_masked[0].detach().float(), later_masked[1].detach().float()])
        if boundary is not None:
            self.later[4:6] += torch.stack([boundary[0].detach().float(), boundary[1].float()])
        if told is not None:
            self.later[6:] += torch.stack([told[0].detach().float(), told[1].float()])
        if grad_norm is not None:
            self.grad_norm = grad_norm
        self.items.setdefault(step, []).extend(items)

    def step_done(self, step: int, replay: bool = False) -> None:
        total = self.loss_sum + self.replay_sum + (0.0 if self.grad_norm is None else self.grad_norm)
        self.first_bad_step = torch.where(~torch.isfinite(total) & (self.first_bad_step < 0), step,
                                          self.first_bad_step)
        self.steps += 1
        self.replay_steps += replay
        self.bar.update()

    def should_log(self, step: int) -> bool:
        return step % self.every == 0 or step == self.stop_at

    def stop_if_not_finite(self, last_checkpoint: Path | None) -> None:
        """Raise, naming the step, its batch's items and this run's last checkpoint, if any process saw a non-finite
        loss or gradient norm (nothing is logged, saved or sampled then)."""
        steps = self.accelerator.gather(self.first_bad_step[None])
        bad = int(steps[steps >= 0].min().item()) if (steps >= 0).any() else None
        items = gather_object([self.items.get(bad, [])]) if bad is not None else []
        self.items = {}
        if bad is None:
            return
        names = [name for per_process in items for name in per_process]
        self.close()  # the bar's last line before the message
        raise FloatingPointError(f"non-finite loss or gradient norm at step {bad} (batch items: {'; '.join(names)}); "
                                 f"stopping without saving (this run's last checkpoint: {last_checkpoint or 'none'})")

    def maybe_log(self, step: int, optimizer: torch.optim.Optimizer, model: torch.nn.Module | None = None
                  ) -> dict | None:
        """On logging steps: the mean loss (of the stage's sequences; loss/replay: of the steps that replayed
        single segments) and step time since the last log, the learning rates, the gradient norm, the loss on
        segments 2..n (loss/later_segments, multi-segment runs; loss/later_masked, its mask-weighted mean, with loss
        masks; loss/boundary, on the first frames of the segments that continue a scene; loss/told, the distance from
        the told prediction, with train.told_weight) and the mean |tanh(gate)| of the TTT gates on video tokens
        (ttt_gate/video), to the trackers, metrics.jsonl and the bar."""
        if not self.should_log(step):
            return None
        logs = {}
        for key, total, steps in (("loss", self.loss_sum, self.steps - self.replay_steps),
                                  ("loss/replay", self.replay_sum, self.replay_steps)):
            if steps:  # the same on every process: which steps replay depends on the step number only
                logs[key] = self.accelerator.reduce(total, reduction="mean").item() / steps
        seconds = (time.perf_counter() - self.last_time) / self.steps
        logs.update(step_time=seconds, **{f"lr/{g['name']}": g["lr"] for g in optimizer.param_groups})
        if self.grad_norm is not None:  # DeepSpeed clips inside its engine and reports no norm here
            logs["grad_norm"] = self.accelerator.reduce(self.grad_norm, reduction="mean").item()
        later = self.accelerator.reduce(self.later, reduction="sum")
        if later[1] > 0:
            logs["loss/later_segments"] = (later[0] / later[1]).item()
        if later[3] > 0:
            logs["loss/later_masked"] = (later[2] / later[3]).item()
        if later[5] > 0:
            logs["loss/boundary"] = (later[4] / later[5]).item()
        if later[7] > 0:
            logs["loss/told"] = (later[6] / later[7]).item()
        gate = video_gate_magnitude(model) if model is not None else None
        if gate is not None:
            logs["ttt_gate/video"] = gate
        self.accelerator.log(logs, step=step)
        if self.accelerator.is_main_process:  # the same numbers as plain text, for scripts and grep
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **logs}) + "\n")
        self.bar.set_postfix(loss=f"{logs.get('loss', logs.get('loss/replay')):.4g}", s_per_step=f"{seconds:.2f}")
        self.loss_sum.zero_()
        self.replay_sum.zero_()
        self.later.zero_()
        self.steps, self.replay_steps, self.last_time = 0, 0, time.perf_counter()
        return logs

    def close(self) -> None:
        self.bar.close()


def video_gate_magnitude(model: torch.nn.Module) -> float | None:
    """Mean |tanh(gate)| over the TTT gates on video tokens (forward and reverse, every block); None without TTT.

    How much of the TTT output reaches the video tokens: a run where it falls towards 0 has learned to ignore TTT.
    Sharded gates (FSDP2 DTensors) are gathered first, so every process must call this.
    """
    gates = [p.detach() for name, p in model.named_parameters()
             if name.endswith(("gate_forward_video", "gate_reverse_video"))]
    if not gates:
        return None
    gates = [g.full_tensor() if hasattr(g, "full_tensor") else g for g in gates]
    return torch.cat([g.float().flatten() for g in gates]).tanh().abs().mean().item()


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only the lines of metrics.jsonl up to `step` (the checkpoint a run continues from)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        path.write_text("".join(kept))
        logger.info("%s: dropped %d line(s) logged after step %d (the checkpoint resumed from)", path,
                    len(lines) - len(kept), step)

"""The context-parallel transformer on a CPU gloo mesh against one process: outputs and every gradient.

    torchrun --nproc_per_node 2 tests/cp_forward.py            # cp = 2, every case
    torchrun --nproc_per_node 4 tests/cp_forward.py CASE ...   # a (dp = 2, cp = 2) mesh, the named cases

Every rank builds the same seeded model and inputs, runs the single-process model on the whole batch and the
context-parallel copy on its segments, and checks (fp32) the gathered output, the input gradients and every parameter
gradient (summed over the group) against the single-process ones. With 4 processes the two data-parallel groups
take different inputs. Exits non-zero on the first mismatch.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from tiny import FRAMES_FIRST, FRAMES_PER_SEGMENT, LATENT_CHANNELS, TEXT_LEN, tiny_transformer  # noqa: E402

from models import CogVideoXTTTTransformer3DModel  # noqa: E402
from models.context_parallel import split_segments  # noqa: E402

CASES = {  # name: (segments, model config, gradient checkpointing); "per-segment" cases: timestep (B, n)
    "mlp-2-segments": (2, dict(ttt_type="mlp"), False),
    "mlp-3-segments-per-segment-timesteps": (3, dict(ttt_type="mlp"), False),
    "linear-3-segments-uneven-checkpointed-conv": (3, dict(ttt_type="linear", checkpoint_ttt=True, ttt_conv=3), True),
    "mlp-3-segments-no-overlap": (3, dict(ttt_type="mlp", overlap_frames=0), False),
    "mlp-5-segments": (5, dict(ttt_type="mlp", ttt_mini_batch_size=7), False),
    "mlp-5-segments-apart": (5, dict(ttt_type="mlp", ttt_mini_batch_size=7), False),  # inside ttt_segments_apart()
}


def build(config: dict) -> CogVideoXTTTTransformer3DModel:
    torch.manual_seed(0)
    model = CogVideoXTTTTransformer3DModel.from_base(
        tiny_transformer(), latent_frames_first=FRAMES_FIRST, latent_frames_per_segment=FRAMES_PER_SEGMENT,
        ttt_backend="torch", gate_init=0.5, **{"ttt_mini_batch_size": 16, **config})
    with torch.no_grad():  # every added path carries signal: scene embedding, larger inner weights
        model.scene_embedding.normal_(std=0.3)
        for block in model.transformer_blocks:
            for p in block.ttt.inner_weights:
                p.normal_(std=0.3)
            if block.ttt.conv is not None:  # each frame's convolution stays on the rank that holds the frame
                block.ttt.conv.weight.normal_(std=0.3)
    model.set_trainable("full")
    return model.train()


def inputs(n: int, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(n + 1000 * seed)
    frames = FRAMES_FIRST + (n - 1) * FRAMES_PER_SEGMENT
    mask = torch.ones(batch, n, TEXT_LEN, dtype=torch.bool)
    mask[:, :, TEXT_LEN // 2:] = torch.rand(batch, n, TEXT_LEN - TEXT_LEN // 2, generator=g) < 0.5  # text padding
    return dict(hidden_states=torch.randn(batch, frames, LATENT_CHANNELS, 4, 4, generator=g).requires_grad_(),
                encoder_hidden_states=torch.randn(batch, n, TEXT_LEN, 16, generator=g).requires_grad_(),
                timestep=torch.tensor([999, 17][:batch]), encoder_attention_mask=mask,
                scene_start=torch.rand(batch, n, generator=g) < 0.5)


def run(model, data: dict, weight: torch.Tensor):
    data = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in data.items()}
    out = model(**data).sample
    (out * weight).sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return out.detach(), grads, {k: v.grad for k, v in data.items() if v.requires_grad}


def check(name: str, got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def main() -> None:
    dist.init_process_group("gloo")
    cp = 2
    mesh = init_device_mesh("cpu", (dist.get_world_size() // cp, cp), mesh_dim_names=("dp", "cp"))
    dp_rank = mesh["dp"].get_local_rank()
    for case in sys.argv[1:] or CASES:
        n, config, checkpointing = CASES[case]
        reference = build(config)
        parallel = copy.deepcopy(reference)
        parallel.enable_context_parallel(mesh["cp"])
        if checkpointing:
            reference.enable_gradient_checkpointing()
            parallel.enable_gradient_checkpointing()
        data = inputs(n, seed=dp_rank)
        if "per-segment" in case:  # one level per segment, clean context included: every rank gets its own levels
            data["timestep"] = torch.tensor([[999, 0, 500], [17, 640, 0]])[:, :n]
        weight = torch.randn(data["hidden_states"].shape, generator=torch.Generator().manual_seed(99))

        apart = "segments-apart" in case
        with reference.ttt_segments_apart() if apart else contextlib.nullcontext():
            ref_out, ref_grads, ref_input_grads = run(reference, data, weight)
        with parallel.ttt_segments_apart() if apart else contextlib.nullcontext():
            out, grads, input_grads = run(parallel, data, weight)
        parallel.context_parallel.reduce_gradients(parallel.parameters())
        for g in input_grads.values():
            dist.all_reduce(g, group=mesh["cp"].get_group())

        check(f"{case} output", out, ref_out)
        for key, g in ref_input_grads.items():
            check(f"{case} grad of input {key}", input_grads[key], g)
        missing = [k for k, g in ref_grads.items() if g is None]
        assert not missing, f"{case}: parameters without a gradient in the reference: {missing[:5]}"
        for key, g in ref_grads.items():
            check(f"{case} grad of {key}", grads[key], g)
        shards = parallel.context_parallel.shard(parallel.segment_layout(n, 4, 4, torch.device("cpu")))[0]
        if dist.get_rank() == 0:
            print(f"cp ok: {case} on dp x cp = {mesh['dp'].size()} x {cp}: segments per rank "
                  f"{[len(s) for s in split_segments(n, cp)]}, "
                  f"tokens per rank {list(shards.forward.exchange.chunk_lengths)}, output and {len(ref_grads)} "
                  f"gradients agree "
                  f"(max output diff {(out - ref_out).abs().max().item():.2e})", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

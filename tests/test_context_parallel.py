"""Context parallelism (docs/training.md, "Context parallelism"): one sequence over P ranks, against one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny import FRAMES_FIRST, FRAMES_PER_SEGMENT, tiny_components
from tiny_training import CONFIG, cpu_launch, debug_overrides, prepared

from models import CogVideoXTTTTransformer3DModel
from models.context_parallel import check_heads, shard_layout, split_segments
from models.layout import segment_layout
from pipeline import TTTVideoPipeline
from pipeline.video_io import read_video

ROOT = Path(__file__).resolve().parents[1]


def torchrun(script: str, *args: str, processes: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), script,
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_forward_and_every_gradient_equal_one_process_on_2_ranks():
    """tests/cp_forward.py: fp32 output, input gradients and every parameter gradient within 1e-5 of one process;
    2 segments on 2 ranks, 3 on 2 with one noise level per segment (each rank's levels cut from the (B, n) timestep),
    3 on 2 (uneven, with checkpointing and the TTT input's spatial convolution), no overlap frame, 5 segments and a
    mini-batch (7) that does not divide the ranks' chunks, and the same with every segment's TTT apart (memory
    guidance's branch: each rank reads its own segments alone)."""
    result = torchrun("tests/cp_forward.py")
    assert result.returncode == 0, result.stderr[-4000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("cp ok")]
    assert len(lines) == 6, result.stdout
    assert "segments per rank [2, 1]" in result.stdout


def test_a_dp_2_by_cp_2_mesh_on_4_ranks():
    """Two data-parallel groups of two context-parallel ranks, each group its own inputs (3 segments, 2 + 1): the
    collectives stay inside each cp group (ranks 2 and 3 are cp ranks 0 and 1 of theirs)."""
    result = torchrun("tests/cp_forward.py", "linear-3-segments-uneven-checkpointed-conv", processes=4)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "cp ok: linear-3-segments-uneven-checkpointed-conv on dp x cp = 2 x 2" in result.stdout


def test_composes_with_fsdp2_per_block_wrapping():
    """tests/cp_fsdp_step.py: FSDP2 over the same 2 ranks, every block and TTT layer its own unit (the GPU configs'
    wrapping): loss, every gradient and every updated weight equal one process. The TTT layer is entered through
    its module call, so FSDP unshards its weights before the head-sharded scan."""
    result = torchrun("tests/cp_fsdp_step.py")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "cp+fsdp ok" in result.stdout


@pytest.mark.parametrize("n, world, expected", [(2, 2, [1, 1]), (3, 2, [2, 1]), (21, 8, [3] * 5 + [2] * 3)])
def test_segments_split_into_contiguous_runs(n, world, expected):
    runs = split_segments(n, world)
    assert [len(r) for r in runs] == expected
    assert [i for r in runs for i in r] == list(range(n))


def test_fewer_segments_than_ranks_is_refused():
    with pytest.raises(ValueError, match="needs at least 4 segments, got 3"):
        split_segments(3, 4)


def test_heads_must_divide_over_the_ranks():
    check_heads(48, 8)
    with pytest.raises(ValueError, match=r"ttt_num_heads \(3\) must be divisible by 2"):
        check_heads(3, 2)


@pytest.mark.parametrize("overlap", [0, 1])
@pytest.mark.parametrize("n, world", [(3, 2), (5, 3), (4, 4)])
def test_rank_chunks_tile_both_ttt_orders(n, world, overlap):
    """The ranks' chunks, mapped back to the whole sequence, are the interleaved order in rank order and the reverse
    order in reverse rank order; every rank's windows read only its own frames and its halo."""
    layout = segment_layout(n, 3, 2, overlap, 4, (2, 2), (2, 2), 16, 16)
    shards = [shard_layout(layout, None, r, world) for r in range(world)]
    hw, lt = layout.tokens_per_frame, layout.text_len

    def to_global(shard, local):
        text = shard.num_segments * lt
        return torch.where(local < text, local + shard.segments.start * lt,
                           n * lt + shard.frames.start * hw + (local - text))

    forward = torch.cat([to_global(s, s.forward.index) for s in shards])
    reverse = torch.cat([to_global(s, s.reverse.index) for s in shards[::-1]])
    assert torch.equal(forward, layout.forward.index) and torch.equal(reverse, layout.reverse.index)
    for s in shards:
        assert torch.equal(s.forward.index[s.forward.inverse], torch.arange(len(s.forward.index)))
        assert s.forward.exchange.chunk_lengths[s.rank] == len(s.forward.index) == len(s.reverse.index)
        assert not s.forward.exchange.reverse and s.reverse.exchange.reverse
        # the rank's rows of the whole window table, seen through the local [halo, own frames] video
        local = s.window_tokens.view(s.num_segments, -1).flatten()[s.window_valid] // hw - overlap
        whole = layout.window_tokens.view(n, -1)[s.segments.start:s.segments.stop].flatten()
        valid = torch.zeros(layout.window_tokens.numel(), dtype=torch.bool)
        valid[layout.window_valid] = True
        whole = whole[valid.view(n, -1)[s.segments.start:s.segments.stop].flatten()] // hw
        assert torch.equal(local + s.frames.start, whole)


# train.py with parallel.context


def train(base: Path, out: Path, processes: int, *overrides: str) -> subprocess.CompletedProcess:
    args = ["train.py", "--config", str(CONFIG), *debug_overrides(base), f"output_dir={out}", "train.steps=1",
            "log.every=1", "checkpoint.every=0", "validation.every=0", *overrides]
    if processes == 1:
        command, env = [sys.executable, *args], {**os.environ, "OMP_NUM_THREADS": "1"}
    else:
        launch, env = cpu_launch(processes)
        command = [*launch, *args]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr[-4000:]}"
    return result


def test_a_training_step_with_context_parallel_2_equals_one_process(tmp_path_factory):
    """dp = 1, cp = 2: both ranks read the same two samples (global batch 2, accumulation 2), each runs its segment,
    and loss, gradient norm and every trained weight after the step equal the one-process run's."""
    base = prepared(tmp_path_factory.mktemp("tiny"))
    tmp = tmp_path_factory.mktemp("cp-train")
    train(base, tmp / "one", 1)
    two = train(base, tmp / "cp", 2, "parallel.context=2")
    assert "global batch 2 = 1 per process x 2 accumulation x 1 processes (x 2 context-parallel" in two.stderr
    one, cp = (json.loads((tmp / name / "metrics.jsonl").read_text().splitlines()[0]) for name in ("one", "cp"))
    assert cp["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert cp["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
    a = load_file(tmp / "one" / "final" / "transformer" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp / "cp" / "final" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:  # Adam's first step is ~lr * sign(grad): rounding may move a weight whose gradient is ~0
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_context_size_must_divide_the_processes():
    result = subprocess.run([sys.executable, "train.py", "--config", str(CONFIG), "parallel.context=2"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "parallel.context=2 must be >= 1 and divide the process count (1)" in result.stderr


# sample.py --context-parallel


def test_sampling_with_context_parallel_2_writes_the_frames_of_one_process(tmp_path):
    """3 segments on 2 ranks (2 + 1): rank 0 alone writes the video, and the frames it encodes equal the one-process
    frames within 1/255 (tests/sample_frames.py keeps them: H.264 itself does not reproduce bit for bit here)."""
    components = tiny_components()
    transformer = CogVideoXTTTTransformer3DModel.from_base(
        components.pop("transformer"), latent_frames_first=FRAMES_FIRST, latent_frames_per_segment=FRAMES_PER_SEGMENT,
        ttt_backend="torch", gate_init=0.5)
    TTTVideoPipeline(transformer=transformer, **components).save_pretrained(tmp_path / "pipeline")
    story = tmp_path / "story.txt"
    story.write_text("a red ball rolls\n\na blue box\n\na green cone\n")
    args = ["--model", str(tmp_path / "pipeline"), "--storyboard", str(story), "--steps", "2", "--seed", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "tests/sample_frames.py", str(tmp_path / "one.npy"), *args, "--output",
                          str(tmp_path / "one.mp4")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert one.returncode == 0, one.stderr[-4000:]
    cp = torchrun("tests/sample_frames.py", str(tmp_path / "cp.npy"), *args, "--output", str(tmp_path / "cp.mp4"),
                  "--context-parallel", "2")
    assert cp.returncode == 0, cp.stderr[-4000:]
    assert cp.stdout.count("wrote ") == 1 and "(3 segments)" in cp.stdout
    frames, fps = read_video(tmp_path / "cp.mp4")
    expected, got = np.load(tmp_path / "one.npy"), np.load(tmp_path / "cp.npy")
    assert frames.shape == expected.shape == got.shape == (25, 32, 32, 3) and fps == pytest.approx(8 / 3, rel=1e-3)
    assert np.abs(got - expected).max() <= 1 / 255


def test_sampling_with_context_parallel_needs_torchrun(tmp_path):
    story = tmp_path / "story.txt"
    story.write_text("a red ball rolls\n\na blue box\n")
    result = subprocess.run([sys.executable, "sample.py", "--storyboard", str(story), "--context-parallel", "2"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--context-parallel 2 needs 2 processes started by torchrun" in result.stderr

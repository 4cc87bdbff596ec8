"""Loading a saved TTT-Video pipeline the way a diffusers user does: `DiffusionPipeline.from_pretrained(folder,
trust_remote_code=True)` (diffusers' remote-code route: model_index.json names the folder's pipeline file)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from tiny_ttt_pipeline import save_tiny_ttt_pipeline

from models import CogVideoXTTTTransformer3DModel
from pipeline import TTTVideoPipeline
from pipeline.pipeline_ttt_video import CLASS_NAME_ENTRY, CODE_FILE, CODE_FILE_TEXT

ROOT = Path(__file__).resolve().parents[1]
LOAD = ("import sys; from diffusers import DiffusionPipeline; "
        "pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True); "
        "print(type(pipe).__name__, type(pipe.transformer).__name__)")


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    return save_tiny_ttt_pipeline(tmp_path_factory.mktemp("loading") / "pipeline")


def first_latents(pipe) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=["a red ball rolls in"], num_inference_steps=1, generator=torch.Generator().manual_seed(0),
                output_type="latent").frames


def test_saved_folder_names_its_pipeline_file(saved):
    assert json.loads((saved / "model_index.json").read_text())["_class_name"] == CLASS_NAME_ENTRY
    assert (saved / CODE_FILE).read_text() == CODE_FILE_TEXT


def test_diffusion_pipeline_from_pretrained_returns_the_ttt_pipeline(saved):
    with pytest.raises(ValueError, match="trust_remote_code=True"):  # diffusers runs a folder's code only when told
        DiffusionPipeline.from_pretrained(saved)
    pipe = DiffusionPipeline.from_pretrained(saved, trust_remote_code=True)
    assert type(pipe) is TTTVideoPipeline
    assert type(pipe.transformer) is CogVideoXTTTTransformer3DModel
    torch.testing.assert_close(first_latents(pipe), first_latents(TTTVideoPipeline.from_pretrained(saved)),
                               atol=0, rtol=0)


def test_own_from_pretrained_needs_no_remote_code(saved):
    assert TTTVideoPipeline.load_config(saved)["_class_name"] == "TTTVideoPipeline"
    assert DiffusionPipeline.load_config(saved)["_class_name"] == CLASS_NAME_ENTRY
    assert type(TTTVideoPipeline.from_pretrained(saved)) is TTTVideoPipeline  # no trust_remote_code needed


def test_a_copied_folder_loads_in_a_fresh_process(saved, tmp_path):
    """Nothing imported beforehand: the folder's pipeline file brings in the TTT-Video packages, whose classes the
    other model_index.json entries then name. With the repository off the path the error says what to do."""
    copy = shutil.copytree(saved, tmp_path / "elsewhere")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", LOAD, str(copy)], cwd=tmp_path, capture_output=True, text=True,
                         env={**env, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["TTTVideoPipeline", "CogVideoXTTTTransformer3DModel"]
    run = subprocess.run([sys.executable, "-c", LOAD, str(copy)], cwd=tmp_path, capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode != 0
    assert "put the repository on PYTHONPATH" in run.stderr


def test_bundled_default_model_is_in_the_remote_code_form():
    folder = ROOT / "models" / "default"
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == CLASS_NAME_ENTRY
    assert (folder / CODE_FILE).read_text() == CODE_FILE_TEXT

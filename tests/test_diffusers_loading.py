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
from pipeline.code_bundle import BUNDLE_FILE, REPO_CODE_FILE_TEXT, bundle_text
from pipeline.pipeline_ttt_video import CLASS_NAME_ENTRY, CODE_FILE, CODE_FILE_TEXT

ROOT = Path(__file__).resolve().parents[1]
LOAD = """
import sys, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
latents = pipe(prompt=["a red ball rolls in"], num_inference_steps=1, generator=torch.Generator().manual_seed(0),
               output_type="latent").frames
print(type(pipe).__name__, type(pipe.transformer).__name__, sys.modules[type(pipe).__module__].__file__,
      repr(latents.double().sum().item()))
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    return save_tiny_ttt_pipeline(tmp_path_factory.mktemp("loading") / "pipeline")


def first_latents(pipe) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=["a red ball rolls in"], num_inference_steps=1, generator=torch.Generator().manual_seed(0),
                output_type="latent").frames


def test_saved_folder_names_its_pipeline_file_and_carries_the_code(saved):
    assert json.loads((saved / "model_index.json").read_text())["_class_name"] == CLASS_NAME_ENTRY
    assert (saved / CODE_FILE).read_text() == CODE_FILE_TEXT
    assert (saved / BUNDLE_FILE).read_text() == bundle_text()


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


def test_a_copied_folder_loads_where_the_repository_cannot_be_imported(saved, tmp_path):
    """A fresh process, run elsewhere, with the repository off sys.path: the folder's pipeline file falls back on the
    code it carries (ttt_video_code.py), which then resolves the other model_index.json entries too; same output."""
    copy = shutil.copytree(saved, tmp_path / "elsewhere")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    run = subprocess.run([sys.executable, "-c", LOAD, str(copy)], cwd=tmp_path, capture_output=True, text=True,
                         env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    pipeline_name, transformer_name, module_file, checksum = run.stdout.split()
    assert (pipeline_name, transformer_name) == ("TTTVideoPipeline", "CogVideoXTTTTransformer3DModel")
    assert Path(module_file).is_relative_to(tmp_path / "modules")  # the carried code, not the repository's
    expected = first_latents(TTTVideoPipeline.from_pretrained(saved)).double().sum().item()
    assert float(checksum) == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_bundled_default_model_is_in_the_remote_code_form(tmp_path):
    """models/default loads through DiffusionPipeline with the repository's code; the code bundle a saved folder
    carries (a zip of the repository's own code) is not kept in git, where it would only lag the code beside it."""
    folder = ROOT / "models" / "default"
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == CLASS_NAME_ENTRY
    assert (folder / CODE_FILE).read_text() == REPO_CODE_FILE_TEXT
    tracked = subprocess.run(["git", "ls-files", str(folder / BUNDLE_FILE)], cwd=ROOT, capture_output=True, text=True)
    assert tracked.stdout.strip() == "", "the code bundle is not to be committed"
    load = ("from diffusers import DiffusionPipeline; import sys; "
            "print(type(DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)).__name__)")
    run = subprocess.run([sys.executable, "-c", load, str(folder)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert run.returncode == 0 and run.stdout.split()[-1] == "TTTVideoPipeline", run.stderr[-2000:]

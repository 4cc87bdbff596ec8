"""LoRA the diffusers way: the exporter writes a trained LoRA in diffusers' format beside the fused export
(export/lora/), and TTTVideoPipeline loads it with CogVideoX's LoRA loader (load_lora_weights, fuse_lora,
set_adapters) to the same output as the fused export."""

import json

import pytest
import torch
from peft import LoraConfig
from safetensors import safe_open
from tiny_ttt_pipeline import tiny_ttt_pipeline

from pipeline import TTTVideoPipeline
from pipeline.training.components import LORA_TARGETS
from pipeline.training.export import LORA_DIR, TTT_ADAPTER_FILE, export_pipeline

PROMPT = [["a red ball rolls in", "the ball jumps"], ["a blue box"]]


def latents(pipe) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type="latent").frames


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(base folder, export folder, latents of the trained model before export): the base is the pipeline training
    started from; "training" here changes the TTT weights and adds a LoRA (rank 4, alpha 8: scale 2) as
    train.trainable=lora does (pipeline/training/components.py), with random lora_B so that it has an effect."""
    root = tmp_path_factory.mktemp("lora")
    pipe = tiny_ttt_pipeline()
    pipe.save_pretrained(root / "base")
    transformer = pipe.transformer
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=True, target_modules=LORA_TARGETS))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name or name in set(transformer.added_parameter_names()):
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    expected = latents(pipe)
    export_pipeline(pipe, root / "final")
    return root / "base", root / "final", expected


def test_export_writes_the_lora_in_diffusers_format(trained):
    _, final, _ = trained
    with safe_open(final / LORA_DIR / "pytorch_lora_weights.safetensors", framework="pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("transformer.transformer_blocks.") and ".lora_" in k for k in keys)
    assert {k.split(".attn1.")[1].rsplit(".lora_", 1)[0] for k in keys} == set(LORA_TARGETS)
    config = json.loads(metadata["lora_adapter_metadata"])
    assert (config["transformer.r"], config["transformer.lora_alpha"]) == (4, 8)  # diffusers prefixes the keys
    assert (final / LORA_DIR / TTT_ADAPTER_FILE).is_file()


def test_fused_export_keeps_the_trained_output(trained):
    _, final, expected = trained
    loaded = TTTVideoPipeline.from_pretrained(final)
    assert not any("lora" in n for n, _ in loaded.transformer.named_parameters())
    torch.testing.assert_close(latents(loaded), expected, rtol=1e-4, atol=1e-4)


def test_lora_loads_fuses_and_switches_like_diffusers(trained):
    base, final, expected = trained
    pipe = TTTVideoPipeline.from_pretrained(base)
    pipe.transformer.load_adapter(final / LORA_DIR / TTT_ADAPTER_FILE)
    without_lora = latents(pipe)
    pipe.load_lora_weights(final / LORA_DIR, adapter_name="story")
    torch.testing.assert_close(latents(pipe), expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(without_lora, expected, rtol=1e-4, atol=1e-4)

    pipe.set_adapters(["story"], adapter_weights=[0.0])
    torch.testing.assert_close(latents(pipe), without_lora, rtol=1e-4, atol=1e-4)
    pipe.set_adapters(["story"], adapter_weights=[1.0])
    pipe.fuse_lora(adapter_names=["story"])
    pipe.unload_lora_weights()
    assert not any("lora" in n for n, _ in pipe.transformer.named_parameters())
    torch.testing.assert_close(latents(pipe), expected, rtol=1e-4, atol=1e-4)

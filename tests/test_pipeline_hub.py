"""The real Hub loading path of the pipeline, against a locally populated Hugging Face cache (HF_HUB_OFFLINE=1)."""

import json
import shutil

import pytest
import torch
from diffusers import WanPipeline, WanTransformer3DModel
from safetensors.torch import load_file

from trl_arcopo import CausalWanPipeline
from trl_arcopo.models import wan_config_from_original
from trl_arcopo.pipelines.causal_wan import pipeline_source
from trl_arcopo.testing import populate_hub_cache, tiny_components


@pytest.fixture(scope="module")
def hub(fixture_dir, tmp_path_factory):
    """A Hub cache holding a tiny `Wan-AI/Wan2.1-T2V-1.3B-Diffusers` (stock WanPipeline layout, transformer of the
    fixture's architecture) and a tiny `gdhe17/Self-Forcing` with the fixture checkpoint at the real file name."""
    root = fixture_dir / "self_forcing_tiny"
    cache = tmp_path_factory.mktemp("hub")
    base = tmp_path_factory.mktemp("base")
    components = tiny_components()
    config = wan_config_from_original(json.loads((root / "model_config.json").read_text()))
    components["transformer"] = WanTransformer3DModel(**config)
    WanPipeline(**components).save_pretrained(base)
    populate_hub_cache("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", base, cache_dir=cache)

    repo = tmp_path_factory.mktemp("self_forcing") / "repo"
    (repo / "checkpoints").mkdir(parents=True)
    shutil.copyfile(root / "self_forcing_tiny.pt", repo / "checkpoints" / "self_forcing_dmd.pt")
    populate_hub_cache("gdhe17/Self-Forcing", repo, cache_dir=cache, move=True)  # as bench_real_arch does at 2.6 GB
    assert not (repo / "checkpoints" / "self_forcing_dmd.pt").exists()
    return cache


def test_from_self_forcing_matches_original(hub, fixture_dir):
    pipe = CausalWanPipeline.from_self_forcing(cache_dir=hub, dtype=torch.float32, max_sequence_length=16)
    assert isinstance(pipe.transformer, WanTransformer3DModel)
    assert pipe.tokenizer is not None and pipe.text_encoder is not None and pipe.vae is not None
    assert pipe.config.num_frame_per_block == 3 and pipe.timesteps == [1000.0, 937.5, 833.3333129882812, 625.0]

    root = fixture_dir / "self_forcing_tiny"
    inputs, expected = load_file(root / "inputs.safetensors"), load_file(root / "expected.safetensors")
    step_noise = {
        (c, s): inputs[f"renoise_chunk{c}_step{s}"].permute(0, 2, 1, 3, 4) for c in range(3) for s in range(3)
    }
    latents = pipe(
        prompt_embeds=inputs["prompt_embeds"],
        latents=inputs["noise"].permute(0, 2, 1, 3, 4),
        step_noise=step_noise,
        output_type="latent",
    ).frames
    torch.testing.assert_close(latents, expected["latents"].permute(0, 2, 1, 3, 4), atol=1e-4, rtol=0)

    video = pipe("a dog running on the beach", num_frames=9, height=32, width=48, output_type="pt").frames
    assert video.shape == (1, 9, 3, 32, 48)


def test_from_self_forcing_with_window_and_bf16(hub):
    pipe = CausalWanPipeline.from_self_forcing(
        cache_dir=hub, dtype=torch.bfloat16, local_attn_size=6, sink_size=3, max_sequence_length=16
    )
    assert pipe.config.local_attn_size == 6 and pipe.config.sink_size == 3
    source = pipeline_source(pipe)  # what a model card of a LoRA trained on it names and loads
    assert source.hub_id == "gdhe17/Self-Forcing" and "https://huggingface.co/gdhe17/Self-Forcing" in source.name
    assert source.code.endswith(
        "CausalWanPipeline.from_self_forcing('gdhe17/Self-Forcing', 'Wan-AI/Wan2.1-T2V-1.3B-Diffusers', "
        'dtype=torch.bfloat16, local_attn_size=6, sink_size=3).to("cuda" if torch.cuda.is_available() else "cpu")'
    )
    assert pipe.transformer.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert pipe.transformer.scale_shift_table.dtype == torch.float32
    latents = pipe(prompt_embeds=torch.randn(1, 8, 32), num_frames=33, height=32, width=48, output_type="latent")
    assert latents.frames.shape == (1, 16, 9, 4, 6) and torch.isfinite(latents.frames).all()


def test_from_self_forcing_save_and_reload(hub, tmp_path):
    pipe = CausalWanPipeline.from_self_forcing(cache_dir=hub, dtype=torch.float32, max_sequence_length=16)
    pipe.save_pretrained(tmp_path)
    loaded = CausalWanPipeline.from_pretrained(tmp_path)
    kwargs = {"prompt": "a cat", "num_frames": 21, "height": 32, "width": 32, "output_type": "latent"}
    a = pipe(generator=torch.Generator().manual_seed(0), **kwargs).frames
    b = loaded(generator=torch.Generator().manual_seed(0), **kwargs).frames
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_missing_repo_in_offline_cache_fails_clearly(hub):
    with pytest.raises(Exception, match="(?i)offline|cannot find|not found|local"):
        CausalWanPipeline.from_self_forcing("nobody/missing-repo", cache_dir=hub, dtype=torch.float32)

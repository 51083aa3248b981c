"""Self-Forcing checkpoint conversion / loading, tiny offline components and the Hub-cache helper (CPU, float32)."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file

from trl_arcopo.models.self_forcing import (
    SELF_FORCING_FILENAME,
    WAN_1_3B_CONFIG,
    convert_self_forcing_state_dict,
    load_self_forcing_transformer,
    wan_config_from_original,
)
from trl_arcopo.testing import populate_hub_cache, tiny_components, tiny_transformer_config


@pytest.fixture(scope="module")
def tiny_dir(fixture_dir: Path) -> Path:
    return fixture_dir / "self_forcing_tiny"


@pytest.fixture(scope="module")
def tiny_config(tiny_dir: Path) -> dict:
    return wan_config_from_original(json.loads((tiny_dir / "model_config.json").read_text()))


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_dir: Path) -> dict:
    return torch.load(tiny_dir / "self_forcing_tiny.pt", map_location="cpu", weights_only=True)


def _assert_same_weights(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for key, tensor in expected.items():
        torch.testing.assert_close(state[key], tensor, rtol=0, atol=0, msg=key)


def _original_1_3b_shapes() -> dict[str, tuple[int, ...]]:
    """Original-layout (CausalWanModel, `model.`-prefixed) tensor shapes of the 1.3B Self-Forcing generator."""
    dim, ffn, text, freq, out = 1536, 8960, 4096, 256, 16 * 1 * 2 * 2
    linear = lambda n_out, n_in: {"weight": (n_out, n_in), "bias": (n_out,)}  # noqa: E731
    shapes: dict[str, tuple[int, ...]] = {
        "patch_embedding.weight": (dim, 16, 1, 2, 2),
        "patch_embedding.bias": (dim,),
        "head.modulation": (1, 2, dim),
    }
    modules = {
        "text_embedding.0": linear(dim, text),
        "text_embedding.2": linear(dim, dim),
        "time_embedding.0": linear(dim, freq),
        "time_embedding.2": linear(dim, dim),
        "time_projection.1": linear(6 * dim, dim),
        "head.head": linear(out, dim),
    }
    for n in range(30):
        shapes[f"blocks.{n}.modulation"] = (1, 6, dim)
        for attn in ("self_attn", "cross_attn"):
            modules.update({f"blocks.{n}.{attn}.{p}": linear(dim, dim) for p in "qkvo"})
            shapes[f"blocks.{n}.{attn}.norm_q.weight"] = (dim,)
            shapes[f"blocks.{n}.{attn}.norm_k.weight"] = (dim,)
        modules[f"blocks.{n}.norm3"] = {"weight": (dim,), "bias": (dim,)}
        modules[f"blocks.{n}.ffn.0"] = linear(ffn, dim)
        modules[f"blocks.{n}.ffn.2"] = linear(dim, ffn)
    for module, params in modules.items():
        shapes.update({f"{module}.{name}": shape for name, shape in params.items()})
    return {f"model.{key}": shape for key, shape in shapes.items()}


# --------------------------------------------------------------------------------------------------- conversion


@pytest.mark.parametrize(
    ("original", "converted"),
    [
        ("model.patch_embedding.weight", "patch_embedding.weight"),
        ("model.text_embedding.0.weight", "condition_embedder.text_embedder.linear_1.weight"),
        ("model.text_embedding.2.bias", "condition_embedder.text_embedder.linear_2.bias"),
        ("model.time_embedding.0.bias", "condition_embedder.time_embedder.linear_1.bias"),
        ("model.time_embedding.2.weight", "condition_embedder.time_embedder.linear_2.weight"),
        ("model.time_projection.1.weight", "condition_embedder.time_proj.weight"),
        ("model.blocks.1.modulation", "blocks.1.scale_shift_table"),
        ("model.blocks.1.self_attn.q.weight", "blocks.1.attn1.to_q.weight"),
        ("model.blocks.1.self_attn.k.bias", "blocks.1.attn1.to_k.bias"),
        ("model.blocks.1.self_attn.v.weight", "blocks.1.attn1.to_v.weight"),
        ("model.blocks.1.self_attn.o.weight", "blocks.1.attn1.to_out.0.weight"),
        ("model.blocks.1.self_attn.norm_q.weight", "blocks.1.attn1.norm_q.weight"),
        ("model.blocks.1.cross_attn.k.weight", "blocks.1.attn2.to_k.weight"),
        ("model.blocks.1.cross_attn.o.bias", "blocks.1.attn2.to_out.0.bias"),
        ("model.blocks.1.cross_attn.norm_k.weight", "blocks.1.attn2.norm_k.weight"),
        ("model.blocks.1.norm3.weight", "blocks.1.norm2.weight"),
        ("model.blocks.1.norm2.weight", "blocks.1.norm3.weight"),
        ("model.blocks.1.ffn.0.weight", "blocks.1.ffn.net.0.proj.weight"),
        ("model.blocks.1.ffn.2.bias", "blocks.1.ffn.net.2.bias"),
        ("model.head.head.weight", "proj_out.weight"),
        ("model.head.modulation", "scale_shift_table"),
        (
            "_orig_mod.model._fsdp_wrapped_module.blocks.3._fsdp_wrapped_module.ffn.0.bias",
            "blocks.3.ffn.net.0.proj.bias",
        ),
        ("blocks.12.cross_attn.q.weight", "blocks.12.attn2.to_q.weight"),
        ("model.blocks.0.self_attn.k_img.weight", "blocks.0.self_attn.k_img.weight"),  # no rule: passed through
    ],
)
def test_convert_key_names(original: str, converted: str) -> None:
    tensor = torch.zeros(1)
    assert convert_self_forcing_state_dict({original: tensor}) == {converted: tensor}


def test_convert_rejects_colliding_keys() -> None:
    with pytest.raises(ValueError, match="both map to 'proj_out.weight'"):
        convert_self_forcing_state_dict({"model.head.head.weight": torch.zeros(1), "head.head.weight": torch.zeros(1)})


def test_1_3b_layout_converts_to_825_diffusers_keys() -> None:
    with torch.device("meta"):
        expected = WanTransformer3DModel(**WAN_1_3B_CONFIG).state_dict()
        original = {key: torch.empty(shape) for key, shape in _original_1_3b_shapes().items()}
    converted = convert_self_forcing_state_dict(original)
    assert len(original) == len(converted) == len(expected) == 825
    assert converted.keys() == expected.keys()
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in expected.items()}
    assert sum(v.numel() for v in converted.values()) == pytest.approx(1.419e9, rel=1e-3)


def test_wan_config_from_original_1_3b() -> None:
    original = {
        "model_type": "t2v",
        "patch_size": [1, 2, 2],
        "text_len": 512,
        "in_dim": 16,
        "dim": 1536,
        "ffn_dim": 8960,
        "freq_dim": 256,
        "text_dim": 4096,
        "out_dim": 16,
        "num_heads": 12,
        "num_layers": 30,
        "local_attn_size": -1,
        "sink_size": 0,
        "qk_norm": True,
        "cross_attn_norm": True,
        "eps": 1e-6,
    }
    assert wan_config_from_original(original) == WAN_1_3B_CONFIG
    assert wan_config_from_original({**original, "qk_norm": False})["qk_norm"] is None


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"dim": None}, "'dim'"),
        ({"num_layers": None}, "'num_layers'"),
        ({"dim": 33}, "'dim'.*divisible.*'num_heads'"),
        ({"model_type": "i2v"}, "model_type='i2v'"),
    ],
)
def test_wan_config_from_original_errors(tiny_dir: Path, change: dict, match: str) -> None:
    original = json.loads((tiny_dir / "model_config.json").read_text())
    for key, value in change.items():
        if value is None:
            del original[key]
        else:
            original[key] = value
    with pytest.raises(ValueError, match=match):
        wan_config_from_original(original)


# --------------------------------------------------------------------------------------------------- loading


def test_load_fixture_strictly(tiny_dir: Path, tiny_config: dict, tiny_checkpoint: dict) -> None:
    model = load_self_forcing_transformer(tiny_dir / "self_forcing_tiny.pt", config=tiny_config)
    assert isinstance(model, WanTransformer3DModel) and not model.training
    assert len(tiny_checkpoint["generator_ema"]) == 69
    _assert_same_weights(model, convert_self_forcing_state_dict(tiny_checkpoint["generator_ema"]))
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    for block in model.blocks:
        assert block.norm2.weight is not None and block.norm2.bias is not None
        assert len(list(block.norm3.parameters())) == 0


def test_loaded_fixture_reproduces_original_first_forward(tiny_dir: Path, tiny_config: dict) -> None:
    # Chunk 0, step 0 has nothing cached, so the original causal model's output is a plain forward over 3 frames.
    model = load_self_forcing_transformer(tiny_dir / "self_forcing_tiny.pt", config=tiny_config)
    inputs = load_file(tiny_dir / "inputs.safetensors")
    expected = load_file(tiny_dir / "expected.safetensors")["flow_chunk0_step0"]  # [B, F, C, H, W]
    latents = inputs["noise"][:, :3].permute(0, 2, 1, 3, 4)  # -> [B, C, F, H, W]
    timestep = torch.full((latents.shape[0],), 1000.0)
    with torch.no_grad():
        flow = model(latents, timestep, inputs["prompt_embeds"], return_dict=False)[0]
    torch.testing.assert_close(flow.permute(0, 2, 1, 3, 4), expected, rtol=0, atol=1e-4)


def test_load_safetensors_equals_pt(tiny_dir: Path, tiny_config: dict, tiny_checkpoint: dict) -> None:
    model = load_self_forcing_transformer(tiny_dir / "generator_ema.safetensors", config=tiny_config)
    _assert_same_weights(model, convert_self_forcing_state_dict(tiny_checkpoint["generator_ema"]))


def test_use_ema_selects_entry(tmp_path: Path, tiny_config: dict, tiny_checkpoint: dict, caplog) -> None:
    ema = tiny_checkpoint["generator_ema"]
    generator = {key: tensor + 1.0 for key, tensor in ema.items()}
    torch.save({"generator": generator, "generator_ema": ema, "step": 7}, tmp_path / "both.pt")
    loaded = load_self_forcing_transformer(tmp_path / "both.pt", config=tiny_config, use_ema=False)
    _assert_same_weights(loaded, convert_self_forcing_state_dict(generator))
    loaded = load_self_forcing_transformer(tmp_path / "both.pt", config=tiny_config)
    _assert_same_weights(loaded, convert_self_forcing_state_dict(ema))

    torch.save({"generator": generator}, tmp_path / "generator_only.pt")
    with caplog.at_level(logging.WARNING, logger="trl_arcopo.models.self_forcing"):
        loaded = load_self_forcing_transformer(tmp_path / "generator_only.pt", config=tiny_config)
    assert "no 'generator_ema' entry" in caplog.text
    _assert_same_weights(loaded, convert_self_forcing_state_dict(generator))

    torch.save(ema, tmp_path / "bare.pth")
    loaded = load_self_forcing_transformer(tmp_path / "bare.pth", config=tiny_config)
    _assert_same_weights(loaded, convert_self_forcing_state_dict(ema))

    torch.save({"critic": ema, "step": 7}, tmp_path / "critic_only.pt")
    with pytest.raises(ValueError, match=r"\['critic', 'step'\]"):
        load_self_forcing_transformer(tmp_path / "critic_only.pt", config=tiny_config)


_CALLS: list[str] = []


def _record_call() -> None:
    _CALLS.append("unpickled")


class _Payload:
    """An object whose unpickling runs code: it must never be reconstructed."""

    def __reduce__(self):
        return (_record_call, ())


def test_unsafe_pickle_is_refused(tmp_path: Path, tiny_config: dict) -> None:
    torch.save({"generator_ema": _Payload()}, tmp_path / "unsafe.pt")
    with pytest.raises(ValueError, match="non-tensor pickled objects.*refused for security.*safetensors"):
        load_self_forcing_transformer(tmp_path / "unsafe.pt", config=tiny_config)
    assert _CALLS == []


def test_key_mismatch_lists_missing_and_unexpected(tmp_path: Path, tiny_config: dict, tiny_checkpoint: dict) -> None:
    state = dict(tiny_checkpoint["generator_ema"])
    del state["model.blocks.1.ffn.2.bias"]
    state["model.blocks.0.extra.weight"] = torch.zeros(3)
    torch.save({"generator_ema": state}, tmp_path / "broken.pt")
    with pytest.raises(ValueError) as error:
        load_self_forcing_transformer(tmp_path / "broken.pt", config=tiny_config)
    message = str(error.value)
    assert "1 missing key(s): ['blocks.1.ffn.net.2.bias']" in message
    assert "1 unexpected key(s): ['blocks.0.extra.weight']" in message
    assert '"ffn_dim": 64' in message


def test_wrong_config_reports_shapes(tiny_dir: Path, tiny_config: dict) -> None:
    with pytest.raises(ValueError) as error:
        load_self_forcing_transformer(tiny_dir / "self_forcing_tiny.pt", config={**tiny_config, "ffn_dim": 32})
    assert "6 shape-mismatched key(s)" in str(error.value)
    assert "blocks.0.ffn.net.0.proj.weight: checkpoint (64, 32) vs model (32, 32)" in str(error.value)
    assert '"ffn_dim": 32' in str(error.value)


def test_missing_local_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_self_forcing_transformer(tmp_path / "absent.pt")


def test_load_from_hub_cache(tmp_path: Path, hf_cache: Path, tiny_dir: Path, tiny_config: dict) -> None:
    repo = tmp_path / "repo"
    (repo / SELF_FORCING_FILENAME).parent.mkdir(parents=True)
    shutil.copyfile(tiny_dir / "self_forcing_tiny.pt", repo / SELF_FORCING_FILENAME)
    populate_hub_cache("org/tiny-self-forcing", repo, cache_dir=hf_cache)

    from_hub = load_self_forcing_transformer("org/tiny-self-forcing", config=tiny_config, cache_dir=hf_cache)
    local = load_self_forcing_transformer(tiny_dir / "self_forcing_tiny.pt", config=tiny_config)
    _assert_same_weights(from_hub, local.state_dict())


def test_bf16_keeps_fp32_modules(tmp_path: Path, tiny_dir: Path, tiny_config: dict) -> None:
    model = load_self_forcing_transformer(tiny_dir / "self_forcing_tiny.pt", config=tiny_config, dtype=torch.bfloat16)
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert model.proj_out.weight.dtype == torch.bfloat16
    assert model.rope.freqs_cos.dtype == model.rope.freqs_sin.dtype == torch.float32
    assert model.scale_shift_table.dtype == torch.float32
    assert model.blocks[1].scale_shift_table.dtype == torch.float32
    assert model.blocks[1].norm2.weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.condition_embedder.time_embedder.parameters())

    # Same per-tensor dtypes as diffusers' own `from_pretrained(dtype=bf16)`, which is also the directory code path.
    load_self_forcing_transformer(tiny_dir / "self_forcing_tiny.pt", config=tiny_config).save_pretrained(tmp_path)
    reference = load_self_forcing_transformer(tmp_path, dtype=torch.bfloat16)
    dtypes = lambda m: {n: t.dtype for n, t in [*m.named_parameters(), *m.named_buffers()]}  # noqa: E731
    assert dtypes(model) == dtypes(reference)
    _assert_same_weights(model, reference.state_dict())
    assert not reference.training


# --------------------------------------------------------------------------------------------------- testing helpers


def test_tiny_components_forward() -> None:
    components = tiny_components()
    assert set(components) == {"transformer", "vae", "text_encoder", "tokenizer", "scheduler"}
    for name in ("transformer", "vae", "text_encoder"):
        module = components[name]
        assert not module.training and all(p.dtype == torch.float32 for p in module.parameters())
    transformer = components["transformer"]
    assert len(transformer.state_dict()) == 69
    config = {key: transformer.config[key] for key in tiny_transformer_config()}
    assert {**config, "patch_size": tuple(config["patch_size"])} == tiny_transformer_config()

    tokenizer = components["tokenizer"]
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert 200 < len(tokenizer) <= components["text_encoder"].config.vocab_size
    ids = tokenizer("A cat walks in the park", padding="max_length", max_length=10, truncation=True).input_ids
    assert ids[6:] == [1, 0, 0, 0] and 2 not in ids

    prompt_embeds = components["text_encoder"](torch.tensor([ids])).last_hidden_state  # [1, 10, 32]
    latents = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = transformer(latents, torch.tensor([500.0]), prompt_embeds, return_dict=False)[0]
    assert out.shape == (1, 16, 3, 4, 4) and torch.isfinite(out).all()

    again = tiny_components()["transformer"]
    _assert_same_weights(again, transformer.state_dict())


def test_populate_hub_cache_round_trip(tmp_path: Path, hf_cache: Path) -> None:
    import huggingface_hub
    from huggingface_hub import hf_hub_download, snapshot_download

    assert huggingface_hub.constants.HF_HUB_OFFLINE, "tests must run with HF_HUB_OFFLINE=1"
    folder = tmp_path / "files"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text('{"a": 1}')
    (folder / "sub" / "data.bin").write_bytes(b"\x00\x01\x02")

    snapshot = populate_hub_cache("org/round-trip", folder, cache_dir=hf_cache)
    storage = hf_cache / "models--org--round-trip"
    assert snapshot.parent == storage / "snapshots" and len(snapshot.name) == 40
    assert (storage / "refs" / "main").read_text() == snapshot.name
    downloaded = Path(hf_hub_download("org/round-trip", "sub/data.bin", cache_dir=hf_cache))
    assert downloaded == snapshot / "sub" / "data.bin" and downloaded.read_bytes() == b"\x00\x01\x02"
    assert downloaded.resolve().parent == storage / "blobs"
    assert Path(snapshot_download("org/round-trip", cache_dir=hf_cache)) == snapshot
    assert populate_hub_cache("org/round-trip", folder, cache_dir=hf_cache) == snapshot  # idempotent

    dataset = populate_hub_cache("org/round-trip", folder, cache_dir=hf_cache, repo_type="dataset")
    assert dataset.parent.parent.name == "datasets--org--round-trip"
    path = hf_hub_download("org/round-trip", "config.json", repo_type="dataset", cache_dir=hf_cache)
    assert json.loads(Path(path).read_text()) == {"a": 1}


def test_cast_transformer_keeps_fp32_modules() -> None:
    from trl_arcopo.models.self_forcing import cast_transformer

    model = cast_transformer(tiny_components()["transformer"], torch.bfloat16)
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert model.scale_shift_table.dtype == torch.float32
    assert model.blocks[0].norm2.weight.dtype == torch.float32
    assert model.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32

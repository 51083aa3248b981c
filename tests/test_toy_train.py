"""The toy generator's training script: resumable stages, the ODE sampler, and a whole run at tiny budgets."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from trl_arcopo import cli
from trl_arcopo.toy import train as toy_train
from trl_arcopo.toy.train import ToyTrainingConfig, _train_stage, ode_sample, train_toy_pipeline
from trl_arcopo.toy.world import render


def _stage(tmp_path, steps: int, fail_at: int | None = None) -> nn.Module:
    torch.manual_seed(0)
    module = nn.Linear(3, 2)
    data = torch.randn(8, 3)

    def loss_fn(step: int) -> torch.Tensor:
        if step == fail_at:
            raise KeyboardInterrupt
        return (module(data[step % 8]) - step).square().mean()

    _train_stage(
        "toy",
        {"m": module},
        loss_fn,
        steps=steps,
        learning_rate=0.1,
        output_dir=tmp_path,
        checkpoint_every=2,
        ema_decay=0.9,
    )
    return module


def test_interrupted_stage_resumes_exactly(tmp_path):
    reference = _stage(tmp_path / "a", steps=7)
    with pytest.raises(KeyboardInterrupt):
        _stage(tmp_path / "b", steps=7, fail_at=5)
    assert (tmp_path / "b" / "toy-checkpoint" / "progress.json").exists()
    resumed = _stage(tmp_path / "b", steps=7)
    for p, q in zip(reference.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    assert not (tmp_path / "b" / "toy-checkpoint").exists()


def test_config_rejects_bad_sizes():
    with pytest.raises(ValueError, match="num_frames"):
        ToyTrainingConfig(num_frames=10)
    with pytest.raises(ValueError, match="height"):
        ToyTrainingConfig(height=20)
    with pytest.raises(ValueError, match="ode_steps"):
        ToyTrainingConfig(ode_steps=10)
    with pytest.raises(ValueError, match="first_chunk_fraction"):
        ToyTrainingConfig(first_chunk_fraction=0.0)
    with pytest.raises(ValueError, match="vae_blur_probability"):
        ToyTrainingConfig(vae_blur_probability=1.5)
    with pytest.raises(ValueError, match="vae_shape_code_weight"):
        ToyTrainingConfig(vae_shape_code_weight=-1.0)
    with pytest.raises(ValueError, match="foreground_weight"):
        ToyTrainingConfig(foreground_weight=-1.0)
    with pytest.raises(ValueError, match="foreground_ring"):
        ToyTrainingConfig(foreground_ring=-1)
    with pytest.raises(ValueError, match="dmd_critic_steps"):
        ToyTrainingConfig(dmd_critic_steps=0)
    with pytest.raises(ValueError, match="dmd_regression_weight"):
        ToyTrainingConfig(dmd_regression_weight=-1.0)


class _Captured(Exception):
    pass


def _first_vae_step(monkeypatch, tmp_path, **settings) -> dict:
    """The VAE stage's first step for 4 frames of 16x16 pixels and the config `settings`: its loss (`loss`), its
    encoder's input (`x`, ``[B, 3, 1, H, W]``) and mean (`mean`, ``[B, 16, 1, h, w]``), its decoder's input (`z`)."""
    captured = {}

    def first_loss(name, modules, loss_fn, **kwargs):
        vae = modules["vae"]
        hooks = [  # the encoder's mean (the first z_dim channels of quant_conv's output) and the decoder's input
            vae.encoder.register_forward_pre_hook(lambda m, a: captured.update(x=a[0].detach())),
            vae.quant_conv.register_forward_hook(lambda m, a, out: captured.update(mean=out[:, :16].detach())),
            vae.post_quant_conv.register_forward_pre_hook(lambda m, a: captured.update(z=a[0].detach())),
        ]
        captured["loss"] = loss_fn(0).item()
        for hook in hooks:
            hook.remove()
        raise _Captured

    monkeypatch.setattr(toy_train, "_train_stage", first_loss)
    cfg = ToyTrainingConfig(output_dir=str(tmp_path), num_frames=3, height=16, width=16, vae_batch_size=4, **settings)
    with pytest.raises(_Captured):
        toy_train.train_vae(cfg, tmp_path)
    return captured


def _recorded(monkeypatch, name: str) -> list:
    """Replace `toy_train.<name>` by a wrapper that appends each call's `(args, result)` to the returned list."""
    calls, real = [], getattr(toy_train, name)
    monkeypatch.setattr(toy_train, name, lambda *args: calls.append((args, real(*args))) or calls[-1][1])
    return calls


def test_the_vae_shape_code_term_and_the_blurred_decoder_inputs(tmp_path, monkeypatch):
    """`vae_shape_code_weight` adds w x the MSE between the encoder's mean in the first channels and the shape code of
    the frames it encodes; `vae_blur_probability=1` decodes every frame from its latent blurred."""
    from trl_arcopo.toy.world import layout

    code = toy_train.shape_code([layout("a large red square", 3, seed=0)], torch.tensor([1]), 32, 32)
    assert code.shape == (1, 3, 16, 16) and code.max() == 2
    assert not code[0, 0].any() and not code[0, 2].any() and (code[0, 1] == 2).sum() > 10  # the square's channel

    codes = _recorded(monkeypatch, "shape_code")
    runs = {
        (weight, blur): _first_vae_step(monkeypatch, tmp_path, vae_shape_code_weight=weight, vae_blur_probability=blur)
        for weight, blur in ((0.0, 0.0), (3.0, 0.0), (0.0, 1.0))
    }
    ((_, code),) = codes  # only the weighted run asks for the code
    assert code.shape == (4, 3, 8, 8) and code.amax() == 2
    term = (runs[0.0, 0.0]["mean"][:, :3, 0] - code).square().mean().item()
    assert runs[3.0, 0.0]["loss"] == pytest.approx(runs[0.0, 0.0]["loss"] + 3 * term, rel=1e-5)
    z = runs[0.0, 0.0]["z"][:, :, 0]
    blurred = nn.functional.conv2d(z, toy_train._gaussian_kernel(1.5, 2).expand(16, 1, 5, 5), padding=2, groups=16)
    assert torch.allclose(runs[0.0, 1.0]["z"][:, :, 0], blurred, atol=1e-6)
    assert not torch.allclose(blurred, z, atol=1e-3)


def test_the_motion_code_replaces_two_latent_channels_for_the_decoder_and_the_teacher(tmp_path, monkeypatch):
    """`motion_code` decodes each VAE frame with channels 3-4 replaced by its frame's motion code, and stores the
    teacher's latents with those channels replaced by the videos' codes (normalised as the rest)."""
    plain = _first_vae_step(monkeypatch, tmp_path, vae_blur_probability=0.0, motion_code=False)
    codes = _recorded(monkeypatch, "motion_code")
    coded = _first_vae_step(monkeypatch, tmp_path, vae_blur_probability=0.0, motion_code=True)
    (((layouts, height, width), code),) = codes  # [B, 2, F, h, w] of the 4 videos
    assert code.shape == (4, 2, 3, 8, 8) and code.abs().amax() == 2
    z, z_coded = plain["z"][:, :, 0], coded["z"][:, :, 0]
    keep = [c for c in range(16) if c not in (3, 4)]
    assert torch.equal(z_coded[:, keep], z[:, keep]) and not torch.equal(z_coded, z)
    frames = render(layouts, 3, height, width) * 2 - 1  # [B, F, 3, H, W]; the encoded frame of each video:
    encoded = [int((frames[b] - coded["x"][b, :, 0]).abs().amax((1, 2, 3)).argmin()) for b in range(4)]
    assert len(set(encoded)) > 1  # frames other than the first, so that the code's frame is checked
    for b, f in enumerate(encoded):
        assert torch.equal(z_coded[b, 3:5], code[b, :, f])

    from diffusers import AutoencoderKLWan

    from trl_arcopo.toy.components import toy_vae

    toy_vae().save_pretrained(tmp_path / "vae")
    codes.clear()
    cfg = ToyTrainingConfig(
        output_dir=str(tmp_path), num_frames=3, height=16, width=16, num_videos=4, motion_code=True
    )
    toy_train.encode_dataset(cfg, tmp_path)
    stats = AutoencoderKLWan.from_pretrained(tmp_path / "vae").config
    mean, std = (torch.tensor(values)[3:5].view(1, 2, 1, 1, 1) for values in (stats.latents_mean, stats.latents_std))
    stored = load_file(tmp_path / "latents.safetensors")["latents"][:, 3:5]
    torch.testing.assert_close(stored * std + mean, torch.cat([code for _, code in codes]))


def test_loss_weight_spreads_the_objects_weight_over_the_ring():
    coverage = torch.zeros(2, 3, 8, 8)  # [B, F, h, w]
    coverage[1, 2, 4, 4] = 0.5
    plain = toy_train.loss_weight(coverage, 4.0)
    assert plain.shape == (2, 1, 3, 8, 8)
    assert torch.equal(plain, 1 + 4.0 * coverage.unsqueeze(1))
    ringed = toy_train.loss_weight(coverage, 4.0, ring=2)
    expected = torch.ones(2, 1, 3, 8, 8)
    expected[1, 0, 2, 2:7, 2:7] = 3.0  # the 5x5 window around the covered pixel, in its own video and frame only
    assert torch.equal(ringed, expected)


def test_distribution_matching_gradient_is_the_normalised_score_difference():
    torch.manual_seed(0)
    x0 = torch.randn(3, 4, 2, 5, 5, requires_grad=True)
    critic, teacher = torch.randn(3, 4, 2, 5, 5), torch.randn(3, 4, 2, 5, 5)
    toy_train.distribution_matching_loss(x0, critic, teacher).backward()
    scale = (x0.detach() - teacher).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    torch.testing.assert_close(x0.grad, (critic - teacher) / scale / x0.numel())
    # A critic that already matches the teacher leaves the generator where it is.
    x0.grad = None
    toy_train.distribution_matching_loss(x0, teacher, teacher).backward()
    assert torch.count_nonzero(x0.grad) == 0


def test_ode_sample_records_the_sampler_states_and_converges(tmp_path):
    """With a transformer that predicts a constant x̂0, the Euler ODE lands on it and the recorded states are the
    straight-line interpolations at the sampler's sigmas."""
    from trl_arcopo.testing import tiny_causal_wan_pipeline

    grid = [1000.0 * (1 - k / 8) for k in range(8)]
    pipe = tiny_causal_wan_pipeline(denoising_step_list=grid)
    target = torch.randn(1, 16, 6, 2, 2)

    def predict_x0(state, x, step):
        f0 = state.frame_offset
        return target[:, :, f0 : f0 + x.shape[2]].expand(x.shape[0], -1, -1, -1, -1)

    pipe.predict_x0 = predict_x0  # the Euler/guidance arithmetic is what is tested here
    noise = torch.randn(1, 16, 6, 2, 2)
    embeds = torch.zeros(1, 16, 32)
    latents, states = ode_sample(pipe, embeds, embeds, noise, guidance_scale=2.0, record=[0, 2, 4, 6])
    torch.testing.assert_close(latents, target.expand_as(latents))
    for i, k in enumerate([0, 2, 4, 6]):
        sigma = pipe.sigmas[k]
        torch.testing.assert_close(states[i], (1 - sigma) * target + sigma * noise, atol=1e-5, rtol=1e-5)
    unrecorded, no_states = ode_sample(pipe, embeds, embeds, noise, guidance_scale=2.0, record=[])
    torch.testing.assert_close(unrecorded, latents)
    assert no_states.shape == (0, *noise.shape)


def test_regional_guidance_denoises_each_half_of_a_two_object_first_chunk_with_its_own_caption():
    """Rows named in ``halves`` get, in their first chunk, a left half guided by the left caption and a right half by
    the right one (a predictor that returns each caption's own x̂0 lands each half on it); every other row, and
    every later chunk, is the plain ODE's. Above ``regional_sigma`` = 1 nothing changes."""
    from trl_arcopo.testing import tiny_causal_wan_pipeline

    grid = [1000.0 * (1 - k / 8) for k in range(8)]
    pipe = tiny_causal_wan_pipeline(denoising_step_list=grid)
    targets = torch.randn(4, 16, 3, 2, 4)  # caption value v -> x̂0 v · targets[v], for frames 0-2 of any chunk

    def predict_x0(state, x, step):
        value = state.prompt_embeds[:, 0, 0].long()  # 0 = the empty caption
        return targets[value][..., : x.shape[-1]] * (value > 0).view(-1, 1, 1, 1, 1)

    pipe.predict_x0 = predict_x0
    pipe.commit_chunk = lambda state, x, update_cache=True: state.chunks.append(x)
    embeds = torch.zeros(3, 16, 32)
    embeds[:, 0, 0] = 1.0  # every row's full caption: value 1
    negative = torch.zeros(3, 16, 32)
    left, right = torch.full((1, 16, 32), 2.0), torch.full((1, 16, 32), 3.0)
    noise = torch.randn(3, 16, 6, 2, 4)
    plain, _ = ode_sample(pipe, embeds, negative, noise, guidance_scale=2.0, record=[])
    halves = (torch.tensor([1]), left, right)
    regional, _ = ode_sample(pipe, embeds, negative, noise, 2.0, [], halves=halves, regional_sigma=0.0)
    torch.testing.assert_close(plain, 2.0 * targets[1].repeat(1, 1, 2, 1, 1).expand_as(plain))
    assert torch.equal(regional[[0, 2]], plain[[0, 2]])
    assert torch.equal(regional[1, :, 3:], plain[1, :, 3:])
    torch.testing.assert_close(regional[1, :, :3, :, :2], 2.0 * targets[2][..., :2])
    torch.testing.assert_close(regional[1, :, :3, :, 2:], 2.0 * targets[3][..., :2])
    off, _ = ode_sample(pipe, embeds, negative, noise, 2.0, [], halves=halves, regional_sigma=1.0)
    assert torch.equal(off, plain)


def test_regional_guidance_runs_the_real_transformer_on_half_frames():
    """With the tiny random transformer: only the named rows' first chunk changes, and the option is validated."""
    from trl_arcopo.testing import tiny_causal_wan_pipeline
    from trl_arcopo.toy.world import parse

    pipe = tiny_causal_wan_pipeline(denoising_step_list=[1000.0, 750.0, 500.0, 250.0])
    scenes = [parse("a red circle"), parse("a red circle and a blue square"), parse("a green triangle bouncing")]
    halves = toy_train._object_halves(pipe, scenes)
    assert halves[0].tolist() == [1]
    torch.testing.assert_close(halves[1], pipe.encode_prompt(["a red circle"]))
    torch.testing.assert_close(halves[2], pipe.encode_prompt(["a blue square"]))
    assert toy_train._object_halves(pipe, [scenes[0]]) is None
    embeds, negative = pipe.encode_prompt(["a"] * 3), pipe.encode_prompt([""] * 3)
    noise = torch.randn(3, 16, 6, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain, _ = ode_sample(pipe, embeds, negative, noise, 2.0, [])
        regional, _ = ode_sample(pipe, embeds, negative, noise, 2.0, [], halves=halves, regional_sigma=0.5)
    assert torch.equal(regional[[0, 2]], plain[[0, 2]])
    assert not torch.allclose(regional[1, :, :3], plain[1, :, :3])
    with pytest.raises(ValueError, match="ode_regional_sigma"):
        ToyTrainingConfig(ode_regional_sigma=1.5)
    with pytest.raises(ValueError, match="multiple of 16"):
        ToyTrainingConfig(width=24)
    ToyTrainingConfig(width=24, ode_regional_sigma=1.0)


TINY_RUN = {
    "num_frames": 6,
    "height": 16,
    "width": 16,
    "vae_steps": 2,
    "vae_batch_size": 2,
    "num_videos": 8,
    "teacher_steps": 2,
    "teacher_batch_size": 4,
    "ode_videos": 4,
    "ode_steps": 4,
    "ode_batch_size": 4,
    "student_steps": 2,
    "student_batch_size": 2,
    "checkpoint_every": 1,
}


@pytest.mark.slow
def test_tiny_run_end_to_end_and_rerun_skips_finished_stages(tmp_path, monkeypatch):
    settings = {**TINY_RUN, "output_dir": str(tmp_path / "run")}
    # Through the command line, as a user retrains it.
    assert cli.main(["toy-train", *(f"--{k}={v}" for k, v in settings.items())]) == 0
    cfg = ToyTrainingConfig(**settings)
    folder = tmp_path / "run" / "pipeline"
    from trl_arcopo import CausalWanPipeline

    pipe = CausalWanPipeline.from_pretrained(folder)
    video = pipe("a red circle moving left", num_frames=6, height=16, width=16, output_type="pt").frames
    assert video.shape == (1, 6, 3, 16, 16)
    # The folder does not name the training run's local folders (it ships inside the package).
    for config in folder.glob("*/config.json"):
        assert str(tmp_path) not in config.read_text(), config
    record = json.loads((tmp_path / "run" / "losses.json").read_text())
    assert set(record["seconds"]) == {"vae", "latents", "teacher", "ode", "student"}
    assert len(record["losses"]["teacher"]) == 2
    # The teacher's loss weights: the objects' coverage of each latent pixel, stored with the latents.
    data = load_file(tmp_path / "run" / "latents.safetensors")
    assert data["foreground"].shape == (8, 6, 8, 8) == (*data["latents"].shape[:1], *data["latents"].shape[2:])
    assert 0 < data["foreground"].mean() < 1 and data["foreground"].min() >= 0 and data["foreground"].max() <= 1
    assert (tmp_path / "run" / "loss_curves.png").exists()
    # A rerun with the same settings trains nothing again; other settings are refused.
    monkeypatch.setattr(toy_train, "train_vae", lambda *a: pytest.fail("the finished VAE stage ran again"))
    train_toy_pipeline(cfg)
    with pytest.raises(ValueError, match="other settings"):
        train_toy_pipeline(ToyTrainingConfig(**{**cfg.__dict__, "seed": 1}))


@pytest.mark.slow
def test_a_distribution_matching_stage_trains_the_generator_the_pipeline_ships(tmp_path):
    from diffusers import WanTransformer3DModel

    from trl_arcopo import CausalWanPipeline

    cfg = ToyTrainingConfig(**TINY_RUN, output_dir=str(tmp_path / "run"), dmd_steps=3, dmd_batch_size=2)
    train_toy_pipeline(cfg)
    record = json.loads((tmp_path / "run" / "losses.json").read_text())
    assert len(record["losses"]["dmd"]) == 3 and all(map(math.isfinite, record["losses"]["dmd"]))
    shipped = CausalWanPipeline.from_pretrained(tmp_path / "run" / "pipeline").transformer.state_dict()
    for stage, same in (("dmd", True), ("student", False)):
        trained = WanTransformer3DModel.from_pretrained(tmp_path / "run" / stage / "transformer").state_dict()
        assert all(torch.equal(shipped[k], trained[k]) for k in shipped) == same, stage


@pytest.mark.slow
def test_the_dmd_regression_term_is_the_students_loss_on_the_ode_pairs(tmp_path, monkeypatch):
    """`dmd_regression_weight` adds w x the student's ODE-pair loss (its own draws) to the generator's DMD steps, and
    nothing to the critic's."""
    from diffusers import WanTransformer3DModel

    run = tmp_path / "run"
    train_toy_pipeline(ToyTrainingConfig(**TINY_RUN, output_dir=str(run), dmd_steps=2, dmd_batch_size=2))
    captured = {}

    class Captured(Exception):
        pass

    def first_losses(name, modules, loss_fn, **kwargs):
        captured[name] = [loss_fn(step).item() for step in (0, 1)]  # a generator step, then a critic-only step
        raise Captured

    monkeypatch.setattr(toy_train, "_train_stage", first_losses)
    losses = {}
    for weight in (0.0, 2.0):
        cfg = ToyTrainingConfig(**TINY_RUN, output_dir=str(run), dmd_batch_size=2, dmd_regression_weight=weight)
        with pytest.raises(Captured):
            toy_train.train_dmd(cfg, run)
        losses[weight] = captured.pop("dmd")

    student = WanTransformer3DModel.from_pretrained(run / "student" / "transformer")
    text_encoder = toy_train.UMT5EncoderModel.from_pretrained(run / "teacher" / "text_encoder")
    pipe = toy_train._pipeline(student, text_encoder)
    pairs = toy_train._ode_pairs(run, pipe)
    rng, noise = toy_train._stage_rng(cfg.seed, 7, 0)
    index = torch.as_tensor(rng.integers(len(pairs[0]), size=2))
    chunk = int(rng.integers(pairs[0].shape[2] // pipe.config.num_frame_per_block))
    with torch.no_grad():
        expected = toy_train._ode_regression_loss(pipe, pairs, index, chunk, noise, cfg.student_ode_states).item()
    assert expected > 0
    assert losses[2.0][0] == pytest.approx(losses[0.0][0] + 2.0 * expected, rel=1e-5)
    assert losses[2.0][1] == losses[0.0][1]

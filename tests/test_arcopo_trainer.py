"""ARCoPOTrainer on the tiny preset: the SDE baseline, saving, Hub upload, exact resume, failure handling,
semi-on-policy training on a replay buffer. That it learns is tested on the trained toy generator
(test_toy_learning.py): the tiny random generator has nothing a reward could prefer."""

import json
import math
import os
import re
import threading
from pathlib import Path

import pytest
import torch
import transformers
from datasets import Dataset, load_from_disk
from safetensors.torch import load_file
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

import trl_arcopo.arcopo_trainer
from trl_arcopo import copo
from trl_arcopo.arcopo_config import ARCoPOConfig
from trl_arcopo.arcopo_trainer import ARCoPOTrainer, RewardFailure
from trl_arcopo.checkpoints import publish
from trl_arcopo.replay import collect_replay_buffer
from trl_arcopo.rewards import brightness_reward
from trl_arcopo.rollout import rebuild_context
from trl_arcopo.testing import TINY_TRAINING_ARGS, tiny_causal_wan_pipeline
from trl_arcopo.toy import TOY_TRAINING_ARGS, load_toy_pipeline

transformers.logging.set_verbosity_error()
PROMPTS = Dataset.from_dict({"prompt": ["a red car", "a blue sea", "a cat", "a dog"]})


def _config(tmp_path, **overrides) -> ARCoPOConfig:
    defaults = {**TINY_TRAINING_ARGS, "max_steps": 4, "save_strategy": "no", "disable_tqdm": True, "seed": 1}
    return ARCoPOConfig(output_dir=str(tmp_path), **{**defaults, **overrides})


def _rewards(trainer) -> list[float]:
    return [h["reward"] for h in trainer.state.log_history if "reward" in h]


def _lora(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def redness(prompts, videos, **kwargs):
    """A user reward of the documented signature: red minus the other channels."""
    return (videos[:, :, 0] - videos[:, :, 1:].mean(2)).mean(dim=(1, 2, 3)).tolist()


def test_first_update_has_ratio_one_and_metrics(tmp_path):
    trainer = ARCoPOTrainer(
        tiny_causal_wan_pipeline(), ["brightness", redness], args=_config(tmp_path, max_steps=2), train_dataset=PROMPTS
    )
    trainer.train()
    first, second = trainer.state.log_history[0], trainer.state.log_history[1]
    assert abs(first["ratio/min"] - 1) < 1e-4 and abs(first["ratio/max"] - 1) < 1e-4
    assert first["clip_ratio/region_mean"] == 0
    for key in (
        "reward",
        "reward_std",
        "frac_reward_zero_std",
        "rewards/brightness_reward/mean",
        "rewards/redness/std",
        "rollout/pivot",
        "rollout/seconds",
        "step_time",
        "clip_ratio/low_mean",
        "policy/entropy",
        "policy/self_prob",
        "rollout/candidate_distance",
    ):
        assert key in first, key
    assert "reward" not in second  # the second update reuses the first rollout
    assert second["ratio/max"] > 1 + 1e-4  # the policy moved
    # the old policy's shape per sampler step, and the candidates' spread per step
    num_generations, num_steps = TINY_TRAINING_ARGS["num_generations"], len(trainer.pipeline.timesteps)
    for s in range(num_steps):
        assert 1 / num_generations < first[f"policy/self_prob/step_{s}"] < 1
        assert 0 < first[f"policy/entropy/step_{s}"] < math.log(num_generations)
        assert first[f"rollout/candidate_distance/step_{s}"] > 0
    assert first[f"rollout/candidate_distance/step_{num_steps - 1}"] == first["rollout/candidate_distance"]


def test_sde_baseline_runs_end_to_end(tmp_path):
    trainer = ARCoPOTrainer(
        tiny_causal_wan_pipeline(),
        "brightness",
        args=_config(tmp_path, exploration="sde", max_steps=4),
        train_dataset=PROMPTS,
    )
    before = _lora(trainer)
    trainer.train()
    history = trainer.state.log_history
    assert abs(history[0]["ratio/mean"] - 1) < 1e-4 and all(math.isfinite(h["loss"]) for h in history[:-1])
    assert any(not torch.equal(before[n], p) for n, p in _lora(trainer).items())


def test_beta_adds_exact_kl_to_reference(tmp_path):
    trainer = ARCoPOTrainer(
        tiny_causal_wan_pipeline(), "brightness", args=_config(tmp_path, beta=0.1, max_steps=2), train_dataset=PROMPTS
    )
    trainer.train()
    kls = [h["kl"] for h in trainer.state.log_history if "kl" in h]
    # The fresh LoRA (B = 0) is the reference; the first update reads the rollout's context and the reference a
    # rebuilt one (adapters off): the same values up to float rounding.
    assert kls[0] == pytest.approx(0, abs=1e-6)
    assert kls[1] > 0


def _capture_copo_loss(monkeypatch) -> dict:
    captured = {}
    copo_loss = copo.copo_loss

    def spy(*args, **kwargs):
        captured.update(kwargs, log_probs=args[0], old_log_probs=args[1])
        return copo_loss(*args, **kwargs)

    monkeypatch.setattr(copo, "copo_loss", spy)
    return captured


def test_kl_reference_is_the_pipeline_without_its_lora(tmp_path, monkeypatch):
    # Issue 10's audit: the reference anchors were predicted with the adapters off, but on a prefix context rebuilt
    # with them on. π_ref must be what a pipeline without the LoRA computes.
    args = _config(tmp_path, beta=0.1, pivot_strategy="fixed", pivot_index=1)
    trainer = ARCoPOTrainer(tiny_causal_wan_pipeline(), "brightness", args=args, train_dataset=PROMPTS)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in trainer.model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.5 * torch.randn(parameter.shape, generator=gen))
    [item] = trainer._generate_and_score([{"prompt": "a red car"}], mode="train")
    captured = _capture_copo_loss(monkeypatch)
    anchor_generator = torch.Generator()
    anchor_generator.set_state(trainer.rollout_generator.get_state())
    trainer.compute_loss(trainer.model, [item])
    anchors = torch.randperm(args.num_generations, generator=anchor_generator)[: args.num_anchors]

    group, base = item["group"], tiny_causal_wan_pipeline()
    steps = list(range(len(base.timesteps)))
    x_t = group.inputs[:, anchors].flatten(0, 1)
    step_of_row = [s for s in steps for _ in anchors]

    def log_probs(predictions):
        predictions = predictions.unflatten(0, (len(steps), len(anchors)))
        return torch.stack(
            [
                copo.surrogate_log_probs(
                    predictions[s], group.predictions[s], copo.distance_temperature(group.predictions[s], 0.5)
                )
                for s in steps
            ]
        )

    with torch.no_grad():
        context = rebuild_context(base, group.prompt_embeds, group.prefix_latents)
        expected = log_probs(base.predict_x0(base.fork(context, len(x_t)), x_t, step_of_row))
        context_with_lora = rebuild_context(trainer.pipeline, group.prompt_embeds, group.prefix_latents)
        with trainer.pipeline.adapters_disabled():
            rows = trainer.pipeline.fork(context_with_lora, len(x_t))
            before_the_fix = log_probs(trainer.pipeline.predict_x0(rows, x_t, step_of_row))
    torch.testing.assert_close(captured["ref_log_probs"], expected, rtol=1e-5, atol=1e-5)
    assert (before_the_fix - expected).abs().max() > 1e-3  # the test can tell the two contexts apart
    assert (captured["log_probs"].detach() - expected).abs().max() > 1e-3  # and the LoRA matters


def test_first_update_lora_gradient_direction_does_not_depend_on_the_temperature(tmp_path):
    # At ρ = 1 the gradient with respect to an anchor is (2 / (τ·n))·Σ_i A_i·c_i: τ only scales it (Adam then
    # normalises the scale away); so does the LoRA gradient, the anchors' Jacobian times it.
    trainer = ARCoPOTrainer(tiny_causal_wan_pipeline(), "brightness", args=_config(tmp_path), train_dataset=PROMPTS)
    [item] = trainer._generate_and_score([{"prompt": "a red car"}], mode="train")
    parameters = [p for p in trainer.model.parameters() if p.requires_grad]
    state = trainer.rollout_generator.get_state()
    grads = {}
    for factor in (0.1, 1.0):
        trainer.args.distance_temperature = factor
        trainer.rollout_generator.set_state(state)  # the same anchors
        loss = trainer.compute_loss(trainer.model, [item])
        grads[factor] = torch.cat([g.flatten() for g in torch.autograd.grad(loss, parameters)])
    cosine = torch.nn.functional.cosine_similarity(grads[0.1], grads[1.0], dim=0).item()
    assert cosine > 1 - 1e-4
    assert math.isclose(grads[0.1].norm().item() / grads[1.0].norm().item(), 10.0, rel_tol=1e-3)


def test_save_model_writes_a_diffusers_lora_and_card(tmp_path):
    trainer = ARCoPOTrainer(
        tiny_causal_wan_pipeline(), "brightness", args=_config(tmp_path, max_steps=2), train_dataset=PROMPTS
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    files = {p.name for p in (tmp_path / "final").iterdir()}
    assert {
        "pytorch_lora_weights.safetensors",
        "adapter_config.json",
        "training_args.json",
        "README.md",
        "training_curves.png",
    } <= files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)  # no pickle
    card = (tmp_path / "final" / "README.md").read_text()
    assert "library_name: diffusers" in card and "arcopo" in card and "2603.17461" in card
    assert "](training_curves.png)" in card and "`brightness_reward` (weight 1)" in card
    assert "generator the tiny preset `tiny_causal_wan_pipeline(seed=0)`" in card and "base_model" not in card
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    assert (
        f"Trained for 2 optimizer steps: the mean rollout reward went from {rewards[0]:.4g} (first\n1 logged" in card
    )
    assert f"to **{rewards[-1]:.4g}** (last 1)" in card
    # The quick start runs: it builds the base pipeline and loads this LoRA from the folder it was saved to.
    quick_start = re.search(r"```python\n(.*?)\n```", card, re.S).group(1)
    scope = {}
    exec(quick_start.replace('export_to_video(video, "video.mp4", fps=16)', ""), scope)
    assert scope["video"].shape == (21, 32, 32, 3) and scope["pipe"].get_list_adapters() == {
        "transformer": ["default_0"]
    }
    assert (tmp_path / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # written by train()

    # The saved LoRA reproduces the trained transformer in a fresh pipeline.
    kwargs = {
        "prompt_embeds": torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(0)),
        "latents": torch.randn(1, 16, 6, 4, 4, generator=torch.Generator().manual_seed(1)),
        "output_type": "latent",
    }
    torch.manual_seed(0)
    expected = trainer.pipeline(**kwargs).frames
    fresh = tiny_causal_wan_pipeline()
    torch.manual_seed(0)
    base = fresh(**kwargs).frames
    fresh.load_lora_weights(str(tmp_path / "final"))
    torch.manual_seed(0)
    loaded = fresh(**kwargs).frames
    torch.testing.assert_close(loaded, expected, atol=1e-5, rtol=0)
    assert (loaded - base).abs().max() > 1e-5
    bare = tiny_causal_wan_pipeline()  # diffusers' PEFT integration on the transformer alone reads the same file
    bare.transformer.load_lora_adapter(
        str(tmp_path / "final"), weight_name="pytorch_lora_weights.safetensors", prefix="transformer"
    )
    torch.manual_seed(0)
    torch.testing.assert_close(bare(**kwargs).frames, expected, atol=1e-5, rtol=0)


class _FakeHubApi:
    """Stands in for `huggingface_hub.HfApi`: records the calls instead of reaching the network."""

    def __init__(self):
        self.calls = {}

    def create_repo(self, repo_id, **kwargs):
        self.calls["create_repo"] = repo_id
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        self.calls["upload_folder"] = (repo_id, sorted(p.name for p in Path(folder_path).iterdir()))
        self.calls["ignore_patterns"] = kwargs.get("ignore_patterns")
        return type("CommitInfo", (), {"commit_url": "https://example.invalid/commit", "oid": "0" * 40})()


def test_push_to_hub_uploads_the_output_dir(tmp_path, monkeypatch):
    api = _FakeHubApi()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: api)
    args = _config(
        tmp_path,
        max_steps=1,
        push_to_hub=True,
        hub_model_id="me/tiny-arcopo",
        hub_token="hf_secret",
        hub_strategy="end",
    )
    trainer = ARCoPOTrainer(tiny_causal_wan_pipeline(), "brightness", args=args, train_dataset=PROMPTS)
    trainer.train()
    trainer.push_to_hub()
    assert api.calls["create_repo"] == "me/tiny-arcopo"
    repo_id, uploaded = api.calls["upload_folder"]
    assert repo_id == "me/tiny-arcopo"
    assert {"pytorch_lora_weights.safetensors", "adapter_config.json", "README.md"} <= set(uploaded)
    assert "hf_secret" not in (tmp_path / "training_args.json").read_text()  # tokens are never written


def test_save_uses_a_gathered_state_dict(tmp_path):
    """Under FSDP `Trainer.save_model` hands `_save` the full state dict (the module holds shards): the LoRA must
    come from that state dict."""
    trainer = ARCoPOTrainer(tiny_causal_wan_pipeline(), "brightness", args=_config(tmp_path), train_dataset=PROMPTS)
    full = {k: torch.full_like(v, 0.5) for k, v in trainer.model.state_dict().items()}
    trainer._save(str(tmp_path / "gathered"), state_dict=full)
    saved = load_file(tmp_path / "gathered" / "pytorch_lora_weights.safetensors")
    assert saved and all(torch.equal(v, torch.full_like(v, 0.5)) for v in saved.values())


def test_the_config_seed_decides_the_initial_lora(tmp_path):
    """Two trainers with one `seed` start from the same LoRA whatever the global RNG did before (the adapter is created
    before `Trainer.__init__` seeds), and another seed gives another one: same-seed runs are reproducible."""

    def initial_lora(seed: int, global_seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(global_seed)
        trainer = ARCoPOTrainer(
            tiny_causal_wan_pipeline(), "brightness", args=_config(tmp_path, seed=seed), train_dataset=PROMPTS
        )
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}

    first, second, other = initial_lora(0, 1), initial_lora(0, 2), initial_lora(1, 1)
    assert first.keys() == second.keys() and any("lora_A" in name for name in first)
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert any(not torch.equal(first[name], other[name]) for name in first if "lora_A" in name)


def test_resume_from_checkpoint_continues_exactly(tmp_path):
    common = {"max_steps": 6, "save_strategy": "steps", "save_steps": 3}  # step 3 is mid-rollout (reused buffer)
    full = ARCoPOTrainer(
        tiny_causal_wan_pipeline(), "brightness", args=_config(tmp_path / "full", **common), train_dataset=PROMPTS
    )
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert (checkpoint / "pytorch_lora_weights.safetensors").exists() and (checkpoint / "optimizer.pt").exists()
    assert json.loads((checkpoint / "rank0_arcopo_state.json").read_text())["step"] == 3

    resumed = ARCoPOTrainer(
        tiny_causal_wan_pipeline(), "brightness", args=_config(tmp_path / "resumed", **common), train_dataset=PROMPTS
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    expected, got = _lora(full), _lora(resumed)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0, msg=name)
    final = load_file(tmp_path / "full" / "checkpoint-6" / "pytorch_lora_weights.safetensors")
    assert len(final) == len(expected)


def test_checkpoints_are_atomic(tmp_path, monkeypatch):
    """A run killed while writing checkpoint-4 leaves checkpoint-2 as the last checkpoint, complete; the staging
    folder is cleaned by the next save and never looks like a checkpoint."""
    args = _config(tmp_path, max_steps=6, save_strategy="steps", save_steps=2)
    trainer = ARCoPOTrainer(tiny_causal_wan_pipeline(), "brightness", args=args, train_dataset=PROMPTS)
    save_state = ARCoPOTrainer._save_trainer_state

    def killed_at_step_4(self, checkpoint):
        if self.state.global_step == 4:
            raise KeyboardInterrupt("killed while saving")
        save_state(self, checkpoint)

    monkeypatch.setattr(ARCoPOTrainer, "_save_trainer_state", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")
    assert {"pytorch_lora_weights.safetensors", "optimizer.pt", "trainer_state.json", "rank0_arcopo_state.json"} <= {
        p.name for p in (tmp_path / "checkpoint-2").iterdir()
    }
    assert (tmp_path / ".staging" / "checkpoint-4").is_dir()  # the partial write, out of the way

    monkeypatch.setattr(ARCoPOTrainer, "_save_trainer_state", save_state)
    resumed = ARCoPOTrainer(tiny_causal_wan_pipeline(), "brightness", args=args, train_dataset=PROMPTS)
    resumed.train(resume_from_checkpoint=True)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert not (tmp_path / ".staging").exists()
    assert json.loads((tmp_path / "checkpoint-4" / "rank0_arcopo_state.json").read_text())["step"] == 4


def test_publish_fsyncs_every_file_and_folder_before_the_rename(tmp_path, monkeypatch):
    staged = tmp_path / ".staging" / "checkpoint-2"
    (staged / "sub").mkdir(parents=True)
    for name in ("a.safetensors", "trainer_state.json", "sub/b.json"):
        (staged / name).write_text(name)
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(
        os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))) or fsync(fd)
    )
    monkeypatch.setattr(os, "replace", lambda *paths: events.append(("replace", str(paths[1]))) or replace(*paths))
    publish(str(staged), str(tmp_path / "checkpoint-2"))
    rename = events.index(("replace", str(tmp_path / "checkpoint-2")))
    synced_before = {path for kind, path in events[:rename] if kind == "fsync"}
    assert {str(staged / name) for name in ("a.safetensors", "trainer_state.json", "sub/b.json")} <= synced_before
    assert {str(staged), str(staged / "sub")} <= synced_before
    assert events[rename + 1 :] == [("fsync", str(tmp_path))]  # the rename itself is durable
    assert (tmp_path / "checkpoint-2" / "sub" / "b.json").read_text() == "sub/b.json" and not staged.exists()


def _failing_reward(prompts, videos, **kwargs):
    raise ConnectionError("reward server down")


def _nan_reward(prompts, videos, **kwargs):
    return [float("nan")] * len(prompts)


def _short_reward(prompts, videos, **kwargs):
    return [1.0]


@pytest.mark.parametrize("reward", [_failing_reward, _nan_reward, _short_reward])
def test_failing_reward_raises_after_saving_a_checkpoint(tmp_path, reward):
    trainer = ARCoPOTrainer(tiny_causal_wan_pipeline(), reward, args=_config(tmp_path), train_dataset=PROMPTS)
    with pytest.raises(RewardFailure, match="reward_error='skip_group'"):
        trainer.train()
    assert (tmp_path / "checkpoint-0" / "pytorch_lora_weights.safetensors").exists()


def test_failing_reward_skips_the_group_when_asked(tmp_path):
    calls = {"n": 0}

    def flaky(prompts, videos, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise TimeoutError("slow reward model")
        return videos.mean(dim=(1, 2, 3, 4)).tolist()

    trainer = ARCoPOTrainer(
        tiny_causal_wan_pipeline(), flaky, args=_config(tmp_path, reward_error="skip_group"), train_dataset=PROMPTS
    )
    trainer.train()
    failed = [h["rewards/failed_groups"] for h in trainer.state.log_history if "rewards/failed_groups" in h]
    assert failed[0] == 1.0 and failed[1] == 0.0
    assert trainer.state.log_history[0]["loss"] == 0  # zero advantages: nothing to learn from the skipped group


class _LoraPerStep(TrainerCallback):
    """Records the trainable weights and Adam's step count after every optimizer step."""

    def __init__(self):
        self.loras, self.adam_steps = [], []

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.loras.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        self.adam_steps.append(sorted({float(s["step"]) for s in optimizer.state.values()}))


def test_nonfinite_losses_skip_the_update_and_stop_with_a_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}

    def nan_after_the_first_update(*args, **kwargs):
        loss, stats = original(*args, **kwargs)
        calls["n"] += 1
        return (loss if calls["n"] == 1 else loss * float("nan")), stats

    original = copo.copo_loss
    monkeypatch.setattr(copo, "copo_loss", nan_after_the_first_update)
    steps = _LoraPerStep()
    trainer = ARCoPOTrainer(
        tiny_causal_wan_pipeline(),
        "brightness",
        args=_config(tmp_path, max_steps=10, max_consecutive_nonfinite_losses=3, weight_decay=0.1),
        train_dataset=PROMPTS,
        callbacks=[steps],
    )
    trainer.train()
    assert trainer.state.global_step == 4  # one update, then 3 non-finite losses in a row
    assert (tmp_path / "checkpoint-4" / "pytorch_lora_weights.safetensors").exists()
    # After a real update Adam has momentum and weight decay applies: a zero gradient would still move the LoRA.
    for lora in steps.loras[1:]:
        assert all(torch.equal(steps.loras[0][n], p) for n, p in lora.items())
    assert steps.adam_steps == [[1.0]] * 4
    assert [h["update_skipped"] for h in trainer.state.log_history[:4]] == [0.0, 1.0, 1.0, 1.0]


def test_an_update_whose_groups_were_all_skipped_changes_nothing(tmp_path):
    calls = {"n": 0}

    def down_for_the_second_rollout(prompts, videos, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise ConnectionError("reward server down")
        return videos.mean(dim=(1, 2, 3, 4)).tolist()

    steps = _LoraPerStep()
    args = _config(tmp_path, max_steps=3, num_iterations=1, reward_error="skip_group", weight_decay=0.1)
    trainer = ARCoPOTrainer(
        tiny_causal_wan_pipeline(), down_for_the_second_rollout, args=args, train_dataset=PROMPTS, callbacks=[steps]
    )
    trainer.train()
    first, skipped, third = steps.loras
    assert all(torch.equal(first[n], p) for n, p in skipped.items())  # bitwise: no Adam momentum, no weight decay
    assert any(not torch.equal(skipped[n], p) for n, p in third.items())
    assert steps.adam_steps == [[1.0], [1.0], [2.0]]
    assert [h["rewards/failed_groups"] for h in trainer.state.log_history[:3]] == [0.0, 1.0, 0.0]


@pytest.mark.parametrize(
    ("fails", "ceiling", "message"),
    [
        (lambda n: True, {"max_consecutive_skipped_groups": 2}, "2 rollout groups in a row were skipped"),
        (
            lambda n: n % 2 == 1,
            {"max_consecutive_skipped_groups": 3, "max_skipped_group_fraction": 0.5},
            "2 of 3 rollout groups were skipped, more than `max_skipped_group_fraction`=0.5",
        ),
    ],
)
def test_skipped_groups_past_the_ceiling_stop_with_a_checkpoint(tmp_path, fails, ceiling, message):
    calls = {"n": 0}

    def flaky(prompts, videos, **kwargs):
        calls["n"] += 1
        if fails(calls["n"]):
            raise ConnectionError("reward server down")
        return videos.mean(dim=(1, 2, 3, 4)).tolist()

    args = _config(tmp_path, max_steps=20, num_iterations=1, reward_error="skip_group", **ceiling)
    trainer = ARCoPOTrainer(tiny_causal_wan_pipeline(), flaky, args=args, train_dataset=PROMPTS)
    with pytest.raises(RewardFailure, match=re.escape(message)) as info:
        trainer.train()
    assert "(last error: reward 'flaky' raised ConnectionError: reward server down)" in str(info.value)
    step = trainer.state.global_step
    assert step == calls["n"] - 1  # stopped at the rollout that crossed the ceiling
    assert (tmp_path / f"checkpoint-{step}" / "pytorch_lora_weights.safetensors").exists()


def test_evaluate_scores_without_training(tmp_path):
    trainer = ARCoPOTrainer(
        tiny_causal_wan_pipeline(),
        ["brightness", redness],
        args=_config(tmp_path),
        eval_dataset=PROMPTS.select(range(2)),
    )
    before = _lora(trainer)
    metrics = trainer.evaluate()
    assert 0 < metrics["eval_reward"] and "eval_rewards/redness/mean" in metrics
    assert trainer.evaluate()["eval_reward"] == metrics["eval_reward"]  # fixed seeds per prompt
    assert all(torch.equal(before[n], p) for n, p in _lora(trainer).items())


class HeadsJudge:
    """A reward returning heads, like VideoAlign: VQ (brightness), TA (redness) and Overall (their sum)."""

    __name__ = "judge"

    def __call__(self, prompts, videos, **kwargs):
        vq, ta = torch.tensor(brightness_reward(prompts, videos)), torch.tensor(redness(prompts, videos))
        self.last = {"VQ": vq, "TA": ta, "Overall": vq + ta}
        return {head: values.tolist() for head, values in self.last.items()}


def test_reward_heads_weighted_by_column(tmp_path):
    judge = HeadsJudge()
    weights = {"judge:VQ": 1.0, "judge:TA": 2.0}  # Overall not listed: weight 0
    trainer = ARCoPOTrainer(
        tiny_causal_wan_pipeline(), judge, args=_config(tmp_path, reward_weights=weights), train_dataset=PROMPTS
    )
    (item,) = trainer._generate_and_score([{"prompt": "a red car"}], mode="train")
    assert trainer.reward_columns == ["judge:VQ", "judge:TA", "judge:Overall"]
    assert trainer.reward_column_weights.tolist() == [1.0, 2.0, 0.0]
    expected = judge.last["VQ"].double() + 2 * judge.last["TA"].double()
    torch.testing.assert_close(item["rewards"], expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(item["advantages"], copo.group_advantages(expected[None])[0].float())
    logged = trainer._metrics["train"]
    assert logged["rewards/judge:TA/mean"] == [pytest.approx(judge.last["TA"].double().mean().item())]
    assert logged["reward"] == [pytest.approx(expected.mean().item())]


def test_rewards_overlap_the_next_rollout_and_match_the_synchronous_path(tmp_path, monkeypatch):
    events, second_rollout_started = [], threading.Event()

    def traced(prompts, videos, **kwargs):
        events.append(("reward", threading.current_thread().name, torch.is_grad_enabled()))
        if overlap:  # the first group's scoring can only finish once the second rollout runs concurrently
            assert second_rollout_started.wait(timeout=120)
        return redness(prompts, videos)

    rollout = ARCoPOTrainer._rollout_group

    def traced_rollout(self, row):
        events.append(("rollout", threading.current_thread().name, None))
        if sum(kind == "rollout" for kind, _, _ in events) == 2:
            second_rollout_started.set()
        return rollout(self, row)

    monkeypatch.setattr(ARCoPOTrainer, "_rollout_group", traced_rollout)
    rows = [{"prompt": p} for p in PROMPTS["prompt"][:3]]
    results = {}
    for overlap in (True, False):
        args = _config(tmp_path / str(overlap), overlap_rewards=overlap)
        trainer = ARCoPOTrainer(tiny_causal_wan_pipeline(), traced, args=args, train_dataset=PROMPTS)
        events.clear()
        second_rollout_started.clear()
        results[overlap] = trainer._generate_and_score(rows, mode="train")
        kinds = [kind for kind, _, _ in events]
        rewards = [event for event in events if event[0] == "reward"]
        assert len(rewards) == 3 and not any(grad for _, _, grad in rewards)  # scored without autograd
        if overlap:  # in the reward thread, while the next group is rolled out
            assert {thread for _, thread, _ in rewards} == {"arcopo-rewards_0"}
        else:
            assert {thread for _, thread, _ in rewards} == {threading.current_thread().name}
            assert kinds == ["rollout", "reward"] * 3
    for a, b in zip(results[True], results[False], strict=True):
        assert torch.equal(a["advantages"], b["advantages"]) and torch.equal(a["rewards"], b["rewards"])
        assert torch.equal(a["group"].predictions, b["group"].predictions)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"reward_funcs": "nonexistent"}, "Unknown reward 'nonexistent'"),
        ({"reward_funcs": []}, "`reward_funcs` is empty"),
        (
            {"args": {"num_frames": 10}},
            "`num_frames` (10) does not split into whole chunks of this pipeline (VAE temporal stride 4, 3 latent "
            "frames per chunk): use 9 or 21 (any 9 + 12·k).",
        ),
        ({"args": {"num_frames": 17}}, "`num_frames` (17) does not split into whole chunks"),
        ({"args": {"num_frames": 5}}, "per chunk): use 9 (any 9 + 12·k)."),
        (
            {"args": {"height": 40}},
            "`height` (40) must be a positive multiple of 16 for this pipeline (VAE spatial stride 8, 2x2 patches): "
            "use 32 or 48.",
        ),
        ({"args": {"width": 8}}, "`width` (8) must be a positive multiple of 16"),
        # The size is checked before anything heavy: here before the rewards are loaded.
        ({"reward_funcs": "nonexistent", "args": {"num_frames": 10}}, "`num_frames` (10) does not split"),
        ({"args": {"train_steps": [4]}}, "`train_steps`"),
        ({"args": {"reward_weights": {"sharpness": 1.0}}}, "`reward_weights` keys ['sharpness'] name no reward"),
        (
            {"args": {"pivot_strategy": "fixed", "pivot_index": 2}},
            "`pivot_index` (2) is out of range: a video of `num_frames`=21 has 2 chunks on this pipeline; use 0 .. 1.",
        ),
        (
            {"args": {"pivot_strategy": "weighted", "pivot_weights": [1.0, 1.0, 1.0]}},
            "`pivot_weights` has 3 weights, but a video of `num_frames`=21 has 2 chunks on this pipeline; pass one "
            "weight per chunk.",
        ),
        ({"train_dataset": Dataset.from_dict({"text": ["a"]})}, "needs a 'prompt' column"),
        (
            {"train_dataset": Dataset.from_dict({})},
            "`train_dataset` needs a 'prompt' column (one rollout group per prompt); it has []",
        ),
        ({"eval_dataset": Dataset.from_dict({"text": ["a"]})}, "`eval_dataset` needs a 'prompt' column"),
        (
            {"train_dataset": Dataset.from_dict({"prompt": []})},
            "`train_dataset` has 0 prompt(s), fewer than one optimizer step needs: per_device_train_batch_size (1) "
            "x processes (1) x gradient_accumulation_steps (1) = 1",
        ),
        (
            {"train_dataset": PROMPTS.select([0]), "args": {"per_device_train_batch_size": 2}},
            "`train_dataset` has 1 prompt(s), fewer than one optimizer step needs: per_device_train_batch_size (2)",
        ),
        (
            {"train_dataset": PROMPTS.select(range(3)), "args": {"gradient_accumulation_steps": 4}},
            "gradient_accumulation_steps (4) = 4, one rollout group each. Add prompts",
        ),
    ],
)
def test_bad_trainer_input(tmp_path, kwargs, message):
    arguments = {"reward_funcs": "brightness", "train_dataset": PROMPTS, **kwargs}
    arguments["args"] = _config(tmp_path, **kwargs.get("args", {}))
    with pytest.raises(ValueError, match=re.escape(message)):
        ARCoPOTrainer(tiny_causal_wan_pipeline(), **arguments)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_frames": 12}, None),  # 12 latent frames = 4 chunks: what the toy generator was trained on
        ({"num_frames": 12, "pivot_strategy": "fixed", "pivot_index": 3}, None),
        ({"num_frames": 12, "height": 24, "width": 40}, None),  # multiples of 8 (2x VAE, 4x4 patches)
        (
            {"num_frames": 10},
            "`num_frames` (10) does not split into whole chunks of this pipeline (VAE temporal stride 1, 3 latent "
            "frames per chunk): use 9 or 12 (any 3 + 3·k).",
        ),
        ({"height": 20}, "`height` (20) must be a positive multiple of 8 for this pipeline"),
        (
            {"num_frames": 12, "pivot_strategy": "fixed", "pivot_index": 4},
            "`pivot_index` (4) is out of range: a video of `num_frames`=12 has 4 chunks on this pipeline; use 0 .. 3.",
        ),
    ],
)
def test_video_size_is_checked_against_the_pipelines_vae(tmp_path, overrides, message):
    """The toy generator's VAE keeps every frame (temporal stride 1): its sizes are not Wan2.1's."""
    args = ARCoPOConfig(str(tmp_path), **{**TOY_TRAINING_ARGS, **overrides, "max_steps": 1})
    if message is not None:
        with pytest.raises(ValueError, match=re.escape(message)):
            ARCoPOTrainer(load_toy_pipeline(), "toy_size", args=args, train_dataset=PROMPTS)
        return
    trainer = ARCoPOTrainer(load_toy_pipeline(), "toy_size", args=args, train_dataset=PROMPTS)
    frames, height, width = args.num_frames, args.height, args.width
    assert (trainer.num_chunks, *trainer.latent_shape[1:]) == (frames // 3, frames, height // 2, width // 2)


@pytest.mark.parametrize("name", ["train_dataset", "eval_dataset"])
def test_a_plain_list_of_prompts_is_refused_with_the_fix(tmp_path, name):
    with pytest.raises(
        TypeError, match=re.escape("got list; wrap a list of prompts with `datasets.Dataset.from_dict(")
    ):
        ARCoPOTrainer(tiny_causal_wan_pipeline(), "brightness", args=_config(tmp_path), **{name: ["a red car"]})


def test_a_policy_generating_nan_stops_with_a_clear_error(tmp_path):
    trainer = ARCoPOTrainer(tiny_causal_wan_pipeline(), "brightness", args=_config(tmp_path), train_dataset=PROMPTS)
    with torch.no_grad():
        trainer.pipeline.transformer.proj_out.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite latents .* in the rollout group of 'a red car'"):
        trainer._generate_and_score([{"prompt": "a red car"}], mode="train")


def test_model_given_as_a_path_and_sample_videos_logged(tmp_path):
    tiny_causal_wan_pipeline().save_pretrained(tmp_path / "pipeline")
    args = _config(
        tmp_path / "out", max_steps=2, log_videos_steps=1, num_videos_to_log=2, model_init_kwargs={"dtype": "float32"}
    )
    trainer = ARCoPOTrainer(str(tmp_path / "pipeline"), "brightness", args=args, train_dataset=PROMPTS)
    assert trainer.pipeline.transformer.dtype == torch.float32
    trainer.train()
    samples = sorted((tmp_path / "out" / "samples").rglob("sample-*"))
    assert [p.parent.name for p in samples] == ["step-0", "step-0"]  # one rollout in 2 steps (num_iterations=2)
    assert all(p.stat().st_size > 0 for p in samples)


def test_evaluation_during_training_keeps_train_and_eval_metrics_apart_and_loads_the_best(tmp_path):
    args = _config(
        tmp_path,
        max_steps=2,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="eval_reward",
    )
    trainer = ARCoPOTrainer(
        tiny_causal_wan_pipeline(),
        "brightness",
        args=args,
        train_dataset=PROMPTS,
        eval_dataset=PROMPTS.select(range(1)),
    )
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_reward" in h]
    trains = [h for h in trainer.state.log_history if "loss" in h]
    assert len(evals) == 2 and len(trains) == 2
    assert all("ratio/mean" not in h and "eval_rewards/failed" in h for h in evals)
    assert "ratio/mean" in trains[0] and "reward" in trains[0]
    # The best checkpoint is the published folder (not its staging copy), and its LoRA is what the model ends with.
    best = 1 + max(range(2), key=lambda i: evals[i]["eval_reward"])
    assert trainer.state.best_model_checkpoint == str(tmp_path / f"checkpoint-{best}")
    saved = load_file(tmp_path / f"checkpoint-{best}" / "pytorch_lora_weights.safetensors")
    lora = {f"transformer.{k.replace('.on_policy', '')}": v for k, v in _lora(trainer).items()}
    assert saved.keys() == lora.keys() and all(torch.equal(saved[k], lora[k]) for k in saved)


# ---------------------------------------------------------------------------------------------- semi-on-policy


@pytest.fixture(scope="module")
def replay_dir(tmp_path_factory) -> Path:
    """A buffer of 4 tiny groups (G=8) from the reference policy, scored with brightness and redness."""
    buffer = collect_replay_buffer(
        tiny_causal_wan_pipeline(),
        PROMPTS["prompt"],
        [brightness_reward, redness],
        num_groups=4,
        num_generations=8,
        num_frames=21,
        height=32,
        width=32,
        seed=5,
        progress_bar=False,
    )
    path = tmp_path_factory.mktemp("replay") / "buffer"
    buffer.save_to_disk(path)
    return path


def _semi_config(tmp_path, replay_dir, **overrides) -> ARCoPOConfig:
    return _config(tmp_path, training_mode="semi_on_policy", replay_dataset=str(replay_dir), **overrides)


def test_semi_on_policy_trains_on_the_buffer_without_generating(tmp_path, replay_dir, monkeypatch):
    def no_generation(*args, **kwargs):
        raise AssertionError("semi-on-policy training must not generate")

    monkeypatch.setattr(trl_arcopo.arcopo_trainer, "generate_group", no_generation)
    args = _semi_config(tmp_path, replay_dir, max_steps=4, per_device_train_batch_size=2, reward_weights=[1.0, 2.0])
    trainer = ARCoPOTrainer(tiny_causal_wan_pipeline(), ["brightness", redness], args=args)
    assert list(trainer.model.peft_config) == ["semi"]
    before = _lora(trainer)
    trainer.train()
    first = trainer.state.log_history[0]
    # π_old is the recorded reference prediction: the fresh adapter reproduces it for every group of the batch.
    assert abs(first["ratio/min"] - 1) < 1e-4 and abs(first["ratio/max"] - 1) < 1e-4
    assert any(not torch.equal(before[n], p) for n, p in _lora(trainer).items())

    # The logged rewards are the stored ones: the two batches of 2 groups cover the 4 groups of the buffer once.
    logged = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    rows = load_from_disk(str(replay_dir))["rewards"]
    stored = torch.tensor([[r["brightness_reward"], r["redness"]] for r in rows], dtype=torch.float64)  # [4, 2, G]
    assert len(logged) == 2
    assert sum(logged) / 2 == pytest.approx((stored[:, 0] + 2 * stored[:, 1]).mean().item(), abs=1e-12)


def _max_ratio_deviation(history: list[dict]) -> list[float]:
    return [max(h["ratio/max"] - 1, 1 - h["ratio/min"]) for h in history if "ratio/max" in h]


def test_semi_on_policy_ratio_clip_is_the_trust_region(tmp_path, replay_dir):
    """With a tiny ε the clipped surrogate stops the drift away from π_ref; without the clip it keeps growing."""
    runs = {}
    for epsilon in (1e-6, 1e3):
        args = _semi_config(
            tmp_path / str(epsilon),
            replay_dir,
            max_steps=8,
            per_device_train_batch_size=2,
            epsilon=epsilon,
            optim="sgd",  # no momentum: an update follows the current gradient only
            learning_rate=1e-3,
        )
        trainer = ARCoPOTrainer(tiny_causal_wan_pipeline(), "brightness", args=args)
        before = _lora(trainer)
        trainer.train()
        drift = sum((p - before[n]).pow(2).sum() for n, p in _lora(trainer).items()).sqrt().item()
        runs[epsilon] = (trainer.state.log_history, drift)

    clipped, clipped_drift = runs[1e-6]
    free, free_drift = runs[1e3]
    deviation, free_deviation = _max_ratio_deviation(clipped), _max_ratio_deviation(free)
    assert deviation[0] < 1e-4 and free_deviation[0] < 1e-4
    assert all(h["clip_ratio/region_mean"] > 0 for h in clipped[1:-1])  # every later update is clipped
    # After the first (unconstrained) step the clipped policy stays where one step took it (measured on the groups of
    # each update, which differ: within 10 %) ...
    assert max(deviation[2:]) <= 1.1 * deviation[1], deviation
    # ... while the unclipped one keeps moving away from the reference.
    assert free_deviation[-1] > 2 * free_deviation[1], free_deviation
    assert clipped_drift < free_drift / 2


def test_semi_on_policy_resume_is_exact(tmp_path, replay_dir):
    common = {"max_steps": 6, "save_strategy": "steps", "save_steps": 3}  # step 3 is mid-rollout (reused buffer)
    full = ARCoPOTrainer(
        tiny_causal_wan_pipeline(), "brightness", args=_semi_config(tmp_path / "full", replay_dir, **common)
    )
    full.train()
    resumed = ARCoPOTrainer(
        tiny_causal_wan_pipeline(), "brightness", args=_semi_config(tmp_path / "resumed", replay_dir, **common)
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    expected, got = _lora(full), _lora(resumed)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0, msg=name)
    pivots = [h["rollout/pivot"] for h in full.state.log_history if "rollout/pivot" in h]
    resumed_pivots = [h["rollout/pivot"] for h in resumed.state.log_history if "rollout/pivot" in h]
    assert resumed_pivots == pivots[-len(resumed_pivots) :]  # the same buffer rows, in the same order


def test_semi_on_policy_refuses_a_mismatched_buffer(tmp_path, replay_dir):
    args = _semi_config(tmp_path, replay_dir, num_generations=4, noise_sigma=0.25, height=64)
    with pytest.raises(ValueError) as info:
        ARCoPOTrainer(tiny_causal_wan_pipeline(), "brightness", args=args)
    message = str(info.value)
    assert "(4 difference(s))" in message
    for line in (
        "num_generations: buffer 8, this run 4",
        "noise_sigma: buffer 0.5, this run 0.25",
        "height: buffer 32, this run 64",
        "latent_shape: buffer [16, 6, 4, 4], this run [16, 6, 8, 4]",
    ):
        assert line in message, message
    with pytest.raises(ValueError, match="buffer 3, this run 2"):  # the pipeline's chunk size
        ARCoPOTrainer(
            tiny_causal_wan_pipeline(num_frame_per_block=2), "brightness", args=_semi_config(tmp_path, replay_dir)
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"train_dataset": PROMPTS}, "do not pass a `train_dataset`"),
        ({"reward_funcs": "sharpness"}, "no rewards for 'sharpness_reward'"),
        ({"args": {"per_device_train_batch_size": 5}}, "has 4 group(s), fewer than one optimizer step needs"),
    ],
)
def test_semi_on_policy_bad_input(tmp_path, replay_dir, kwargs, message):
    arguments = {"reward_funcs": "brightness", **{k: v for k, v in kwargs.items() if k != "args"}}
    args = _semi_config(tmp_path, replay_dir, **kwargs.get("args", {}))
    with pytest.raises(ValueError, match=re.escape(message)):
        ARCoPOTrainer(tiny_causal_wan_pipeline(), args=args, **arguments)

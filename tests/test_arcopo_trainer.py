"""ARCoPOTrainer on the tiny preset: learning, the SDE baseline, saving, Hub upload, exact resume, failure handling."""

import json
import math
from pathlib import Path

import pytest
import torch
import transformers
from datasets import Dataset
from safetensors.torch import load_file

from trl_arcopo import copo
from trl_arcopo.arcopo_config import ARCoPOConfig
from trl_arcopo.arcopo_trainer import ARCoPOTrainer, RewardFailure
from trl_arcopo.testing import TINY_TRAINING_ARGS, tiny_causal_wan_pipeline

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


@pytest.mark.slow
@pytest.mark.parametrize("reward", ["brightness", redness])
def test_arcopo_raises_the_reward_and_lr0_does_not(tmp_path, reward):
    iterations = 30
    trained = ARCoPOTrainer(
        tiny_causal_wan_pipeline(),
        reward,
        args=_config(tmp_path / "a", max_steps=2 * iterations),
        train_dataset=PROMPTS,
    )
    trained.train()
    frozen = ARCoPOTrainer(
        tiny_causal_wan_pipeline(),
        reward,
        args=_config(tmp_path / "b", max_steps=2 * iterations, learning_rate=0.0),
        train_dataset=PROMPTS,
    )
    frozen.train()
    rewards, baseline = _rewards(trained), _rewards(frozen)
    assert len(rewards) == iterations  # one rollout per iteration, reused for num_iterations=2 updates
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    frozen_first, frozen_last = sum(baseline[:5]) / 5, sum(baseline[-5:]) / 5
    # Noise of the frozen run between its first and last iterations is ~0.003 on this preset.
    margin = 0.006
    assert last - first > margin, rewards
    assert abs(frozen_last - frozen_first) < margin, baseline
    assert last - frozen_last > margin


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
    ):
        assert key in first, key
    assert "reward" not in second  # the second update reuses the first rollout
    assert second["ratio/max"] > 1 + 1e-4  # the policy moved


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
    assert kls[0] == 0  # the fresh LoRA (B = 0) is the reference
    assert kls[1] > 0


def test_save_model_writes_a_diffusers_lora_and_card(tmp_path):
    trainer = ARCoPOTrainer(
        tiny_causal_wan_pipeline(), "brightness", args=_config(tmp_path, max_steps=2), train_dataset=PROMPTS
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    files = {p.name for p in (tmp_path / "final").iterdir()}
    assert {
        "pytorch_lora_weights.safetensors",
        "adapter_model.safetensors",
        "adapter_config.json",
        "training_args.json",
        "README.md",
    } <= files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)  # no pickle
    card = (tmp_path / "final" / "README.md").read_text()
    assert "library_name: diffusers" in card and "arcopo" in card and "2603.17461" in card
    assert "load_lora_weights" in card

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


def test_nonfinite_losses_stop_with_a_checkpoint(tmp_path, monkeypatch):
    def nan_loss(*args, **kwargs):
        loss, stats = original(*args, **kwargs)
        return loss * float("nan"), stats

    original = copo.copo_loss
    monkeypatch.setattr(copo, "copo_loss", nan_loss)
    trainer = ARCoPOTrainer(
        tiny_causal_wan_pipeline(),
        "brightness",
        args=_config(tmp_path, max_steps=10, max_consecutive_nonfinite_losses=3),
        train_dataset=PROMPTS,
    )
    before = _lora(trainer)
    trainer.train()
    assert trainer.state.global_step == 3
    assert (tmp_path / "checkpoint-3" / "pytorch_lora_weights.safetensors").exists()
    assert all(torch.equal(before[n], p) for n, p in _lora(trainer).items())  # skipped updates changed nothing


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


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"reward_funcs": "nonexistent"}, "Unknown reward 'nonexistent'"),
        ({"reward_funcs": []}, "`reward_funcs` is empty"),
        ({"args": {"num_frames": 17}}, "not a multiple of the pipeline's chunk size"),
        ({"args": {"train_steps": [4]}}, "`train_steps`"),
        ({"args": {"reward_weights": [1.0, 2.0]}}, "`reward_weights` has 2 entries for 1 reward"),
        ({"args": {"pivot_strategy": "fixed", "pivot_index": 2}}, "`pivot_index`=2 but videos have 2 chunks"),
        ({"train_dataset": Dataset.from_dict({"text": ["a"]})}, "needs a 'prompt' column"),
    ],
)
def test_bad_trainer_input(tmp_path, kwargs, message):
    arguments = {"reward_funcs": "brightness", "train_dataset": PROMPTS, **kwargs}
    arguments["args"] = _config(tmp_path, **kwargs.get("args", {}))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        ARCoPOTrainer(tiny_causal_wan_pipeline(), **arguments)


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


def test_evaluation_during_training_keeps_train_and_eval_metrics_apart(tmp_path):
    args = _config(tmp_path, max_steps=2, eval_strategy="steps", eval_steps=1)
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
    assert all("ratio/mean" not in h and "eval_rewards/failed_groups" in h for h in evals)
    assert "ratio/mean" in trains[0] and "reward" in trains[0]

"""evaluate_pipeline: fixed per-prompt seeds, reward columns and means, adapters, reward failures, bad input."""

import math

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from trl_arcopo.evaluation import EvaluationResult, evaluate_pipeline
from trl_arcopo.rewards import brightness_reward
from trl_arcopo.testing import tiny_causal_wan_pipeline

PROMPTS = ["a red car", "a blue sea", "a cat on a table", "a dog in the park"]
SIZE = {"num_frames": 9, "height": 32, "width": 32}


def heads(prompts, videos, **kwargs):
    """Two heads; no score for the second video's 'b' head."""
    means = videos.mean(dim=(1, 2, 3, 4)).tolist()
    return {"a": means, "b": [None if i == 1 else 2 * m for i, m in enumerate(means)]}


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_causal_wan_pipeline()
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v"], init_lora_weights=False)
    pipe.transformer.add_adapter(config, adapter_name="semi")
    return pipe


def evaluate(pipe, prompts=PROMPTS, rewards=("brightness", heads), **kwargs) -> EvaluationResult:
    return evaluate_pipeline(pipe, prompts, list(rewards), **{**SIZE, "seed": 7, "progress_bar": False, **kwargs})


def test_columns_means_and_per_prompt_seeds(pipe):
    pipe.set_progress_bar_config(leave=False)
    result = evaluate(pipe, batch_size=3, adapters={"semi": 1.0})
    assert pipe._progress_bar_config == {"leave": False}  # the pipeline's own bar setting is restored

    table = result.table
    assert table.column_names == ["prompt", "seed", "brightness_reward", "heads:a", "heads:b"]
    assert table["prompt"] == PROMPTS and table["seed"] == [7, 8, 9, 10]
    assert list(result.means) == ["brightness_reward", "heads:a", "heads:b"]
    for column in result.means:
        finite = [v for v in table[column] if not math.isnan(v)]
        assert result.means[column] == pytest.approx(sum(finite) / len(finite), abs=0, rel=1e-12)
    assert math.isnan(table["heads:b"][1]) and len([v for v in table["heads:b"] if not math.isnan(v)]) == 3

    # Prompt i's video is the one generated alone from a generator seeded with seed + i.
    video = pipe(PROMPTS[2], **SIZE, generator=[torch.Generator().manual_seed(9)], output_type="pt").frames
    assert table["brightness_reward"][2] == pytest.approx(brightness_reward([PROMPTS[2]], video)[0], abs=1e-6)
    assert table["heads:a"][2] == pytest.approx(video.mean().item(), abs=1e-6)

    markdown = result.to_markdown()
    assert markdown.splitlines()[0] == "| prompt | seed | brightness_reward | heads:a | heads:b |"
    assert markdown.splitlines()[-1].startswith("| **mean** |  | ") and str(result) == markdown


def test_deterministic_and_independent_of_the_batch_size(pipe):
    rewards = ["brightness", "sharpness"]
    one = evaluate(pipe, rewards=rewards, batch_size=1, adapters={"semi": 1.0})
    again = evaluate(pipe, rewards=rewards, batch_size=1, adapters={"semi": 1.0})
    four = evaluate(pipe, rewards=rewards, batch_size=4, adapters={"semi": 1.0})
    assert one.table.to_dict() == again.table.to_dict()
    for column in one.means:
        torch.testing.assert_close(
            torch.tensor(four.table[column]), torch.tensor(one.table[column]), atol=1e-5, rtol=0
        )


def test_adapters_none_keeps_empty_disables_and_dict_activates(pipe):
    base = evaluate(tiny_causal_wan_pipeline(), rewards=["brightness"])  # same seed-0 weights, no LoRA at all
    disabled = evaluate(pipe, rewards=["brightness"], adapters={})
    assert disabled.table["brightness_reward"] == base.table["brightness_reward"]
    assert evaluate(pipe, rewards=["brightness"]).table.to_dict() == disabled.table.to_dict()  # None: as it is

    half = evaluate(pipe, rewards=["brightness"], adapters={"semi": 0.5})
    full = evaluate(pipe, rewards=["brightness"], adapters={"semi": 1.0})
    assert evaluate(pipe, rewards=["brightness"]).table.to_dict() == full.table.to_dict()  # the setting stays
    differences = [abs(a - b) for a, b in zip(half.means.values(), full.means.values(), strict=True)]
    assert max(differences) > 1e-5 and half.table["brightness_reward"] != base.table["brightness_reward"]


def test_dataset_columns_reach_the_rewards(pipe):
    seen = []

    def needs_column(prompts, videos, *, subject, **kwargs):
        seen.append(list(subject))
        return [float(len(s)) for s in subject]

    dataset = Dataset.from_dict({"prompt": PROMPTS[:3], "subject": ["car", "sea", "cat!"]})
    result = evaluate(pipe, dataset, rewards=[needs_column], batch_size=2)
    assert seen == [["car", "sea"], ["cat!"]]
    assert result.table["needs_column"] == [3.0, 3.0, 4.0]


def test_reward_failures_are_clear_errors(pipe):
    def broken(prompts, videos, **kwargs):
        raise OSError("server down")

    def short(prompts, videos, **kwargs):
        return [0.0]

    with pytest.raises(RuntimeError, match=r"prompts 0\.\.1 \('a red car', \.\.\.\): reward 'broken' raised OSError"):
        evaluate(pipe, rewards=[broken], batch_size=2)
    with pytest.raises(RuntimeError, match=r"prompts 0\.\.1 .*reward 'short' returned 1 values for a batch of 2"):
        evaluate(pipe, rewards=[short], batch_size=2)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"prompts": []}, ValueError, "`prompts` is empty"),
        ({"prompts": "a cat"}, ValueError, "got the string 'a cat'; wrap it in a list"),
        ({"prompts": ["a cat", 3]}, ValueError, r"`prompts` must be strings; entries \[1\]"),
        ({"prompts": Dataset.from_dict({"text": ["a cat"]})}, ValueError, "needs a 'prompt' column.*'text'"),
        ({"batch_size": 0}, ValueError, "`batch_size` must be an integer >= 1, got 0"),
        ({"latents": torch.zeros(1)}, ValueError, r"sets \['latents'\] itself"),
        ({"rewards": ["no_such_reward"]}, ValueError, "Unknown reward 'no_such_reward'"),
        ({"rewards": [42]}, TypeError, "must be a callable or a reward name, got int"),
        ({"rewards": []}, ValueError, "`reward_funcs` is empty"),
        ({"adapters": {"on_policy": 1.0}}, ValueError, r"Unknown adapter\(s\) \['on_policy'\].*\['semi'\]"),
    ],
)
def test_bad_input(pipe, kwargs, error, message):
    with pytest.raises(error, match=message):
        evaluate(pipe, **kwargs)

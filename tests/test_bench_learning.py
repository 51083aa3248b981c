"""benchmarks/bench_learning.py: its direct-gradient diagnostic is the rollout's own computation, and `--quick` runs."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import transformers

from trl_arcopo.rollout import rebuild_context

transformers.logging.set_verbosity_error()
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_learning.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_learning", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_direct_gradient_rebuilds_the_rollout_and_matches_finite_differences(bench, tmp_path):
    # The trained toy generator: the tiny random one is too rough for central differences (its slope along one
    # direction varies by 20-40 % between steps of 1e-3 and 1e-2).
    args = bench.parse_args(["--pipeline", "toy", "--quick"])
    trainer = bench._trainer(args, "redness", "fork", 0, 1, str(tmp_path))
    gen = torch.Generator().manual_seed(0)
    parameters = [p for p in trainer.model.parameters() if p.requires_grad]
    with torch.no_grad():  # a LoRA away from its B = 0 start, so that every parameter has a gradient
        for parameter in parameters:
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=gen))
    [item] = trainer._generate_and_score([{"prompt": "a red circle moving left"}], mode="train")
    group, score = item["group"], bench.DIFFERENTIABLE_REWARDS["redness"]
    assert group.pivot > 0  # the pivot chunk attends to a prefix context
    # The rebuilt videos are the rollout's: their mean reward is the one the trainer recorded.
    with torch.no_grad():
        rebuilt = bench.group_reward(trainer, group, score).item()
    assert math.isclose(rebuilt, item["rewards"].mean().item(), rel_tol=1e-4, abs_tol=1e-7)

    # The context is a constant of the gradient: the differences hold it at the unperturbed weights (rebuilt from
    # the perturbed ones it would move the slope by ~1 % here).
    context = rebuild_context(trainer.pipeline, group.prompt_embeds, group.prefix_latents)
    gradient = bench.direct_reward_gradient(trainer, group, score, context)
    direction = [g / torch.cat([g.flatten() for g in gradient]).norm() for g in gradient]
    h = 1e-3

    def reward_at(t: float) -> float:
        with torch.no_grad():
            for parameter, step in zip(parameters, direction, strict=True):
                parameter.add_(t * step)
            value = bench.group_reward(trainer, group, score, context).item()
            for parameter, step in zip(parameters, direction, strict=True):
                parameter.sub_(t * step)
        return value

    slope = (reward_at(h) - reward_at(-h)) / (2 * h)
    norm = torch.cat([g.flatten() for g in gradient]).norm().item()
    assert norm > 0
    assert math.isclose(slope, norm, rel_tol=2e-3)


@pytest.mark.slow
def test_quick_run_on_the_tiny_pipeline(bench, tmp_path, capsys):
    results = bench.main(["--pipeline", "tiny", "--quick", "--out", str(tmp_path)])
    output = capsys.readouterr().out
    assert "## Summary" in output and "## Cosine" in output and "## Candidate spread" in output
    assert (tmp_path / "learning_curves.png").stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text())["summary"] == results["summary"]
    runs = {run["method"]: run for run in results["runs"]}
    assert set(runs) == {"fork", "sde", "lr0"}
    assert runs["lr0"]["gain"] == 0  # the same prompts and noises, an unchanged model: exactly the same videos
    assert runs["fork"]["gain"] != 0
    assert 1 / 4 < runs["fork"]["self_prob"] < 1 and math.isnan(runs["sde"]["self_prob"])  # G = 4 in --quick
    spread = runs["sde"]["spread_per_step"]
    assert spread[0] == 0 and spread[1] > 0  # SDE branches share the initial noise and differ from the re-noise on
    assert all(s > 0 for s in runs["fork"]["spread_per_step"])
    assert all(-1 <= c <= 1 for values in results["cosines"].values() for c in values)


def test_model_loads_a_pipeline_folder_instead_of_the_named_generator(bench, tmp_path):
    from trl_arcopo.testing import tiny_causal_wan_pipeline

    tiny = tiny_causal_wan_pipeline()
    tiny.save_pretrained(tmp_path / "pipeline")
    args = bench.parse_args(["--pipeline", "tiny", "--model", str(tmp_path / "pipeline")])
    loaded = bench.load_pipeline(args.pipeline, args.model)
    for name, value in tiny.transformer.state_dict().items():
        assert torch.equal(loaded.transformer.state_dict()[name], value), name
    assert bench.parse_args(["--pipeline", "tiny"]).model is None

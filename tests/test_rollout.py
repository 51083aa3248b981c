"""Rollout groups: shared prefix computed once, branches equal independent full rollouts with the same noise."""

import pytest
import torch

from trl_arcopo.rollout import GroupNoise, generate_group, rebuild_context, sample_pivot
from trl_arcopo.testing import tiny_causal_wan_pipeline

LATENT_SHAPE = (16, 12, 4, 4)  # 4 chunks of 3 latent frames, 32x32 pixels


@pytest.fixture(scope="module")
def pipe():
    return tiny_causal_wan_pipeline()


@pytest.mark.parametrize(("pivot", "exploration", "batch"), [(0, "fork", None), (2, "fork", 3), (3, "sde", 2)])
def test_group_branches_equal_independent_rollouts(pipe, pivot, exploration, batch):
    embeds = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(7))
    group = generate_group(
        pipe,
        embeds,
        num_generations=5,
        latent_shape=LATENT_SHAPE,
        pivot=pivot,
        noise_sigma=0.5,
        exploration=exploration,
        rollout_batch_size=batch,
        generator=torch.Generator().manual_seed(3),
    )
    assert group.inputs.shape == (4, 5, 16, 3, 4, 4) and group.noise.shape == (3, 5, 16, 3, 4, 4)
    assert group.prefix_latents.shape == (1, 16, 3 * pivot, 4, 4)
    assert group.videos.shape == (5, 45, 3, 32, 32)

    noise = GroupNoise.draw(
        num_generations=5,
        latent_shape=LATENT_SHAPE,
        chunk_frames=3,
        num_steps=4,
        pivot=pivot,
        noise_sigma=0.5,
        exploration=exploration,
        generator=torch.Generator().manual_seed(3),
    )
    for i in range(5):
        latents, step_noise = noise.branch(i)
        out = pipe(
            prompt_embeds=embeds, latents=latents, step_noise=step_noise, output_type="latent", return_trajectory=True
        )
        torch.testing.assert_close(group.latents[i : i + 1], out.frames, atol=1e-5, rtol=0)
        torch.testing.assert_close(group.predictions[:, i], out.trajectory[pivot].predictions[:, 0], atol=1e-5, rtol=0)
        torch.testing.assert_close(group.inputs[:, i], out.trajectory[pivot].inputs[:, 0], atol=1e-5, rtol=0)
    # Branches differ only through the pivot chunk.
    assert torch.equal(group.latents[:, :, : 3 * pivot], group.latents[:1, :, : 3 * pivot].expand(5, -1, -1, -1, -1))
    assert (group.latents[0, :, 3 * pivot :] - group.latents[1, :, 3 * pivot :]).abs().max() > 1e-3


def test_rebuilt_context_gives_the_rollout_predictions(pipe):
    """π_old is exact: recomputing the prefix context and the pivot steps reproduces the recorded x̂0 (ratio 1)."""
    embeds = torch.randn(1, 16, 32)
    group = generate_group(
        pipe,
        embeds,
        num_generations=4,
        latent_shape=LATENT_SHAPE,
        pivot=2,
        generator=torch.Generator().manual_seed(0),
        decode=False,
    )
    context = rebuild_context(pipe, embeds, group.prefix_latents)
    rows = pipe.fork(context, 4 * 4)
    steps = [s for s in range(4) for _ in range(4)]
    x0 = pipe.predict_x0(rows, group.inputs.flatten(0, 1), steps).unflatten(0, (4, 4))
    torch.testing.assert_close(x0, group.predictions, atol=1e-5, rtol=0)


def test_sample_pivot():
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([sample_pivot(7, generator=g) for _ in range(700)]), minlength=7)
    assert counts.min() > 60
    assert sample_pivot(7, "fixed", index=3) == 3
    assert {sample_pivot(3, "weighted", weights=[0, 1, 0], generator=g) for _ in range(20)} == {1}
    with pytest.raises(ValueError, match="pivot_index"):
        sample_pivot(3, "fixed", index=3)
    with pytest.raises(ValueError, match="pivot_weights"):
        sample_pivot(3, "weighted", weights=[1, 1])
    with pytest.raises(ValueError, match="pivot_strategy"):
        sample_pivot(3, "last")


def test_bad_group_arguments(pipe):
    with pytest.raises(ValueError, match="exploration"):
        generate_group(
            pipe, torch.zeros(1, 16, 32), num_generations=2, latent_shape=LATENT_SHAPE, pivot=0, exploration="ode"
        )
    with pytest.raises(ValueError, match="batch 1"):
        generate_group(pipe, torch.zeros(2, 16, 32), num_generations=2, latent_shape=LATENT_SHAPE, pivot=0)
    with pytest.raises(ValueError, match="`pivot`=4"):
        generate_group(pipe, torch.zeros(1, 16, 32), num_generations=2, latent_shape=LATENT_SHAPE, pivot=4)

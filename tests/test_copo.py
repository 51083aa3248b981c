"""Tests of the pure AR-CoPO / SDE-GRPO tensor math in `trl_arcopo.copo`, against hand-computed values."""

import math

import pytest
import torch

from trl_arcopo import copo
from trl_arcopo.copo import (
    aggregate_rewards,
    candidate_distances,
    categorical_kl,
    clipped_surrogate,
    copo_loss,
    distance_temperature,
    fork_noise,
    gaussian_renoise_log_prob,
    group_advantages,
    grpo_loss,
    mean_pairwise_distance,
    surrogate_log_probs,
    surrogate_policy_stats,
)

F64 = torch.float64
EPS = 1e-4  # the paper's (absolute) eps of the z-score
PAPER_EPS = {"eps": EPS, "eps_mode": "absolute"}


def t(values, dtype=F64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def assert_close(actual, expected, rtol: float = 1e-12, atol: float = 1e-12) -> None:
    expected = expected if isinstance(expected, torch.Tensor) else t(expected)
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------------------------------
# fork_noise
# ----------------------------------------------------------------------------------------------------------------------


def test_fork_noise_formula():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(2, 3, generator=gen, dtype=F64)
    delta = torch.randn(4, 2, 3, generator=gen, dtype=F64)
    expected = 0.8 * base + 0.6 * delta  # sqrt(1 - 0.6²) = 0.8
    out = fork_noise(base, delta, 0.6)
    assert out.shape == (4, 2, 3)
    assert_close(out, expected)
    assert_close(fork_noise(base.unsqueeze(0), delta, 0.6), expected)  # [1, *S] is accepted too


def test_fork_noise_sigma_extremes():
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(1, 5, generator=gen)
    delta = torch.randn(3, 5, generator=gen)
    out = fork_noise(base, delta, 0.0)
    for branch in out:
        assert torch.equal(branch, base[0])
    assert torch.equal(fork_noise(base, delta, 1.0), delta)


def test_fork_noise_preserves_unit_variance():
    gen = torch.Generator().manual_seed(2)
    n = 400_000
    base = torch.randn(n, generator=gen, dtype=F64)
    delta = torch.randn(2, n, generator=gen, dtype=F64)
    out = fork_noise(base, delta, 0.5)
    assert abs(out.mean().item()) < 0.01
    assert out.var(dim=1).sub(1).abs().max().item() < 0.02
    correlation = torch.corrcoef(out)[0, 1].item()
    assert abs(correlation - 0.75) < 0.01  # 1 - σ²


@pytest.mark.parametrize("sigma", [-0.1, 1.1, float("nan")])
def test_fork_noise_bad_sigma(sigma):
    with pytest.raises(ValueError, match="sigma"):
        fork_noise(torch.zeros(3), torch.zeros(2, 3), sigma)


def test_fork_noise_bad_shapes():
    with pytest.raises(ValueError):
        fork_noise(torch.zeros(4), torch.zeros(2, 3), 0.5)
    with pytest.raises(ValueError):
        fork_noise(torch.zeros(2, 3), torch.zeros(2, 3), 0.5)  # base must be [*S] or [1, *S]


# ----------------------------------------------------------------------------------------------------------------------
# group_advantages
# ----------------------------------------------------------------------------------------------------------------------


def test_group_advantages_zscore_by_hand():
    rewards = t([[1, 2, 3, 6], [0, 0, 2, 2]])
    # row 0: mean 3, c = [-2, -1, 0, 3], population variance (4 + 1 + 0 + 9) / 4 = 3.5
    # row 1: mean 1, c = [-1, -1, 1, 1], population std 1
    s0 = math.sqrt(3.5) + EPS
    s1 = 1.0 + EPS
    expected = [[-2 / s0, -1 / s0, 0.0, 3 / s0], [-1 / s1, -1 / s1, 1 / s1, 1 / s1]]
    assert_close(group_advantages(rewards, **PAPER_EPS), expected)
    # relative: ε = 1e-6 · max|r| per group (6 and 2)
    s0, s1 = math.sqrt(3.5) + 6e-6, 1.0 + 2e-6
    expected = [[-2 / s0, -1 / s0, 0.0, 3 / s0], [-1 / s1, -1 / s1, 1 / s1, 1 / s1]]
    assert_close(group_advantages(rewards), expected)
    assert_close(group_advantages(rewards, normalization="none"), [[-2, -1, 0, 3], [-1, -1, 1, 1]])


def test_group_advantages_quasi_norm_by_hand():
    rewards = t([[1, 2, 3, 6], [0, 0, 2, 2]])
    q = 0.8
    # A = c / (M + ε) with the quasi-norm mean M = (mean |c|^q)^(1/q) = (Σ|c|^q)^(1/q) / G^(1/q), G = 4
    g = 4 ** (1 / q)
    m0 = (2**q + 1 + 0 + 3**q) ** (1 / q) / g  # row 0: c = [-2, -1, 0, 3]
    row0 = [c / (m0 + EPS) for c in (-2, -1, 0, 3)]
    row1 = [sign / (1 + EPS) for sign in (-1, -1, 1, 1)]  # row 1: c = ±1, M = 1
    assert_close(group_advantages(rewards, normalization="quasi_norm", quasi_norm_p=q, **PAPER_EPS), [row0, row1])
    # the numbers themselves: G^(1/q) = 4^1.25 = 5.656854..., Σ|c|^q = 1.741101 + 1 + 2.408225
    assert math.isclose(g, 5.656854249492381)
    assert row0[3] > 2.1  # quasi-norm emphasizes the outlier more than the z-score (3 / sqrt(3.5) = 1.60)


@pytest.mark.parametrize("eps", [{"eps": 0.0}, {}, PAPER_EPS])
def test_group_advantages_quasi_norm_p2_is_zscore(eps):
    gen = torch.Generator().manual_seed(3)
    rewards = torch.randn(5, 12, generator=gen, dtype=F64) * 3 + 1
    zscore = group_advantages(rewards, **eps)
    quasi = group_advantages(rewards, normalization="quasi_norm", quasi_norm_p=2.0, **eps)
    assert_close(quasi, zscore, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("normalization", ["zscore", "quasi_norm"])
def test_group_advantages_relative_eps_does_not_depend_on_the_reward_units(normalization):
    # Audit of issue 10: with an absolute ε = 1e-4, a reward in [0, 1] whose candidates differ by ~1e-5 (the tiny
    # pipeline's brightness) gets |A| << 1, so groups weigh by their raw spread; the same reward in other units does
    # not. A relative ε normalises every group whose spread is above rounding noise the same way.
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(3, 8, generator=gen, dtype=F64)
    rewards = 0.5 + z * t([[1e-5], [1e-3], [1e-1]])  # three groups, spreads 1e-5 .. 1e-1
    relative = group_advantages(rewards, normalization=normalization, clip=None)
    for scale in (1e-3, 1e3):
        scaled = group_advantages(rewards * scale, normalization=normalization, clip=None)
        assert_close(scaled, relative, rtol=1e-9, atol=1e-9)  # rounding of 0.5 + 1e-5·z
    reference = group_advantages(z, normalization=normalization, clip=None, eps=0.0)  # the spread-free advantages
    torch.testing.assert_close(relative, reference, rtol=0.05, atol=0)
    absolute = group_advantages(rewards, normalization=normalization, clip=None, **PAPER_EPS)
    assert absolute[0].abs().max() < 0.2 * reference[0].abs().max()  # the 1e-5 group is damped 10x
    torch.testing.assert_close(absolute[2], reference[2], rtol=1e-2, atol=0)  # a wide group is not
    # a spread at the rounding level of the rewards is damped in relative mode too
    rounding = 0.5 + z[:1] * 1e-9
    assert group_advantages(rounding, normalization=normalization).abs().max() < 0.01


def test_group_advantages_clip():
    rewards = torch.zeros(1, 100, dtype=F64)
    rewards[0, 7] = 1.0
    # mean 0.01; outlier c = 0.99, others c = -0.01; population variance 0.01 * 0.99 = 0.0099
    std = math.sqrt(0.0099)
    unclipped = group_advantages(rewards, clip=None, **PAPER_EPS)
    assert math.isclose(unclipped[0, 7].item(), 0.99 / (std + EPS), rel_tol=1e-12)
    assert unclipped[0, 7].item() > 9.9
    clipped = group_advantages(rewards, **PAPER_EPS)  # clip = 5 by default
    assert clipped[0, 7].item() == 5.0
    others = torch.cat([clipped[0, :7], clipped[0, 8:]])
    assert_close(others, torch.full((99,), -0.01 / (std + EPS), dtype=F64))
    assert group_advantages(rewards, clip=2.0)[0, 7].item() == 2.0


def test_group_advantages_nan():
    nan = float("nan")
    rewards = t([[1, nan, 3], [nan, 5, nan], [nan, nan, nan]])
    # row 0: valid [1, 3]: mean 2, c = [-1, 1], population std 1; rows 1-2: fewer than 2 valid -> zeros
    a = 1 / (1 + EPS)
    expected = [[-a, 0, a], [0, 0, 0], [0, 0, 0]]
    assert_close(group_advantages(rewards, **PAPER_EPS), expected)
    # relative: ε = 1e-6 · max(|1|, |3|), the NaN is not part of the max
    a = 1 / (1 + 3e-6)
    assert_close(group_advantages(rewards), [[-a, 0, a], [0, 0, 0], [0, 0, 0]])
    assert_close(group_advantages(rewards, normalization="quasi_norm"), [[-a, 0, a], [0, 0, 0], [0, 0, 0]])
    assert_close(group_advantages(rewards, normalization="none"), [[-1, 0, 1], [0, 0, 0], [0, 0, 0]])


@pytest.mark.parametrize("normalization", ["zscore", "quasi_norm", "none"])
@pytest.mark.parametrize("eps", [PAPER_EPS, {"eps": 0.0}, {}])
def test_group_advantages_constant_rewards_are_zero(normalization, eps):
    rewards = torch.full((2, 6), 3.7, dtype=F64)
    out = group_advantages(rewards, normalization=normalization, **eps)
    assert torch.equal(out, torch.zeros_like(out))


def test_group_advantages_bad_arguments():
    with pytest.raises(ValueError, match="zscore.*quasi_norm.*none"):
        group_advantages(torch.zeros(1, 3), normalization="rank")
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(3))  # must be [N, G]
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(1, 3), normalization="quasi_norm", quasi_norm_p=0.0)
    with pytest.raises(ValueError, match="relative.*absolute"):
        group_advantages(torch.zeros(1, 3), eps_mode="batch")
    with pytest.raises(ValueError, match="eps"):
        group_advantages(torch.zeros(1, 3), eps=-1.0)


# ----------------------------------------------------------------------------------------------------------------------
# aggregate_rewards
# ----------------------------------------------------------------------------------------------------------------------

REWARDS_1x3x2 = [[[1, 10], [2, 20], [3, 60]]]


def test_aggregate_sum_then_normalize():
    rewards = t(REWARDS_1x3x2)
    assert_close(aggregate_rewards(rewards), [[11, 22, 63]])
    assert_close(aggregate_rewards(rewards, t([1.0, 0.5])), [[6, 12, 33]])


def test_aggregate_normalize_then_sum():
    rewards = t(REWARDS_1x3x2)
    # reward 0: [1, 2, 3]: mean 2, c = [-1, 0, 1], population std sqrt(2/3)
    s0 = math.sqrt(2 / 3) + EPS
    # reward 1: [10, 20, 60]: mean 30, c = [-20, -10, 30], population variance (400 + 100 + 900) / 3
    s1 = math.sqrt(1400 / 3) + EPS
    z0 = [-1 / s0, 0.0, 1 / s0]
    z1 = [-20 / s1, -10 / s1, 30 / s1]
    out = aggregate_rewards(rewards, t([1.0, 0.5]), mode="normalize_then_sum", **PAPER_EPS)
    assert_close(out, [[a + 0.5 * b for a, b in zip(z0, z1, strict=True)]])
    summed = aggregate_rewards(rewards, mode="normalize_then_sum", **PAPER_EPS)
    assert_close(summed, [[a + b for a, b in zip(z0, z1, strict=True)]])
    # relative ε (the default): 1e-6 · max|r| of each reward's group (3 and 60)
    s0, s1 = math.sqrt(2 / 3) + 3e-6, math.sqrt(1400 / 3) + 6e-5
    expected = [-1 / s0 - 20 / s1, -10 / s1, 1 / s0 + 30 / s1]
    assert_close(aggregate_rewards(rewards, mode="normalize_then_sum"), [expected])


def test_aggregate_rewards_nan():
    nan = float("nan")
    rewards = t([[[1, nan], [nan, nan], [3, 4]]])
    summed = aggregate_rewards(rewards)
    assert summed[0, 0].item() == 1 and summed[0, 2].item() == 7
    assert math.isnan(summed[0, 1].item())  # every reward missing -> stays missing
    # normalize_then_sum: reward 0 has valid [1, 3] at candidates 0, 2 -> [-1, ., 1] / (1 + eps);
    # reward 1 has a single valid value -> 0 everywhere; candidate 1 has no reward at all -> NaN
    out = aggregate_rewards(rewards, mode="normalize_then_sum", **PAPER_EPS)
    a = 1 / (1 + EPS)
    assert math.isclose(out[0, 0].item(), -a) and math.isclose(out[0, 2].item(), a)
    assert math.isnan(out[0, 1].item())
    # the missing candidate gets advantage 0 downstream and is left out of the baseline
    # [1, NaN, 7]: valid [1, 7], mean 4, c = [-3, 3], population std 3
    assert_close(group_advantages(summed, **PAPER_EPS), [[-3 / (3 + EPS), 0, 3 / (3 + EPS)]])


def test_aggregate_rewards_bad_arguments():
    with pytest.raises(ValueError, match="sum_then_normalize"):
        aggregate_rewards(torch.zeros(1, 3, 2), mode="mean")
    with pytest.raises(ValueError):
        aggregate_rewards(torch.zeros(1, 3, 2), torch.ones(3))
    with pytest.raises(ValueError):
        aggregate_rewards(torch.zeros(3, 2))


# ----------------------------------------------------------------------------------------------------------------------
# Distances, temperature, surrogate policy
# ----------------------------------------------------------------------------------------------------------------------


def test_candidate_distances_matches_loop():
    gen = torch.Generator().manual_seed(4)
    anchors = torch.randn(3, 2, 4, 5, generator=gen, dtype=F64)
    candidates = torch.randn(5, 2, 4, 5, generator=gen, dtype=F64)
    out = candidate_distances(anchors, candidates)
    assert out.shape == (3, 5)
    for a in range(3):
        for i in range(5):
            assert math.isclose(out[a, i].item(), ((candidates[i] - anchors[a]) ** 2).mean().item(), rel_tol=1e-13)


def test_candidate_distances_chunked_and_gradients(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    anchors = torch.randn(4, 3, 2, generator=gen, dtype=F64, requires_grad=True)
    candidates = torch.randn(3, 3, 2, generator=gen, dtype=F64, requires_grad=True)
    full = candidate_distances(anchors, candidates)
    monkeypatch.setattr(copo, "_MAX_CHUNK_ELEMENTS", 20)  # 18 elements per anchor -> one anchor per chunk
    assert torch.equal(candidate_distances(anchors, candidates), full)
    assert torch.autograd.gradcheck(candidate_distances, (anchors, candidates))
    # analytic gradient: d d[a, i] / d anchors[a] = -2 (c_i - a) / D
    candidate_distances(anchors, candidates)[1, 2].backward()
    assert_close(anchors.grad[1], -2 * (candidates[2] - anchors[1]).detach() / 6)
    assert torch.equal(anchors.grad[0], torch.zeros(3, 2, dtype=F64))


def test_candidate_distances_low_precision_is_computed_in_float32():
    anchors = torch.randn(2, 8, dtype=torch.bfloat16)
    candidates = torch.randn(3, 8, dtype=torch.bfloat16)
    out = candidate_distances(anchors, candidates)
    assert out.dtype == torch.float32
    assert_close(out, candidate_distances(anchors.float(), candidates.float()), rtol=0, atol=0)


def test_candidate_distances_bad_shapes():
    with pytest.raises(ValueError):
        candidate_distances(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError):
        candidate_distances(torch.zeros(2, 3), torch.zeros(2, 1, 3))


CANDIDATES_3x2 = [[0, 0], [1, 0], [0, 2]]


def test_mean_pairwise_distance_by_hand():
    # d(0, 1) = (1 + 0) / 2 = 0.5; d(0, 2) = (0 + 4) / 2 = 2; d(1, 2) = (1 + 4) / 2 = 2.5 -> mean 5 / 3
    assert math.isclose(mean_pairwise_distance(t(CANDIDATES_3x2)).item(), 5 / 3, rel_tol=1e-14)
    with pytest.raises(ValueError):
        mean_pairwise_distance(torch.zeros(1, 2))


def test_distance_temperature():
    candidates = t(CANDIDATES_3x2).requires_grad_()
    tau = distance_temperature(candidates, 0.5)
    assert math.isclose(tau.item(), 0.5 * 5 / 3, rel_tol=1e-14)
    assert not tau.requires_grad
    # doubling the spread multiplies squared distances, hence τ, by 4
    spread = (candidates.detach() - 7.0) * 2 + 7.0
    assert math.isclose(distance_temperature(spread, 0.5).item(), 4 * tau.item(), rel_tol=1e-14)
    absolute = distance_temperature(candidates, 0.3, mode="absolute")
    assert absolute.item() == 0.3 and absolute.dtype == F64 and not absolute.requires_grad
    identical = distance_temperature(torch.ones(4, 3), 1.0)
    assert identical.item() > 0
    with pytest.raises(ValueError):
        distance_temperature(candidates, 0.0)
    with pytest.raises(ValueError):
        distance_temperature(candidates, -1.0, mode="absolute")
    with pytest.raises(ValueError, match="relative"):
        distance_temperature(candidates, 1.0, mode="adaptive")


def test_surrogate_log_probs_by_hand():
    anchors = t([[0.0]])
    candidates = t([[1.0], [3.0]])
    # d = [1, 9], τ = 2: logits [-0.5, -4.5] -> p0 = 1 / (1 + e^-4)
    expected = [[-math.log1p(math.exp(-4)), -4 - math.log1p(math.exp(-4))]]
    assert_close(surrogate_log_probs(anchors, candidates, 2.0), expected)
    assert_close(surrogate_log_probs(anchors, candidates, t(2.0)), expected)
    with pytest.raises(ValueError):
        surrogate_log_probs(anchors, candidates, 0.0)


def test_surrogate_log_probs_normalized():
    gen = torch.Generator().manual_seed(6)
    anchors = torch.randn(4, 3, 5, generator=gen)
    candidates = torch.randn(6, 3, 5, generator=gen)
    log_probs = surrogate_log_probs(anchors, candidates, distance_temperature(candidates, 0.5))
    assert log_probs.shape == (4, 6)
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(4))
    # all candidates identical: uniform, no NaN even with a tiny τ
    flat = surrogate_log_probs(anchors, torch.ones(3, 3, 5), distance_temperature(torch.ones(3, 3, 5), 1.0))
    torch.testing.assert_close(flat, torch.full((4, 3), -math.log(3)))


# ----------------------------------------------------------------------------------------------------------------------
# clipped_surrogate
# ----------------------------------------------------------------------------------------------------------------------


def test_clipped_surrogate_by_hand():
    ratio = t([1.1, 1.5, 0.5, 0.5, 1.5, 0.9]).requires_grad_()
    advantages = t([1.0, 1.0, 1.0, -1.0, -1.0, -2.0])
    objective, stats = clipped_surrogate(ratio, advantages, 0.2)
    # A > 0: ρ inside -> ρA; ρ above -> clipped 1.2A; ρ below -> ρA (pessimistic, not clipped)
    # A < 0: ρ below -> clipped 0.8A; ρ above -> ρA (not clipped); ρ inside -> ρA
    assert_close(objective, [1.1, 1.2, 0.5, -0.8, -1.5, -1.8])
    objective.sum().backward()
    assert_close(ratio.grad, [1.0, 0.0, 1.0, 0.0, -1.0, -2.0])  # no gradient where the clip binds
    assert_close(stats["ratio_mean"], 1.0)
    assert stats["ratio_min"].item() == 0.5 and stats["ratio_max"].item() == 1.5
    assert_close(stats["clip_low"], 1 / 6)
    assert_close(stats["clip_high"], 1 / 6)
    assert_close(stats["clip_region"], 2 / 6)  # TRL: where the clip binds (clip_low | clip_high)
    assert all(not v.requires_grad and v.dim() == 0 for v in stats.values())


def test_clipped_surrogate_asymmetric_and_broadcast():
    ratio = t([[1.25, 1.3], [0.75, 0.85]])
    advantages = t([1.0, -1.0])  # broadcast over rows
    objective, stats = clipped_surrogate(ratio, advantages, 0.2, 0.28)
    # [1.25·1, min(-1.3, -1.28)], [min(0.75, 0.8), min(-0.85, -0.85)]
    assert_close(objective, [[1.25, -1.3], [0.75, -0.85]])
    assert stats["clip_high"].item() == 0 and stats["clip_low"].item() == 0
    assert stats["clip_region"].item() == 0  # 1.3 > 1.28 and 0.75 < 0.8, but the clip does not bind
    objective, stats = clipped_surrogate(t([1.3, 0.7]), t([1.0, -1.0]), 0.2, 0.28)
    assert_close(objective, [1.28, -0.8])
    assert_close(stats["clip_high"], 0.5)
    assert_close(stats["clip_low"], 0.5)
    with pytest.raises(ValueError):
        clipped_surrogate(ratio, advantages, -0.1)


# ----------------------------------------------------------------------------------------------------------------------
# copo_loss
# ----------------------------------------------------------------------------------------------------------------------


def _setup(seed: int = 7, num_anchors: int = 4, group: int = 6):
    gen = torch.Generator().manual_seed(seed)
    candidates = torch.randn(group, 2, 3, 3, generator=gen, dtype=F64)
    anchors = (candidates[:num_anchors] + 0.3 * torch.randn(num_anchors, 2, 3, 3, generator=gen, dtype=F64)).clone()
    advantages = torch.randn(group, generator=gen, dtype=F64)
    return anchors, candidates, advantages


def test_copo_ratio_is_one_at_first_update():
    anchors, candidates, advantages = _setup()
    tau = distance_temperature(candidates, 1.0)
    old_log_probs = surrogate_log_probs(anchors, candidates, tau)  # recorded by the rollout
    theta = anchors.clone().requires_grad_()
    log_probs = surrogate_log_probs(theta, candidates, tau)
    loss, stats = copo_loss(log_probs, old_log_probs, advantages, epsilon=1e-4)
    assert stats["ratio_min"].item() == 1.0 and stats["ratio_max"].item() == 1.0 and stats["ratio_mean"].item() == 1.0
    assert stats["clip_low"].item() == 0 and stats["clip_high"].item() == 0 and stats["clip_region"].item() == 0
    # ρ = 1: J_a = (1/G) Σ_i A_i for every anchor, so loss = -mean(A)
    assert math.isclose(loss.item(), -advantages.mean().item(), rel_tol=1e-14)
    assert "kl" not in stats
    # and the gradient is the plain policy gradient -(1/(A·G)) Σ_{a,i} A_i ∇ log π(i | a)
    (grad,) = torch.autograd.grad(loss, theta)
    (expected,) = torch.autograd.grad(-(advantages * surrogate_log_probs(theta, candidates, tau)).mean(), theta)
    assert_close(grad, expected)
    # per-anchor advantages [A, G]
    per_anchor = advantages.expand(4, -1) * t([1.0, 2.0, 3.0, 4.0]).unsqueeze(1)
    loss, _ = copo_loss(log_probs, old_log_probs, per_anchor, epsilon=0.2)
    assert math.isclose(loss.item(), -per_anchor.mean().item(), rel_tol=1e-14)


def _first_update_anchor_gradient(anchors, candidates, advantages, tau) -> torch.Tensor:
    """d loss / d anchors at the first update (ρ = 1: π_old is the anchors' own policy)."""
    old = surrogate_log_probs(anchors, candidates, tau)
    theta = anchors.clone().requires_grad_()
    loss, _ = copo_loss(surrogate_log_probs(theta, candidates, tau), old, advantages, epsilon=1e-4)
    (grad,) = torch.autograd.grad(loss, theta)
    return grad


@pytest.mark.parametrize("factor", [0.1, 0.5, 1.0, 10.0])
def test_first_update_gradient_is_the_advantage_weighted_sum_of_candidates(factor):
    # With ρ = 1 and Σ_i A_i = 0 (group-normalised advantages), the softmax normaliser's term cancels:
    # d J / d a = (1 / (A·G))·Σ_i A_i·∇ log π(i | a) = (2 / (τ·n·A·G))·Σ_i A_i·c_i for every anchor, whatever its
    # position and whatever the shape of π_old. τ only scales the gradient (docs/method.md).
    anchors, candidates, _ = _setup(num_anchors=3)
    advantages = group_advantages(torch.randn(1, 6, generator=torch.Generator().manual_seed(5), dtype=F64))[0]
    assert abs(advantages.sum().item()) < 1e-12
    tau = distance_temperature(candidates, factor)
    grad = _first_update_anchor_gradient(anchors, candidates, advantages, tau)
    n, num_anchors, group = candidates[0].numel(), anchors.shape[0], candidates.shape[0]
    expected = -2 / (tau * n * num_anchors * group) * (advantages.view(-1, 1, 1, 1) * candidates).sum(0)
    assert_close(grad, expected.expand_as(grad), rtol=1e-10, atol=1e-14)


def test_first_update_gradient_direction_does_not_depend_on_the_temperature():
    # The audit of issue 10 measured a cosine of 1.0000 between τ = 0.1·D and τ = D on the tiny pipeline.
    anchors, candidates, _ = _setup()
    advantages = group_advantages(torch.randn(1, 6, generator=torch.Generator().manual_seed(6), dtype=F64))[0]
    grads = {
        f: _first_update_anchor_gradient(anchors, candidates, advantages, distance_temperature(candidates, f))
        for f in (0.1, 1.0)
    }
    cosine = torch.nn.functional.cosine_similarity(grads[0.1].flatten(), grads[1.0].flatten(), dim=0)
    assert cosine.item() > 1 - 1e-12
    assert math.isclose(grads[0.1].norm().item(), 10 * grads[1.0].norm().item(), rel_tol=1e-10)  # norm ∝ 1/τ
    # Without Σ A = 0 the normaliser does not cancel and the direction depends on τ
    shifted = advantages + 1.0
    a = _first_update_anchor_gradient(anchors, candidates, shifted, distance_temperature(candidates, 0.1))
    b = _first_update_anchor_gradient(anchors, candidates, shifted, distance_temperature(candidates, 1.0))
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item() < 0.999


def test_relative_temperature_weights_each_step_by_the_reward_gradient():
    # Candidates of sampler step s are an affine image of the same group, c_i = μ_s + k_s·δ_i (the sampler shrinks
    # or grows the fork), and the reward is linear in δ, so dr/dc^s = w / k_s. Relative τ gives each step the anchor
    # gradient (G / (f·n·std r))·Cov(δ)·w / k_s: the chain rule's 1/k_s (the "1/√D_s" of issue 10 is this factor);
    # absolute τ weighs the steps by k_s instead.
    gen = torch.Generator().manual_seed(12)
    delta = torch.randn(32, 4, 5, generator=gen, dtype=F64)
    w = torch.randn(4, 5, generator=gen, dtype=F64)
    advantages = group_advantages((delta * w).sum((1, 2))[None])[0]
    scales = [1.0, 0.1, 0.01]
    per_step = {}
    for mode, f in (("relative", 0.5), ("absolute", 0.05)):
        per_step[mode] = []
        for k in scales:
            candidates = 3.0 + k * delta
            tau = distance_temperature(candidates, f, mode)
            per_step[mode].append(_first_update_anchor_gradient(candidates[:2], candidates, advantages, tau)[0])
    direction = (advantages.view(-1, 1, 1) * delta).sum(0)
    for mode, power in (("relative", 1), ("absolute", -1)):
        rescaled = [g * k**power for g, k in zip(per_step[mode], scales, strict=True)]
        for g in rescaled:
            assert_close(g, rescaled[0], rtol=1e-8, atol=1e-12)
        cosine = torch.nn.functional.cosine_similarity(-rescaled[0].flatten(), direction.flatten(), dim=0)
        assert cosine.item() > 1 - 1e-12
    # the advantage-weighted direction estimates the reward's gradient (projected on the G - 1 explored directions)
    assert torch.nn.functional.cosine_similarity(direction.flatten(), w.flatten(), dim=0).item() > 0.5


def test_surrogate_policy_stats():
    # [T = 2, A = 2, G = 3]: a one-hot policy, a uniform one
    one_hot = torch.log(t([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    uniform = torch.full((2, 3), -math.log(3), dtype=F64)
    stats = surrogate_policy_stats(torch.stack([one_hot, uniform]), torch.tensor([0, 1]))
    assert_close(stats["entropy"], [0.0, math.log(3)])
    assert_close(stats["self_prob"], [1.0, 1 / 3])
    # own index 2 for the first anchor: probability 0 there
    assert_close(surrogate_policy_stats(one_hot, torch.tensor([2, 1]))["self_prob"], 0.5)
    with pytest.raises(ValueError, match="own"):
        surrogate_policy_stats(one_hot, torch.tensor([0, 1, 2]))


@pytest.mark.parametrize(("factor", "low", "high"), [(0.1, 0.99, 1.0), (0.5, 0.3, 0.7), (1.0, 0.15, 0.4)])
def test_relative_temperature_sets_the_shape_of_the_old_policy(factor, low, high):
    # π(self) ≈ 1 / (1 + (G - 1)·exp(-1/f)): one-hot at the old default 0.1, a distribution at 0.5 (the default)
    candidates = torch.randn(8, 16, 3, 4, generator=torch.Generator().manual_seed(13))
    log_probs = surrogate_log_probs(candidates, candidates, distance_temperature(candidates, factor))
    self_prob = surrogate_policy_stats(log_probs, torch.arange(8))["self_prob"].item()
    assert low < self_prob < high
    assert math.isclose(self_prob, 1 / (1 + 7 * math.exp(-1 / factor)), rel_tol=0.1)


def test_copo_loss_by_hand():
    # one anchor, G = 2: ρ = [1.5, 0.5], A = [1, -1], ε = 0.2 -> J = (1.2 + (-0.8)) / 2 = 0.2
    old = torch.log(t([[0.4, 0.6]]))
    new = old + torch.log(t([[1.5, 0.5]]))
    loss, stats = copo_loss(new, old, t([1.0, -1.0]), epsilon=0.2)
    assert math.isclose(loss.item(), -0.2, rel_tol=1e-12)
    assert_close(stats["clip_high"], 0.5)
    assert_close(stats["clip_low"], 0.5)
    assert_close(stats["clip_region"], 1.0)
    with pytest.raises(ValueError):
        copo_loss(new, old[:, :1], t([1.0, -1.0]), epsilon=0.2)


def test_copo_loss_kl():
    anchors, candidates, advantages = _setup()
    tau = distance_temperature(candidates, 1.0)
    old = surrogate_log_probs(anchors, candidates, tau)
    ref = surrogate_log_probs(anchors + 0.1, candidates, tau)
    theta = anchors.clone().requires_grad_()
    log_probs = surrogate_log_probs(theta, candidates, tau)
    loss, stats = copo_loss(log_probs, old, advantages, epsilon=0.2, ref_log_probs=ref, beta=0.5)
    kl = (log_probs.exp() * (log_probs - ref)).sum(-1).mean()
    assert math.isclose(stats["kl"].item(), kl.item(), rel_tol=1e-12) and kl.item() > 0
    assert math.isclose(loss.item(), -advantages.mean().item() + 0.5 * kl.item(), rel_tol=1e-12)
    assert not stats["kl"].requires_grad
    loss.backward()
    assert theta.grad is not None
    with pytest.raises(ValueError, match="ref_log_probs"):
        copo_loss(log_probs, old, advantages, epsilon=0.2, beta=0.5)
    with pytest.raises(ValueError):
        copo_loss(log_probs, old, advantages, epsilon=0.2, beta=-1.0)


def _four_candidates() -> torch.Tensor:
    # positives at +3 along e1, negatives at -3 along e1, in R^8
    e = torch.eye(8, dtype=F64)
    return torch.stack([3 * e[0] + e[1], -3 * e[0] + e[2], -3 * e[0] - e[2], 3 * e[0] - e[1]])


@pytest.mark.parametrize("on_policy", [True, False])
def test_copo_learning_direction(on_policy):
    candidates = _four_candidates()
    advantages = t([1.0, -1.0, -1.0, 1.0])
    tau = distance_temperature(candidates, 1.0)
    anchor = (0.01 * torch.randn(1, 8, generator=torch.Generator().manual_seed(8), dtype=F64)).requires_grad_()
    start = candidate_distances(anchor.detach(), candidates)[0]
    fixed_old = surrogate_log_probs(anchor.detach(), candidates, tau)
    for _ in range(10):
        old = surrogate_log_probs(anchor.detach(), candidates, tau) if on_policy else fixed_old
        log_probs = surrogate_log_probs(anchor, candidates, tau)
        # on-policy: ρ ≡ 1 at each step, so the paper's tiny ε does not bind; off-policy: a wider trust region
        loss, stats = copo_loss(log_probs, old, advantages, epsilon=1e-4 if on_policy else 0.5)
        (grad,) = torch.autograd.grad(loss, anchor)
        with torch.no_grad():
            anchor -= 1.0 * grad
    end = candidate_distances(anchor.detach(), candidates)[0]
    assert (end[[0, 3]] < start[[0, 3]]).all()  # closer to the positive-advantage candidates
    assert (end[[1, 2]] > start[[1, 2]]).all()  # farther from the negative ones
    if not on_policy:
        assert stats["ratio_max"].item() > 1 > stats["ratio_min"].item()


def test_copo_gradient_vanishes_outside_trust_region():
    e1 = torch.eye(8, dtype=F64)[0]
    candidates = torch.stack([e1, -e1])  # A = +1 for the first, -1 for the second
    advantages = t([1.0, -1.0])
    old_anchor = torch.zeros(1, 8, dtype=F64)
    old = surrogate_log_probs(old_anchor, candidates, 1.0)

    # moved toward the positive candidate: ρ_+ > 1 + ε with A > 0 and ρ_- < 1 - ε with A < 0 -> every term clipped
    anchor = (old_anchor + 0.1 * e1).requires_grad_()
    loss, stats = copo_loss(surrogate_log_probs(anchor, candidates, 1.0), old, advantages, epsilon=1e-6)
    (grad,) = torch.autograd.grad(loss, anchor)
    assert torch.equal(grad, torch.zeros_like(grad))
    assert_close(stats["clip_high"], 0.5)
    assert_close(stats["clip_low"], 0.5)

    # moved the wrong way: the clip does not bind, the gradient pulls the anchor back toward the positive candidate
    anchor = (old_anchor - 0.1 * e1).requires_grad_()
    loss, stats = copo_loss(surrogate_log_probs(anchor, candidates, 1.0), old, advantages, epsilon=1e-6)
    (grad,) = torch.autograd.grad(loss, anchor)
    assert (-grad[0, 0]).item() > 0 and stats["clip_region"].item() == 0.0
    assert stats["clip_low"].item() == 0 and stats["clip_high"].item() == 0


# ----------------------------------------------------------------------------------------------------------------------
# categorical_kl
# ----------------------------------------------------------------------------------------------------------------------


def test_categorical_kl():
    log_p = torch.log_softmax(torch.randn(3, 5, generator=torch.Generator().manual_seed(9), dtype=F64), -1)
    assert torch.equal(categorical_kl(log_p, log_p), torch.zeros(3, dtype=F64))
    two = categorical_kl(torch.log(t([0.25, 0.75])), torch.log(t([0.5, 0.5])))
    assert math.isclose(two.item(), 0.25 * math.log(0.5) + 0.75 * math.log(1.5), rel_tol=1e-14)
    log_q = torch.log_softmax(torch.randn(3, 5, generator=torch.Generator().manual_seed(10), dtype=F64), -1)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=log_p), torch.distributions.Categorical(logits=log_q)
    )
    assert_close(categorical_kl(log_p, log_q), expected)
    # zero-probability categories contribute nothing
    degenerate = categorical_kl(t([float("-inf"), 0.0]), torch.log(t([0.5, 0.5])))
    assert math.isclose(degenerate.item(), math.log(2), rel_tol=1e-14)


# ----------------------------------------------------------------------------------------------------------------------
# SDE-GRPO baseline
# ----------------------------------------------------------------------------------------------------------------------


def test_sde_log_ratio_of_an_early_step_is_tiny():
    """Why SDE-GRPO's logged ratios read 1 on the toy preset (docs/benchmarks.md): at σ = 0.9375 a change δ of x̂0
    moves the mean-reduced log-ratio by (1 - σ)/σ · mean(ε·δ), ε the recorded re-noise."""
    gen = torch.Generator().manual_seed(3)
    sigma = 0.9375
    x0, eps = (
        torch.randn(2, 16, 3, 8, 8, generator=gen, dtype=F64),
        torch.randn(2, 16, 3, 8, 8, generator=gen, dtype=F64),
    )
    x_next = (1 - sigma) * x0 + sigma * eps
    delta = 0.05 * torch.randn(2, 16, 3, 8, 8, generator=gen, dtype=F64)
    log_ratio = gaussian_renoise_log_prob(x_next, x0 + delta, sigma) - gaussian_renoise_log_prob(x_next, x0, sigma)
    first_order = (1 - sigma) / sigma * (eps * delta).flatten(1).mean(1)
    assert_close(log_ratio, first_order, rtol=0, atol=1e-5)
    assert log_ratio.abs().max() < 1e-3  # a ratio within 0.1 % of 1: an ε = 0.2 clip never acts


def test_gaussian_renoise_log_prob_matches_normal():
    gen = torch.Generator().manual_seed(11)
    x0 = torch.randn(3, 2, 4, generator=gen, dtype=F64)
    sigma = 0.7
    x_next = (1 - sigma) * x0 + sigma * torch.randn(3, 2, 4, generator=gen, dtype=F64)
    per_element = torch.distributions.Normal((1 - sigma) * x0, torch.tensor(sigma, dtype=F64)).log_prob(x_next)
    assert_close(gaussian_renoise_log_prob(x_next, x0, sigma), per_element.flatten(1).mean(1), rtol=1e-14, atol=1e-14)
    assert_close(
        gaussian_renoise_log_prob(x_next, x0, sigma, reduction="sum"),
        per_element.flatten(1).sum(1),
        rtol=1e-14,
        atol=1e-13,
    )
    # hand value for one element: x0 = 1, x_next = 0.3 + 0.7·1, σ = 0.7 -> -(1)²/(2·0.49) - log 0.7 - log sqrt(2π)
    one = gaussian_renoise_log_prob(t([[1.0]]), t([[1.0]]), sigma)
    assert math.isclose(
        one.item(), -(0.7**2) / (2 * 0.49) - math.log(0.7) - 0.5 * math.log(2 * math.pi), rel_tol=1e-14
    )
    low = gaussian_renoise_log_prob(x_next.to(torch.bfloat16), x0.to(torch.bfloat16), sigma)
    assert low.dtype == torch.float32 and low.shape == (3,)
    with pytest.raises(ValueError):
        gaussian_renoise_log_prob(x_next, x0, 0.0)
    with pytest.raises(ValueError):
        gaussian_renoise_log_prob(x_next, x0, sigma, reduction="max")
    with pytest.raises(ValueError):
        gaussian_renoise_log_prob(x_next, x0[:2], sigma)


def test_grpo_loss_ratio_one():
    advantages = t([0.5, -1.0, 2.0])
    log_probs = torch.randn(3, 4, dtype=F64, requires_grad=True)
    loss, stats = grpo_loss(log_probs, log_probs.detach(), advantages, epsilon=1e-4)
    assert math.isclose(loss.item(), -advantages.mean().item(), rel_tol=1e-14)
    assert stats["ratio_min"].item() == 1.0 and stats["ratio_max"].item() == 1.0 and stats["clip_region"].item() == 0
    loss, _ = grpo_loss(log_probs[:, 0], log_probs[:, 0].detach(), advantages, epsilon=1e-4)
    assert math.isclose(loss.item(), -advantages.mean().item(), rel_tol=1e-14)


def test_grpo_loss_by_hand():
    # G = 2, T' = 2: ρ = [[1.5, 1.1], [0.5, 1.0]], A = [1, -1], ε = 0.2
    # objectives [[1.2, 1.1], [-0.8, -1.0]] -> loss = -(1.2 + 1.1 - 0.8 - 1.0) / 4 = -0.125
    old = t([[-1.0, -2.0], [-0.5, -3.0]])
    new = (old + torch.log(t([[1.5, 1.1], [0.5, 1.0]]))).requires_grad_()
    loss, stats = grpo_loss(new, old, t([1.0, -1.0]), epsilon=0.2)
    assert math.isclose(loss.item(), -0.125, rel_tol=1e-12)
    assert_close(stats["clip_high"], 0.25)
    assert_close(stats["clip_low"], 0.25)
    assert_close(stats["clip_region"], 0.5)
    loss.backward()
    # d loss / d log ρ = -ρ·A / 4 where unclipped, 0 where clipped
    assert_close(new.grad, [[0.0, -1.1 / 4], [0.0, 1.0 / 4]])
    with pytest.raises(ValueError):
        grpo_loss(new, old, t([1.0, -1.0, 0.0]), epsilon=0.2)

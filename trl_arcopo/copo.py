"""Pure tensor math of AR-CoPO (chunk-level Contrastive Policy Optimization) and of its SDE-GRPO baseline.

AR-CoPO forks one chunk of a streaming video generator into `G` candidates whose initial noises are correlated with a
shared noise (`fork_noise`), scores every branch, and turns the group's rewards into advantages
(`aggregate_rewards`, `group_advantages`). The policy is a surrogate categorical distribution over the candidates:
an anchor prediction `a` (the model's clean estimate x̂0 for one candidate at one sampler step) picks candidate `i`
with probability `softmax_i(-d_i(a) / τ)`, where `d_i` is the mean squared distance to the candidate's recorded x̂0
(`candidate_distances`, `distance_temperature`, `surrogate_log_probs`, `surrogate_policy_stats`). The loss is the
PPO-style clipped surrogate of the ratio between the current and the old anchor's categorical policy
(`clipped_surrogate`, `copo_loss`), with an optional exact categorical KL to the reference (`categorical_kl`). The
SDE-GRPO baseline uses the exact Gaussian likelihood of the sampler's re-noising step instead
(`gaussian_renoise_log_prob`, `grpo_loss`).

Only torch here: no model, no I/O, no logging. Statistics are returned as detached tensors.
`docs/method.md` states every equation and why the defaults are what they are.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "ADVANTAGE_EPSILON_MODES",
    "ADVANTAGE_NORMALIZATIONS",
    "REWARD_AGGREGATIONS",
    "TEMPERATURE_MODES",
    "aggregate_rewards",
    "candidate_distances",
    "categorical_kl",
    "clipped_surrogate",
    "copo_loss",
    "distance_temperature",
    "fork_noise",
    "gaussian_renoise_log_prob",
    "group_advantages",
    "grpo_loss",
    "mean_pairwise_distance",
    "surrogate_log_probs",
    "surrogate_policy_stats",
]

ADVANTAGE_NORMALIZATIONS = ("zscore", "quasi_norm", "none")
ADVANTAGE_EPSILON_MODES = ("relative", "absolute")
REWARD_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
TEMPERATURE_MODES = ("relative", "absolute")

# Smallest relative temperature: keeps `-d / τ` finite when every candidate is identical.
_MIN_TEMPERATURE = 1e-12
# Upper bound on the number of elements of one chunk of pairwise differences in `candidate_distances`.
_MAX_CHUNK_ELEMENTS = 2**25


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: ratios with ε ~ 1e-4 need at least single precision."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_epsilons(epsilon_low: float, epsilon_high: float | None) -> float:
    """Validate the clipping range and return `epsilon_high` (defaults to `epsilon_low`)."""
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    if not (epsilon_low >= 0 and epsilon_high >= 0):
        raise ValueError(f"epsilons must be >= 0, got epsilon_low={epsilon_low}, epsilon_high={epsilon_high}")
    return epsilon_high


# ----------------------------------------------------------------------------------------------------------------------
# Rollout: forking the pivot chunk's noise
# ----------------------------------------------------------------------------------------------------------------------


def fork_noise(base_noise: Tensor, delta: Tensor, sigma: float) -> Tensor:
    """Fork a shared noise into `G` correlated noises: `sqrt(1 - σ²)·ε* + σ·δ^(i)`.

    With independent standard normal `ε*` and `δ`, each branch is standard normal (unit variance is preserved) and two
    branches have correlation `1 - σ²`. `σ = 0` returns `ε*` for every branch, `σ = 1` returns `δ`.

    Args:
        base_noise: the shared noise `ε*`, shape `[*S]` or `[1, *S]`.
        delta: independent perturbations `δ`, shape `[G, *S]`.
        sigma: exploration radius in `[0, 1]`.

    Returns:
        The forked noises, shape `[G, *S]`.
    """
    if not 0.0 <= sigma <= 1.0:  # also rejects NaN
        raise ValueError(f"sigma must be in [0, 1], got {sigma}")
    if base_noise.dim() == delta.dim() - 1:
        base_noise = base_noise.unsqueeze(0)
    if base_noise.dim() != delta.dim() or base_noise.shape[0] != 1 or base_noise.shape[1:] != delta.shape[1:]:
        raise ValueError(
            f"base_noise must have shape [*S] or [1, *S] with delta [G, *S]; got {tuple(base_noise.shape)} and "
            f"{tuple(delta.shape)}"
        )
    return math.sqrt(1.0 - sigma**2) * base_noise + sigma * delta


# ----------------------------------------------------------------------------------------------------------------------
# Rewards and advantages
# ----------------------------------------------------------------------------------------------------------------------


def _centered(rewards: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Center each group on the mean of its valid (non-NaN) rewards.

    Args:
        rewards: `[N, G]`, NaN for a missing reward.

    Returns:
        `(c, valid, n_valid)`: centred rewards `[N, G]` with 0 at missing entries, the validity mask `[N, G]` and the
        number of valid rewards per group `[N, 1]` (as the rewards' dtype).
    """
    valid = ~torch.isnan(rewards)
    n_valid = valid.sum(dim=-1, keepdim=True).to(rewards.dtype)
    filled = torch.where(valid, rewards, torch.zeros_like(rewards))
    mean = filled.sum(dim=-1, keepdim=True) / n_valid.clamp(min=1)
    centered = torch.where(valid, rewards - mean, torch.zeros_like(rewards))
    return centered, valid, n_valid


def _safe_divide(numerator: Tensor, denominator: Tensor) -> Tensor:
    """`numerator / denominator`, 0 where the denominator is 0 (constant groups with `eps = 0`)."""
    positive = denominator > 0
    return torch.where(positive, numerator / torch.where(positive, denominator, 1.0), 0.0)


def group_advantages(
    rewards: Tensor,
    *,
    normalization: str = "zscore",
    quasi_norm_p: float = 0.8,
    clip: float | None = 5.0,
    eps: float = 1e-6,
    eps_mode: str = "relative",
) -> Tensor:
    """Group-relative advantages.

    With `c = r - nanmean(r)` per group, `A = c / (M + ε')` where the scale `M` is

    - `"zscore"`: the population standard deviation of the group's valid rewards;
    - `"quasi_norm"` (Neighbor GRPO, against reward flattening): the quasi-norm mean `(mean_k |c_k|^q)^(1/q)` with
      `q = quasi_norm_p` (`q = 2` is the z-score exactly);
    - `"none"`: no scale, `A = c`.

    `ε' = eps` with `eps_mode="absolute"` (the paper: `1e-4`, in the reward's units), or `ε' = eps · max_k |r_k|` with
    `eps_mode="relative"`, so that the advantages do not depend on the units of the reward: a spread below `eps` of
    the rewards' magnitude counts as rounding noise, any larger spread is normalised like any other group. (An
    absolute `ε` weights groups whose spread is near or below `ε` by their raw spread, e.g. every group of a reward
    in [0, 1] whose candidates differ by 1e-5.)

    Then `A` is clamped to `[-clip, clip]` when `clip` is set. Missing rewards (NaN) get advantage 0 and do not enter
    the group statistics; a group with fewer than 2 valid rewards, or whose valid rewards are all equal, gets exactly
    zero advantages.

    Args:
        rewards: `[N, G]`, `N` groups of `G` candidates (NaN = missing).
        normalization: one of `ADVANTAGE_NORMALIZATIONS`.
        quasi_norm_p: the exponent `q > 0` of `"quasi_norm"`.
        clip: bound on `|A|`, or `None` for no clipping.
        eps: `>= 0`, added to the scale (see `eps_mode`).
        eps_mode: one of `ADVANTAGE_EPSILON_MODES`.

    Returns:
        Advantages, `[N, G]`, without NaN.
    """
    if normalization not in ADVANTAGE_NORMALIZATIONS:
        raise ValueError(f"Unknown normalization {normalization!r}; expected one of {ADVANTAGE_NORMALIZATIONS}")
    if eps_mode not in ADVANTAGE_EPSILON_MODES:
        raise ValueError(f"Unknown eps_mode {eps_mode!r}; expected one of {ADVANTAGE_EPSILON_MODES}")
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape [N, G], got {tuple(rewards.shape)}")
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be > 0 or None, got {clip}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())

    centered, valid, n_valid = _centered(rewards)
    if normalization == "none":
        advantages = centered
    else:
        q = 2.0 if normalization == "zscore" else float(quasi_norm_p)
        if not q > 0:
            raise ValueError(f"quasi_norm_p must be > 0, got {quasi_norm_p}")
        scale = (centered.abs().pow(q).sum(dim=-1, keepdim=True) / n_valid.clamp(min=1)).pow(1.0 / q)
        if eps_mode == "relative":
            eps = eps * torch.where(valid, rewards.abs(), 0.0).amax(dim=-1, keepdim=True)
        advantages = _safe_divide(centered, scale + eps)

    if clip is not None:
        advantages = advantages.clamp(-clip, clip)
    # Exactly 0 for groups whose valid rewards are all equal: `r - mean(r)` is rounding noise there (e.g. 4e-16), which
    # the normalization would blow up (to ±1 when eps = 0).
    largest = torch.where(valid, rewards, -math.inf).amax(dim=-1, keepdim=True)
    smallest = torch.where(valid, rewards, math.inf).amin(dim=-1, keepdim=True)
    informative = (n_valid >= 2) & (largest > smallest)
    return torch.where(informative & valid, advantages, torch.zeros_like(advantages))


def aggregate_rewards(
    rewards: Tensor,
    weights: Tensor | None = None,
    *,
    mode: str = "sum_then_normalize",
    eps: float = 1e-6,
    eps_mode: str = "relative",
) -> Tensor:
    """Combine `K` reward functions into one reward per candidate (TRL `multi_objective_aggregation`).

    - `"sum_then_normalize"`: the weighted sum over `K`, skipping missing values (nansum); the caller then computes
      advantages with `group_advantages`.
    - `"normalize_then_sum"` (GDPO): each reward is first z-scored within its group (`group_advantages` with `eps`
      and `eps_mode`, no clip; a missing value contributes 0), then the weighted sum over `K` is taken; the caller
      then applies `group_advantages` again.

    In both modes a candidate whose `K` rewards are all missing stays NaN, so that `group_advantages` leaves it out of
    the group statistics and gives it advantage 0.

    Args:
        rewards: `[N, G, K]`, NaN = missing.
        weights: `[K]`, defaults to ones.
        mode: one of `REWARD_AGGREGATIONS`.
        eps, eps_mode: the z-score's `ε` for `"normalize_then_sum"` (see `group_advantages`).

    Returns:
        Aggregated rewards, `[N, G]`.
    """
    if mode not in REWARD_AGGREGATIONS:
        raise ValueError(f"Unknown reward aggregation mode {mode!r}; expected one of {REWARD_AGGREGATIONS}")
    if rewards.dim() != 3:
        raise ValueError(f"rewards must have shape [N, G, K], got {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    num_funcs = rewards.shape[-1]
    if weights is None:
        weights = torch.ones(num_funcs, dtype=rewards.dtype, device=rewards.device)
    else:
        weights = torch.as_tensor(weights, dtype=rewards.dtype, device=rewards.device)
    if weights.shape != (num_funcs,):
        raise ValueError(f"weights must have shape [K] = [{num_funcs}], got {tuple(weights.shape)}")

    unscorable = torch.isnan(rewards).all(dim=-1)
    if mode == "normalize_then_sum":
        n, g, k = rewards.shape
        per_func = rewards.permute(0, 2, 1).reshape(n * k, g)  # [N·K, G]: one group per (prompt, reward function)
        normalized = group_advantages(per_func, normalization="zscore", clip=None, eps=eps, eps_mode=eps_mode)
        rewards = normalized.reshape(n, k, g).permute(0, 2, 1)  # [N, G, K], no NaN
    total = torch.nansum(rewards * weights, dim=-1)
    return torch.where(unscorable, torch.full_like(total, float("nan")), total)


# ----------------------------------------------------------------------------------------------------------------------
# The surrogate categorical policy over the candidates
# ----------------------------------------------------------------------------------------------------------------------


def candidate_distances(anchors: Tensor, candidates: Tensor) -> Tensor:
    """Mean squared distance from every anchor to every candidate.

    Computed from the direct differences (exact for tiny distances, unlike the `|c|² - 2c·a + |a|²` expansion), in
    chunks of anchors to bound the transient memory, in float32 at least (float64 if an input is float64). Gradients
    flow to `anchors` and to `candidates` if they require grad; autograd keeps `A·G·prod(S)` differences.

    Args:
        anchors: `[A, *S]`.
        candidates: `[G, *S]`.

    Returns:
        `d`, `[A, G]` with `d[a, i] = mean((candidates[i] - anchors[a])²)` over the `prod(S)` elements.
    """
    if anchors.dim() < 1 or anchors.shape[1:] != candidates.shape[1:] or candidates.dim() != anchors.dim():
        raise ValueError(
            f"anchors [A, *S] and candidates [G, *S] must share *S; got {tuple(anchors.shape)} and "
            f"{tuple(candidates.shape)}"
        )
    dtype = _compute_dtype(anchors, candidates)
    anchors = anchors.to(dtype).flatten(1)  # [A, D]
    candidates = candidates.to(dtype).flatten(1)  # [G, D]
    per_anchor = max(1, candidates.numel())
    chunk = max(1, _MAX_CHUNK_ELEMENTS // per_anchor)
    rows = [
        (candidates.unsqueeze(0) - block.unsqueeze(1)).square().mean(dim=-1)  # [a, G]
        for block in anchors.split(chunk, dim=0)
    ]
    if not rows:  # A == 0
        return anchors.new_zeros(0, candidates.shape[0])
    return torch.cat(rows, dim=0)


def mean_pairwise_distance(candidates: Tensor) -> Tensor:
    """Mean of `candidate_distances` over the ordered pairs `i != j` of candidates.

    Args:
        candidates: `[G, *S]` with `G >= 2`.

    Returns:
        A scalar tensor (float32 at least).
    """
    num = candidates.shape[0]
    if num < 2:
        raise ValueError(f"mean_pairwise_distance needs at least 2 candidates, got {num}")
    distances = candidate_distances(candidates, candidates)  # [G, G], zero diagonal
    off_diagonal = ~torch.eye(num, dtype=torch.bool, device=distances.device)
    return distances[off_diagonal].mean()


def distance_temperature(candidates: Tensor, temperature: float, mode: str = "relative") -> Tensor:
    """The softmax temperature `τ` of the surrogate policy.

    - `"relative"` (project default): `τ = temperature × mean_pairwise_distance(candidates)`, detached and clamped to
      a tiny positive value. Distances are then measured in units of the group's spread, so the surrogate policy has
      the same shape at every sampler step whatever the scale of its predictions (`temperature` sets the shape: about
      `π(self) = 1 / (1 + (G - 1)·exp(-1/temperature))`, one-hot below ~0.15), and a reward that is linear in the
      candidates gives every step the gradient of the reward with respect to that step's prediction
      (`docs/method.md`);
    - `"absolute"`: `τ = temperature`, in the units of `candidate_distances`.

    Args:
        candidates: `[G, *S]` (`G >= 2` for `"relative"`).
        temperature: `> 0`.
        mode: one of `TEMPERATURE_MODES`.

    Returns:
        `τ`, a detached scalar tensor on the candidates' device (float32 at least).
    """
    if mode not in TEMPERATURE_MODES:
        raise ValueError(f"Unknown temperature mode {mode!r}; expected one of {TEMPERATURE_MODES}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    dtype = _compute_dtype(candidates)
    if mode == "absolute":
        return torch.tensor(temperature, dtype=dtype, device=candidates.device)
    with torch.no_grad():
        spread = mean_pairwise_distance(candidates.detach())
    return (temperature * spread).clamp(min=_MIN_TEMPERATURE)


def surrogate_log_probs(anchors: Tensor, candidates: Tensor, temperature: Tensor | float) -> Tensor:
    """Log-probabilities of the surrogate policy: `log π(i | a) = log_softmax_i(-d_i(a) / τ)`.

    Args:
        anchors: `[A, *S]`.
        candidates: `[G, *S]`.
        temperature: `τ > 0`, a float or a scalar tensor (e.g. from `distance_temperature`).

    Returns:
        `[A, G]` (float32 at least); each row is a normalized categorical distribution over the `G` candidates.
    """
    if not isinstance(temperature, Tensor) and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    distances = candidate_distances(anchors, candidates)
    return torch.log_softmax(-distances / temperature, dim=-1)


def surrogate_policy_stats(log_probs: Tensor, own: Tensor) -> dict[str, Tensor]:
    """The shape of a surrogate policy: its entropy and the probability an anchor gives to its own candidate.

    A one-hot policy (`self_prob` ≈ 1, entropy ≈ 0) is not a distribution over the candidates any more: its ratios
    jump by orders of magnitude as soon as the anchor moves. A flat one (entropy ≈ `log G`) does not tell the
    candidates apart.

    Args:
        log_probs: `[..., A, G]` from `surrogate_log_probs`, e.g. `[T, A, G]` for `T` sampler steps.
        own: `[A]` the index of each anchor's own candidate.

    Returns:
        `{"entropy": [...], "self_prob": [...]}`: the mean over the `A` anchors of the entropy (nats) and of
        `π(own | anchor)`, detached.
    """
    if own.shape != log_probs.shape[-2:-1]:
        raise ValueError(
            f"own must have shape [A] = [{log_probs.shape[-2]}], got {tuple(own.shape)} for log_probs "
            f"{tuple(log_probs.shape)}"
        )
    with torch.no_grad():
        probs = log_probs.exp()
        entropy = -torch.where(probs > 0, probs * log_probs, 0.0).sum(dim=-1).mean(dim=-1)
        index = own.to(log_probs.device).view(-1, 1).expand(*log_probs.shape[:-1], 1)
        self_prob = probs.gather(-1, index).squeeze(-1).mean(dim=-1)
    return {"entropy": entropy, "self_prob": self_prob}


def categorical_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Exact `KL(p ‖ q) = Σ p·(log p - log q)` between categorical distributions given by log-probabilities.

    Categories with `p = 0` contribute 0.

    Args:
        log_p: `[..., G]`.
        log_q: `[..., G]` (broadcastable to `log_p`).

    Returns:
        `[...]`.
    """
    p = log_p.exp()
    terms = p * (log_p - log_q)
    return torch.where(p > 0, terms, torch.zeros_like(terms)).sum(dim=-1)


# ----------------------------------------------------------------------------------------------------------------------
# Clipped policy objectives
# ----------------------------------------------------------------------------------------------------------------------


def clipped_surrogate(
    ratio: Tensor, advantages: Tensor, epsilon_low: float, epsilon_high: float | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate `min(ρ·A, clip(ρ, 1 - ε_low, 1 + ε_high)·A)`, per element.

    Args:
        ratio: `ρ`, any shape.
        advantages: `A`, broadcastable with `ratio`.
        epsilon_low: lower clip `ε_low >= 0`.
        epsilon_high: upper clip, defaults to `epsilon_low`.

    Returns:
        `(objective, stats)`: the objective with the broadcast shape of `(ratio, advantages)` (to be maximized), and
        detached scalar statistics: `"ratio_mean"`, `"ratio_min"`, `"ratio_max"` (over `ratio`), `"clip_low"` (fraction
        with `ρ < 1 - ε_low` and `A < 0`), `"clip_high"` (`ρ > 1 + ε_high` and `A > 0`) and `"clip_region"` (either: where
        the clip binds, TRL's `clip_ratio/region_mean`), the fractions taken over the broadcast shape.
    """
    epsilon_high = _check_epsilons(epsilon_low, epsilon_high)
    low, high = 1.0 - epsilon_low, 1.0 + epsilon_high
    objective = torch.minimum(ratio * advantages, ratio.clamp(low, high) * advantages)

    with torch.no_grad():
        ratio_b, adv_b = torch.broadcast_tensors(ratio.detach(), advantages.detach())
        below, above = ratio_b < low, ratio_b > high
        r = ratio.detach()
        stats = {
            "ratio_mean": r.mean(),
            "ratio_min": r.min(),
            "ratio_max": r.max(),
            "clip_low": (below & (adv_b < 0)).float().mean(),
            "clip_high": (above & (adv_b > 0)).float().mean(),
            "clip_region": ((below & (adv_b < 0)) | (above & (adv_b > 0))).float().mean(),
        }
    return objective, stats


def copo_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    *,
    epsilon: float,
    epsilon_high: float | None = None,
    ref_log_probs: Tensor | None = None,
    beta: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The CoPO loss over the surrogate categorical policies of a batch of anchors.

    `ρ_i = exp(log π_θ(i | a) - log π_old(i | a))`, `J_a = (1/G)·Σ_i clipped_surrogate(ρ_i, A_i)`,
    `loss = -mean_a J_a (+ beta·mean_a KL(π_θ(·|a) ‖ π_ref(·|a)) when beta > 0)`.

    Args:
        log_probs: `[A, G]` from `surrogate_log_probs` of the current anchors (with grad). Extra leading dimensions
            (e.g. `[T, A, G]` for several sampler steps) are averaged like the anchors.
        old_log_probs: same shape, from the old anchors (π_old; detached here).
        advantages: `[G]` or `[A, G]` (broadcastable to `log_probs`).
        epsilon: ratio clip `ε` (lower, and upper unless `epsilon_high` is given).
        epsilon_high: upper ratio clip, defaults to `epsilon`.
        ref_log_probs: same shape as `log_probs`, from the reference anchors (π_ref, detached here); required when
            `beta > 0`.
        beta: KL coefficient `>= 0`.

    Returns:
        `(loss, stats)`: a scalar loss and the `clipped_surrogate` statistics, plus `"kl"` (mean KL) when `beta > 0`.
    """
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if log_probs.shape != old_log_probs.shape:
        raise ValueError(
            f"log_probs and old_log_probs must have the same shape, got {tuple(log_probs.shape)} and "
            f"{tuple(old_log_probs.shape)}"
        )
    ratio = torch.exp(log_probs - old_log_probs.detach())
    objective, stats = clipped_surrogate(ratio, advantages.to(ratio.dtype), epsilon, epsilon_high)
    loss = -objective.mean()  # mean over candidates (1/G Σ_i) and over anchors (and steps)
    if beta > 0:
        if ref_log_probs is None:
            raise ValueError("ref_log_probs is required when beta > 0")
        kl = categorical_kl(log_probs, ref_log_probs.detach()).mean()
        loss = loss + beta * kl
        stats["kl"] = kl.detach()
    return loss, stats


# ----------------------------------------------------------------------------------------------------------------------
# SDE-GRPO baseline
# ----------------------------------------------------------------------------------------------------------------------


def gaussian_renoise_log_prob(x_next: Tensor, x0: Tensor, sigma_next: float, *, reduction: str = "mean") -> Tensor:
    """Log-density of the sampler's re-noising step, `x_next ~ N((1 - σ)·x0, σ²·I)`, per batch row.

    The per-element log-density, `-(x_next - (1 - σ)·x0)² / (2σ²) - log σ - log sqrt(2π)`, is the one of
    `torch.distributions.Normal`; it is computed in float32 at least.

    Args:
        x_next: the re-noised sample, `[B, *S]`.
        x0: the predicted clean sample, `[B, *S]`.
        sigma_next: the next step's sigma `σ > 0`.
        reduction: `"mean"` over the elements (Flow-GRPO convention, keeps ratios O(1)) or `"sum"`.

    Returns:
        `[B]`.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"Unknown reduction {reduction!r}; expected 'mean' or 'sum'")
    if not (sigma_next > 0 and math.isfinite(sigma_next)):
        raise ValueError(f"sigma_next must be a finite number > 0, got {sigma_next}")
    if x_next.shape != x0.shape or x_next.dim() < 1:
        raise ValueError(f"x_next and x0 must both be [B, *S], got {tuple(x_next.shape)} and {tuple(x0.shape)}")
    dtype = _compute_dtype(x_next, x0)
    x_next, x0 = x_next.to(dtype), x0.to(dtype)
    mean = (1.0 - sigma_next) * x0
    log_density = (
        -((x_next - mean) ** 2) / (2 * sigma_next**2) - math.log(sigma_next) - math.log(math.sqrt(2 * math.pi))
    )
    log_density = log_density.flatten(1)
    return log_density.mean(dim=1) if reduction == "mean" else log_density.sum(dim=1)


def grpo_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    *,
    epsilon: float,
    epsilon_high: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The SDE-GRPO loss: `-mean(clipped_surrogate(exp(log_probs - old_log_probs), A))`.

    Args:
        log_probs: `[G]` or `[G, T']` (per candidate, and per trained sampler step), with grad.
        old_log_probs: same shape (detached here).
        advantages: `[G]`, broadcast over the trailing dimensions of `log_probs`.
        epsilon: ratio clip (lower, and upper unless `epsilon_high` is given).
        epsilon_high: upper ratio clip, defaults to `epsilon`.

    Returns:
        `(loss, stats)`: a scalar loss and the `clipped_surrogate` statistics.
    """
    if log_probs.shape != old_log_probs.shape:
        raise ValueError(
            f"log_probs and old_log_probs must have the same shape, got {tuple(log_probs.shape)} and "
            f"{tuple(old_log_probs.shape)}"
        )
    if log_probs.dim() < 1 or advantages.shape != log_probs.shape[:1]:
        raise ValueError(
            f"advantages must have shape [G] matching log_probs [G, ...]; got {tuple(advantages.shape)} and "
            f"{tuple(log_probs.shape)}"
        )
    ratio = torch.exp(log_probs - old_log_probs.detach())
    advantages = advantages.to(ratio.dtype).reshape(-1, *([1] * (log_probs.dim() - 1)))
    objective, stats = clipped_surrogate(ratio, advantages, epsilon, epsilon_high)
    return -objective.mean(), stats

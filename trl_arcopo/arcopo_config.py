"""``ARCoPOConfig``: the training arguments of the AR-CoPO trainer."""

import json
import math
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from .utils.redact import redact_secrets

# Allowed values of the string-valued options (the first one is the default).
_PIVOT_STRATEGIES = ("uniform", "fixed", "weighted")
_EXPLORATIONS = ("fork", "sde")
_TRAINING_MODES = ("on_policy", "semi_on_policy")
_TEMPERATURE_MODES = ("relative", "absolute")
_ADVANTAGE_NORMALIZATIONS = ("zscore", "quasi_norm", "none")
_ADVANTAGE_EPSILON_MODES = ("relative", "absolute")
_MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
_REWARD_ERRORS = ("raise", "skip_group")
_DTYPES = ("auto", "bfloat16", "float16", "float32")  # `model_init_kwargs["dtype"]` as a string


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value)


def _format_choices(choices: tuple[str, ...]) -> str:
    return ", ".join(f'"{choice}"' for choice in choices)


@dataclass
class ARCoPOConfig(TrainingArguments):
    r"""
    Configuration class for the AR-CoPO trainer.

    AR-CoPO ("Align Autoregressive Video Generation with Contrastive Policy Optimization") aligns a streaming
    autoregressive video generator (Self-Forcing on Wan2.1, loaded as a `CausalWanPipeline`) with reward models. For
    every prompt, it generates one rollout group: the chunks before a pivot chunk are generated once, the pivot chunk is
    forked into `num_generations` branches with correlated initial noise, and every branch is completed and scored. The
    loss is the clipped contrastive (Neighbor GRPO) objective computed in x̂0 space on the pivot chunk, and only LoRA
    adapters on the transformer are trained.

    This class includes only the parameters that are specific to AR-CoPO training. For a full list of training
    arguments, please refer to the [`~transformers.TrainingArguments`] documentation. Note that default values in this
    class may differ from those in [`~transformers.TrainingArguments`].

    Using [`~transformers.HfArgumentParser`] (or [`~trl.TrlParser`], which also reads a `--config` YAML file) we can
    turn this class into [argparse](https://docs.python.org/3/library/argparse#module-argparse) arguments that can be
    specified on the command line.

    Parameters:
        > Parameters that control the model and LoRA

        model_init_kwargs (`dict[str, Any]` or `str`, *optional*):
            Keyword arguments for `CausalWanPipeline.from_pretrained`, used when the `model` argument of the trainer
            is a model id or a local path, e.g. `{"dtype": "bfloat16"}` (`dtype` is `"auto"`, `"bfloat16"`,
            `"float16"`, `"float32"` or a `torch.dtype`). On the command line, pass a JSON string.
        lora_r (`int`, *optional*, defaults to `64`):
            Rank of the LoRA adapter trained on the transformer.
        lora_alpha (`int`, *optional*, defaults to `128`):
            LoRA scaling numerator: the update is scaled by `lora_alpha / lora_r`.
        lora_dropout (`float`, *optional*, defaults to `0.0`):
            Dropout probability of the LoRA layers, in `[0, 1)`.
        lora_target_modules (`list[str]`, *optional*, defaults to `["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]`):
            Names of the transformer modules that receive a LoRA adapter: the attention projections and the
            feed-forward layers of every Wan block.
        adapter_name (`str`, *optional*):
            Name of the trained LoRA adapter. If `None`, `"on_policy"` for on-policy training and `"semi"` for
            semi-on-policy training: the two adapters of the paper, merged at inference.
        transformer_gradient_checkpointing (`bool`, *optional*, defaults to `False`):
            Whether to enable gradient checkpointing in the transformer with
            `transformer.enable_gradient_checkpointing()`, trading compute for memory. Use this flag, not
            `gradient_checkpointing`: the [`~transformers.TrainingArguments`] flag calls methods that diffusers models
            do not have, so it must stay `False`.

        > Parameters that control generation (rollouts)

        num_frames (`int`, *optional*, defaults to `81`):
            Number of pixel frames of every generated video. Its latent frames must split into whole chunks of the
            pipeline, which [`ARCoPOTrainer`] checks with [`CausalWanPipeline.check_video_size`]: with Wan2.1's VAE
            (4 pixel frames per latent frame, the first one alone) and 3-frame chunks, `9 + 12·k` (81 frames = 21
            latent frames = 7 chunks); with the toy generator's per-frame VAE, a multiple of 3.
        height (`int`, *optional*, defaults to `480`):
            Height of the generated videos in pixels, a multiple of the pipeline's VAE stride times its patch size
            (16 on Wan2.1, 8 on the toy generator).
        width (`int`, *optional*, defaults to `832`):
            Width of the generated videos in pixels, a multiple of the same number as `height`.
        rollout_batch_size (`int`, *optional*):
            Number of branches of a rollout group denoised in one batched forward pass. Lower it to save memory. If
            `None`, all `num_generations` branches are denoised at once.
        pivot_strategy (`str`, *optional*, defaults to `"uniform"`):
            How the pivot chunk (the forked and trained chunk) of every rollout group is chosen:

            - `"uniform"`: uniformly at random among all chunks, as in the paper;
            - `"fixed"`: always the chunk `pivot_index`;
            - `"weighted"`: at random, with probabilities proportional to `pivot_weights`.

        pivot_index (`int`, *optional*):
            0-based index of the pivot chunk, smaller than the number of chunks (checked by the trainer). Required when
            `pivot_strategy="fixed"`, must be `None` otherwise.
        pivot_weights (`list[float]`, *optional*):
            One non-negative weight per chunk (as many as the pipeline makes of `num_frames`; checked by the trainer),
            not all zero. Required when `pivot_strategy="weighted"`, must be `None` otherwise.
        exploration (`str`, *optional*, defaults to `"fork"`):
            How the branches of a rollout group explore:

            - `"fork"`: AR-CoPO chunk-level noise forking, the initial noise of the pivot chunk of branch `i` is
              `sqrt(1 - noise_sigma²)·ε* + noise_sigma·δ_i` and the loss is the contrastive objective;
            - `"sde"`: the SDE-GRPO baseline (Flow-GRPO / DanceGRPO style), branches differ in the Gaussian re-noise
              draws of the few-step sampler and the loss is the GRPO ratio of their exact likelihoods.

        training_mode (`str`, *optional*, defaults to `"on_policy"`):
            Where the rollout groups come from:

            - `"on_policy"`: generated by the current policy from the prompts of the training dataset;
            - `"semi_on_policy"`: sampled from `replay_dataset`, a buffer of groups generated by the reference policy
              (no generation during training). The recorded predictions are the old policy, so the ratio clip keeps
              the trained policy near the reference.

        replay_dataset (`str`, *optional*):
            Folder or Hub dataset id of the replay buffer (made with `trl-arcopo collect`) to train on. Required when
            `training_mode="semi_on_policy"`, must be `None` otherwise. Its generation settings must match this
            configuration and the pipeline.

        > Parameters that control the AR-CoPO objective

        num_generations (`int`, *optional*, defaults to `12`):
            Group size `G`: number of branches (candidate videos) generated per prompt. Must be at least 2.
        num_anchors (`int`, *optional*, defaults to `4`):
            Number `B` of anchors drawn without replacement from the `G` candidates of every group, at which the
            contrastive surrogate policy is evaluated. Must be between 1 and `num_generations`.
        noise_sigma (`float`, *optional*, defaults to `0.5`):
            Exploration radius `σ` of the noise forking, in `(0, 1]`. `1` makes the branches' pivot noises independent.
        epsilon (`float`, *optional*, defaults to `1e-4`):
            Ratio clipping value `ε`: ratios are clipped to `[1 - epsilon, 1 + epsilon_high]`. The paper uses a very
            tight trust region: the clip binds once an anchor's prediction has moved by about
            `epsilon × distance_temperature / √2` of the candidates' spread (relative temperature), so at the second
            update of a rollout most ratios are clipped unless the learning rate is small (docs/method.md §6.3).
        epsilon_high (`float`, *optional*):
            Upper clipping value. If `None`, `epsilon` is used (symmetric clipping).
        num_iterations (`int`, *optional*, defaults to `2`):
            Number `μ` of policy updates per rollout group.
        distance_temperature (`float`, *optional*, defaults to `0.5`):
            Temperature `τ` of the contrastive softmax over negative distances between candidates and anchor. How it
            is used depends on `temperature_mode`. With the default relative mode, it sets the shape of the old
            policy: an anchor keeps about `1 / (1 + (G - 1)·exp(-1/distance_temperature))` of the probability on its
            own candidate (0.5 for `G = 8`, 0.4 for `G = 12`; watch `policy/self_prob`); below ~0.15 the policy is
            one-hot and its ratios jump by orders of magnitude after one update. `τ` does not change the direction
            of the first update of a rollout, only how fast the ratios leave the clip range afterwards
            (see docs/method.md).
        temperature_mode (`str`, *optional*, defaults to `"relative"`):
            - `"relative"`: `τ = distance_temperature × mean pairwise distance among the candidates` (detached,
              recomputed at every sampler step): distances in units of the group's spread, so each step's gradient is
              the reward's gradient with respect to that step's prediction, as in backpropagation through the
              sampler;
            - `"absolute"`: `τ = distance_temperature`, in units of the mean squared distance of latents (steps with
              a larger spread then weigh more).

        advantage_normalization (`str`, *optional*, defaults to `"zscore"`):
            How rewards become advantages within a group:

            - `"zscore"`: `(r - mean(r)) / (std(r) + ε)`, as in the paper;
            - `"quasi_norm"`: Neighbor GRPO's quasi-norm reweighting with exponent `quasi_norm_p` (against reward
              flattening; `p = 2` is the z-score);
            - `"none"`: `r - mean(r)`, so groups weigh by their raw reward spread.

        advantage_epsilon (`float`, *optional*, defaults to `1e-6`):
            `ε` added to the scale of the advantage normalization (and of the per-reward z-score of
            `multi_objective_aggregation="normalize_then_sum"`), `>= 0`. Its unit depends on `advantage_epsilon_mode`.
        advantage_epsilon_mode (`str`, *optional*, defaults to `"relative"`):
            - `"relative"`: `ε = advantage_epsilon × max |r|` over the group, so advantages do not depend on the
              reward's units: only a spread below `advantage_epsilon` of the rewards' magnitude (rounding noise) is
              damped;
            - `"absolute"`: `ε = advantage_epsilon` in the reward's units (the paper: `1e-4`); groups whose spread is
              near or below it then weigh by their raw spread instead of being normalised.

        quasi_norm_p (`float`, *optional*, defaults to `0.8`):
            Exponent `q` of the quasi-norm reweighting, used when `advantage_normalization="quasi_norm"`.
        advantage_clip (`float`, *optional*, defaults to `5.0`):
            Advantages are clipped to `[-advantage_clip, advantage_clip]`. `None` disables clipping (`null` in a YAML
            config, `none` on the command line).
        beta (`float`, *optional*, defaults to `0.0`):
            KL coefficient. If `0.0` (the paper), there is no KL term. Otherwise the exact KL divergence between the
            categorical surrogate policies of the trained model and of the reference (the same transformer with the
            adapters disabled) is added to the loss.
        train_steps (`list[int]`, *optional*):
            Indices of the sampler steps of the pivot chunk that are trained (e.g. `[0, 1]` for the first two of 4
            steps). If `None`, all steps are trained.

        > Parameters that control the rewards

        reward_weights (`list[float]` or `dict[str, float]`, *optional*):
            Weights of the rewards. A list gives one weight per reward function (applied to each head of a reward that
            returns heads) or one per reward column; a dict is keyed by column (`"videoalign:VQ"`) or by reward name,
            and the columns it does not cover weigh 0 (VideoAlign as in the paper:
            `{"videoalign:VQ": 1.0, "videoalign:MQ": 1.0, "videoalign:TA": 1.0}`). On the command line, a list of
            numbers or a JSON object. If `None`, every reward column has weight `1.0`.
        multi_objective_aggregation (`str`, *optional*, defaults to `"sum_then_normalize"`):
            How several rewards are combined into one advantage:

            - `"sum_then_normalize"`: weighted sum of the rewards, then group normalization;
            - `"normalize_then_sum"`: group normalization of every reward, then weighted sum.

        reward_error (`str`, *optional*, defaults to `"raise"`):
            What to do when a reward function raises, or returns NaN, non-finite values or the wrong number of values:

            - `"raise"`: stop training with the error (after saving a checkpoint);
            - `"skip_group"`: skip the affected rollout group (logged in `rewards/failed_groups`; it adds nothing to
              the loss, and an optimizer step whose groups were all skipped leaves the LoRA and the optimizer state
              unchanged) and continue, up to the ceilings `max_consecutive_skipped_groups` and
              `max_skipped_group_fraction`.

        max_consecutive_skipped_groups (`int`, *optional*, defaults to `10`):
            With `reward_error="skip_group"`: after this many skipped groups in a row (counted over all processes),
            the trainer saves a checkpoint and stops with an error (a reward that is down fails every group).
        max_skipped_group_fraction (`float`, *optional*, defaults to `0.25`):
            With `reward_error="skip_group"`: when more than this fraction of all groups scored so far were skipped,
            the trainer saves a checkpoint and stops with an error. Checked from the `max_consecutive_skipped_groups`-th
            group on, so that a few failures at the start do not stop a run. In `(0, 1]`; `1` disables it.

        overlap_rewards (`bool`, *optional*, defaults to `True`):
            Whether to score each rollout group in a background thread while the next group of the step is rolled out
            (rewards then cost no extra time when they run on other hardware or wait on a reward server). Keeps the
            decoded videos of two groups in memory instead of one; set `False` when that does not fit.
        max_consecutive_nonfinite_losses (`int`, *optional*, defaults to `3`):
            After this many non-finite losses in a row, the trainer saves a checkpoint and stops.

        > Parameters that control logging

        log_videos_steps (`int`, *optional*, defaults to `0`):
            Log sample videos every this many optimizer steps to the `report_to` trackers. `0` never logs videos.
        num_videos_to_log (`int`, *optional*, defaults to `2`):
            Number of videos logged each time.
        video_fps (`int`, *optional*, defaults to `16`):
            Frame rate of the logged videos.

    > [!NOTE]
    > These parameters have default values different from [`~transformers.TrainingArguments`]:
    > - `learning_rate`: Defaults to `1e-5` instead of `5e-5` (the paper's value).
    > - `logging_steps`: Defaults to `1` instead of `500` (rollouts are expensive: every step is logged).
    > - `per_device_train_batch_size`: Defaults to `1` instead of `8`; it counts rollout groups (prompts), each of
    >   `num_generations` videos.
    > - `remove_unused_columns`: Defaults to `False` instead of `True`, so reward functions see every dataset column.
    > - `bf16`: Defaults to `True` when a CUDA device with bfloat16 support is available and `fp16` is not set,
    >   instead of `False`.
    """

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["model_init_kwargs", "reward_weights"]

    # Parameters whose default values are overridden from TrainingArguments
    learning_rate: float = field(
        default=1e-5,
        metadata={"help": "The initial learning rate for AdamW (paper: 1e-5)."},
    )
    logging_steps: float = field(
        default=1,
        metadata={
            "help": "Log every X updates steps. Should be an integer or a float in range `[0,1)`. If smaller than 1, "
            "will be interpreted as ratio of total training steps. Defaults to 1: rollouts are expensive, so every "
            "step is logged."
        },
    )
    per_device_train_batch_size: int = field(
        default=1,
        metadata={
            "help": "Number of rollout groups (prompts) per device per optimizer step; every group holds "
            "`num_generations` videos."
        },
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={
            "help": "Whether to drop the dataset columns other than the prompt. Keep False so that reward functions "
            "receive every column."
        },
    )
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "Whether to use bf16 (mixed) precision instead of 32-bit. If not set, defaults to True when a CUDA "
            "device with bfloat16 support is available and `fp16` is not set, else False."
        },
    )

    # Parameters that control the model and LoRA
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments for `CausalWanPipeline.from_pretrained`, used when the `model` argument of the "
            'trainer is a model id or a path, e.g. `{"dtype": "bfloat16"}`. On the command line, pass a JSON string.'
        },
    )
    lora_r: int = field(
        default=64,
        metadata={"help": "Rank of the LoRA adapter trained on the transformer."},
    )
    lora_alpha: int = field(
        default=128,
        metadata={"help": "LoRA scaling numerator: the update is scaled by `lora_alpha / lora_r`."},
    )
    lora_dropout: float = field(
        default=0.0,
        metadata={"help": "Dropout probability of the LoRA layers, in [0, 1)."},
    )
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"],
        metadata={
            "help": "Names of the transformer modules that receive a LoRA adapter (attention projections and "
            "feed-forward layers of every Wan block)."
        },
    )
    adapter_name: str | None = field(
        default=None,
        metadata={
            "help": "Name of the trained LoRA adapter. If None, 'on_policy' for on-policy training and 'semi' for "
            "semi-on-policy training."
        },
    )
    transformer_gradient_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "Whether to call `transformer.enable_gradient_checkpointing()` to trade compute for memory. Use "
            "this flag, not `gradient_checkpointing`: the TrainingArguments flag calls methods that diffusers "
            "models do not have, so it must stay False."
        },
    )

    # Parameters that control generation (rollouts)
    num_frames: int = field(
        default=81,
        metadata={
            "help": "Number of pixel frames per video; its latent frames must split into whole chunks of the pipeline "
            "(checked by the trainer): 9 + 12·k on Wan2.1 (81 = 7 chunks of 3 latent frames), a multiple of 3 on the "
            "toy generator."
        },
    )
    height: int = field(
        default=480,
        metadata={"help": "Height of the generated videos in pixels, a multiple of 16 on Wan2.1 (8 on the toy)."},
    )
    width: int = field(
        default=832,
        metadata={"help": "Width of the generated videos in pixels, a multiple of 16 on Wan2.1 (8 on the toy)."},
    )
    rollout_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Number of branches of a rollout group denoised in one batched forward pass (lower it to save "
            "memory). If None, all `num_generations` branches at once."
        },
    )
    pivot_strategy: str = field(
        default="uniform",
        metadata={
            "help": "How the pivot chunk (forked and trained) of every group is chosen: 'uniform' (uniformly at "
            "random, the paper), 'fixed' (always `pivot_index`) or 'weighted' (at random, proportionally to "
            "`pivot_weights`).",
            "choices": list(_PIVOT_STRATEGIES),
        },
    )
    pivot_index: int | None = field(
        default=None,
        metadata={"help": "0-based index of the pivot chunk; required when `pivot_strategy='fixed'`."},
    )
    pivot_weights: list[float] | None = field(
        default=None,
        metadata={
            "help": "One non-negative weight per chunk, not all zero; required when `pivot_strategy='weighted'`."
        },
    )
    exploration: str = field(
        default="fork",
        metadata={
            "help": "How the branches explore: 'fork' (AR-CoPO chunk-level noise forking with the contrastive "
            "objective) or 'sde' (the SDE-GRPO baseline: branches differ in the sampler's re-noise draws).",
            "choices": list(_EXPLORATIONS),
        },
    )
    training_mode: str = field(
        default="on_policy",
        metadata={
            "help": "Where rollout groups come from: 'on_policy' (generated by the current policy) or "
            "'semi_on_policy' (sampled from the reference-policy buffer `replay_dataset`).",
            "choices": list(_TRAINING_MODES),
        },
    )
    replay_dataset: str | None = field(
        default=None,
        metadata={
            "help": "Folder or Hub dataset id of the replay buffer (made with `trl-arcopo collect`); required when "
            "`training_mode='semi_on_policy'`."
        },
    )

    # Parameters that control the AR-CoPO objective
    num_generations: int = field(
        default=12,
        metadata={"help": "Group size G: number of branches (videos) generated per prompt, at least 2."},
    )
    num_anchors: int = field(
        default=4,
        metadata={
            "help": "Number B of anchors drawn without replacement from the G candidates of every group, between 1 "
            "and `num_generations`."
        },
    )
    noise_sigma: float = field(
        default=0.5,
        metadata={"help": "Exploration radius sigma of the noise forking, in (0, 1]."},
    )
    epsilon: float = field(
        default=1e-4,
        metadata={
            "help": "Ratio clipping value: ratios are clipped to [1 - epsilon, 1 + epsilon_high] (paper: 1e-4). With "
            "a relative temperature the clip binds once an anchor moved by ~epsilon x distance_temperature / sqrt(2) "
            "of the candidates' spread."
        },
    )
    epsilon_high: float | None = field(
        default=None,
        metadata={"help": "Upper clipping value. If None, `epsilon` is used (symmetric clipping)."},
    )
    num_iterations: int = field(
        default=2,
        metadata={"help": "Number mu of policy updates per rollout group."},
    )
    distance_temperature: float = field(
        default=0.5,
        metadata={
            "help": "Temperature of the contrastive softmax over negative candidate-anchor distances; see "
            "`temperature_mode`. Relative: sets the old policy's shape, pi(self) ~ 1 / (1 + (G-1) exp(-1/value)) "
            "(0.5 for G = 8); below ~0.15 the policy is one-hot."
        },
    )
    temperature_mode: str = field(
        default="relative",
        metadata={
            "help": "'relative': tau = `distance_temperature` x mean pairwise candidate distance (per step, "
            "detached; each step then gets the reward's gradient w.r.t. its prediction); 'absolute': tau = "
            "`distance_temperature` (steps with a larger spread weigh more).",
            "choices": list(_TEMPERATURE_MODES),
        },
    )
    advantage_normalization: str = field(
        default="zscore",
        metadata={
            "help": "How rewards become advantages within a group: 'zscore' (the paper), 'quasi_norm' (Neighbor "
            "GRPO's quasi-norm reweighting with exponent `quasi_norm_p`) or 'none' (centered rewards).",
            "choices": list(_ADVANTAGE_NORMALIZATIONS),
        },
    )
    advantage_epsilon: float = field(
        default=1e-6,
        metadata={
            "help": "Epsilon added to the advantage normalization's scale (>= 0), in the unit of "
            "`advantage_epsilon_mode`."
        },
    )
    advantage_epsilon_mode: str = field(
        default="relative",
        metadata={
            "help": "'relative': epsilon = `advantage_epsilon` x max |reward| of the group (advantages independent "
            "of the reward's units); 'absolute': epsilon = `advantage_epsilon` (the paper: 1e-4).",
            "choices": list(_ADVANTAGE_EPSILON_MODES),
        },
    )
    quasi_norm_p: float = field(
        default=0.8,
        metadata={"help": "Exponent of the quasi-norm reweighting, used when `advantage_normalization='quasi_norm'`."},
    )
    advantage_clip: float | str | None = field(
        default=5.0,
        metadata={
            "help": "Advantages are clipped to [-advantage_clip, advantage_clip]. 'none' disables clipping.",
        },
    )
    beta: float = field(
        default=0.0,
        metadata={
            "help": "KL coefficient. If 0.0 (the paper), no KL term; otherwise the exact categorical KL to the "
            "reference (the transformer with the adapters disabled) is added to the loss."
        },
    )
    train_steps: list[int] | None = field(
        default=None,
        metadata={"help": "Indices of the sampler steps of the pivot chunk that are trained. If None, all steps."},
    )

    # Parameters that control the rewards
    # `str` second: the argument parser then reads strings (numbers, or one JSON object), converted in __post_init__.
    reward_weights: dict[str, float] | str | list[float] | None = field(
        default=None,
        metadata={
            "nargs": "+",
            "help": "Weights of the rewards: a list (one per reward function, or one per reward column) or a dict "
            "keyed by column ('videoalign:VQ') or reward name, uncovered columns weighing 0 (a JSON object on the "
            "command line). If None, every reward column has weight 1.0.",
        },
    )
    multi_objective_aggregation: str = field(
        default="sum_then_normalize",
        metadata={
            "help": "How several rewards are combined: 'sum_then_normalize' (weighted sum, then group "
            "normalization) or 'normalize_then_sum' (group normalization of each reward, then weighted sum).",
            "choices": list(_MULTI_OBJECTIVE_AGGREGATIONS),
        },
    )
    reward_error: str = field(
        default="raise",
        metadata={
            "help": "When a reward function raises or returns NaN, non-finite values or the wrong number of values: "
            "'raise' stops training, 'skip_group' skips that rollout group and continues.",
            "choices": list(_REWARD_ERRORS),
        },
    )
    overlap_rewards: bool = field(
        default=True,
        metadata={
            "help": "Whether to score each rollout group in a background thread while the next group is rolled out "
            "(holds the videos of two groups in memory instead of one)."
        },
    )
    max_consecutive_skipped_groups: int = field(
        default=10,
        metadata={
            "help": "With reward_error='skip_group': after this many skipped groups in a row (over all processes), "
            "save a checkpoint and stop with an error (>= 1)."
        },
    )
    max_skipped_group_fraction: float = field(
        default=0.25,
        metadata={
            "help": "With reward_error='skip_group': when more than this fraction of the groups scored so far were "
            "skipped (checked from the `max_consecutive_skipped_groups`-th group on), save a checkpoint and stop "
            "with an error. In (0, 1]; 1 disables it."
        },
    )
    max_consecutive_nonfinite_losses: int = field(
        default=3,
        metadata={
            "help": "After this many non-finite losses in a row, the trainer saves a checkpoint and stops (>= 1)."
        },
    )

    # Parameters that control logging
    log_videos_steps: int = field(
        default=0,
        metadata={
            "help": "Log sample videos every this many optimizer steps to the `report_to` trackers; 0 never logs."
        },
    )
    num_videos_to_log: int = field(
        default=2,
        metadata={"help": "Number of videos logged each time."},
    )
    video_fps: int = field(
        default=16,
        metadata={"help": "Frame rate of the logged videos."},
    )

    def to_dict(self) -> dict[str, Any]:
        """The arguments as a dict with every secret redacted (`hub_token`, a `token` in `model_init_kwargs`, ...):
        what `training_args.json`, the trackers' configs and `repr` show."""
        return redact_secrets(super().to_dict())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"

    __str__ = __repr__

    def __post_init__(self):
        # Resolve `bf16` before TrainingArguments validates it against the device.
        if self.bf16 is None:
            self.bf16 = not self.fp16 and not self.use_cpu and _cuda_bf16_available()

        super().__post_init__()

        self._parse_cli_values()
        self._validate_training_arguments()
        self._validate_model_and_lora()
        self._validate_generation()
        self._validate_objective()
        self._validate_rewards_and_logging()

    # ------------------------------------------------------------------------------------------------------------------
    # Parsing of values that may arrive as strings (command line, JSON)

    def _parse_cli_values(self) -> None:
        # TrainingArguments already parses JSON strings that start with "{" for `_VALID_DICT_FIELDS`; anything else
        # that is still a string here is not a valid mapping.
        if isinstance(self.model_init_kwargs, str):
            try:
                parsed = json.loads(self.model_init_kwargs)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"`model_init_kwargs` ({self.model_init_kwargs!r}) is not valid JSON ({err}); pass a JSON object "
                    'such as \'{"dtype": "bfloat16"}\'.'
                ) from err
            self.model_init_kwargs = parsed
        if self.model_init_kwargs is not None and not isinstance(self.model_init_kwargs, dict):
            raise ValueError(
                f"`model_init_kwargs` ({self.model_init_kwargs!r}) must be a dict (or a JSON object string); pass "
                'for example {"dtype": "bfloat16"}.'
            )
        import torch

        for key in ("dtype", "torch_dtype"):
            dtype = (self.model_init_kwargs or {}).get(key)
            if dtype is not None and not isinstance(dtype, torch.dtype) and dtype not in _DTYPES:
                raise ValueError(
                    f"`model_init_kwargs['{key}']` ({dtype!r}) is not a dtype; use one of {_format_choices(_DTYPES)} "
                    "or a torch.dtype."
                )

        # `advantage_clip` is typed `float | str | None` only so that `--advantage_clip none` works on the command line.
        if isinstance(self.advantage_clip, str):
            text = self.advantage_clip.strip()
            if text.lower() in ("none", "null"):
                self.advantage_clip = None
            else:
                try:
                    self.advantage_clip = float(text)
                except ValueError:
                    raise ValueError(
                        f"`advantage_clip` ({self.advantage_clip!r}) must be a positive number or None; pass e.g. "
                        "5.0, or 'none' to disable clipping."
                    ) from None

    # ------------------------------------------------------------------------------------------------------------------
    # Validation

    def _validate_training_arguments(self) -> None:
        # `gradient_checkpointing` is an alias of `activation_checkpointing` in transformers 5; after
        # `super().__post_init__()` both hold the resolved value.
        if self.gradient_checkpointing or getattr(self, "activation_checkpointing", False):
            raise ValueError(
                "`gradient_checkpointing` (True) is not supported: `Trainer` would call "
                "`gradient_checkpointing_enable()`, which diffusers models do not have. Set "
                "`gradient_checkpointing=False` (and `activation_checkpointing=False`) and use "
                "`transformer_gradient_checkpointing=True` instead."
            )
        if self.auto_find_batch_size:
            raise ValueError(
                "`auto_find_batch_size` (True) is not supported: a rollout group of `num_generations` videos must "
                "stay whole, and shrinking the batch on out-of-memory would split it. Set `auto_find_batch_size=False` "
                "and lower `per_device_train_batch_size` or `rollout_batch_size` instead."
            )
        _check_int("per_device_train_batch_size", self.per_device_train_batch_size, minimum=1)
        _check_int("gradient_accumulation_steps", self.gradient_accumulation_steps, minimum=1)
        # TrainingArguments accepts these unchecked; torch or numpy would fail on them at the first step (or, for a
        # NaN, train on NaN weights).
        if not (_is_finite_number(self.learning_rate) and self.learning_rate >= 0):
            raise ValueError(
                f"`learning_rate` ({self.learning_rate!r}) must be a finite number >= 0; the paper uses 1e-5."
            )
        for name in ("seed", "data_seed"):
            value = getattr(self, name)
            if value is not None and not (_is_int(value) and 0 <= value < 2**32):
                raise ValueError(
                    f"`{name}` ({value!r}) must be an integer in [0, 2**32 - 1] (numpy's range); use e.g. 42."
                )
        if not (_is_finite_number(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"`weight_decay` ({self.weight_decay!r}) must be a finite number >= 0; use e.g. 0.0.")
        if not (_is_finite_number(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise ValueError(
                f"`max_grad_norm` ({self.max_grad_norm!r}) must be a finite number >= 0 (0 disables clipping); use "
                "e.g. 1.0."
            )
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            if not (_is_finite_number(value) and 0 <= value < 1):
                raise ValueError(f"`{name}` ({value!r}) must be in [0, 1); the defaults are 0.9 and 0.999.")
        _check_positive("adam_epsilon", self.adam_epsilon, hint="the default is 1e-8")

    def _validate_model_and_lora(self) -> None:
        _check_int("lora_r", self.lora_r, minimum=1)
        _check_int("lora_alpha", self.lora_alpha, minimum=1)
        if not (_is_number(self.lora_dropout) and 0.0 <= self.lora_dropout < 1.0):
            raise ValueError(f"`lora_dropout` ({self.lora_dropout!r}) must be in [0, 1); use e.g. 0.0.")
        if (
            not isinstance(self.lora_target_modules, (list, tuple))
            or len(self.lora_target_modules) == 0
            or not all(isinstance(name, str) and name for name in self.lora_target_modules)
        ):
            raise ValueError(
                f"`lora_target_modules` ({self.lora_target_modules!r}) must be a non-empty list of module names; use "
                'e.g. ["to_q", "to_k", "to_v", "to_out.0"].'
            )
        self.lora_target_modules = list(self.lora_target_modules)
        if self.adapter_name is None:
            self.adapter_name = "semi" if self.training_mode == "semi_on_policy" else "on_policy"
        if not isinstance(self.adapter_name, str) or not self.adapter_name:
            raise ValueError(
                f"`adapter_name` ({self.adapter_name!r}) must be a non-empty string; use e.g. 'on_policy'."
            )

    def _validate_generation(self) -> None:
        # Which sizes split into whole chunks depends on the pipeline's VAE and chunks: the trainer checks them.
        for name in ("num_frames", "height", "width"):
            _check_int(name, getattr(self, name), minimum=1)
        if self.rollout_batch_size is not None:
            _check_int("rollout_batch_size", self.rollout_batch_size, minimum=1, none_hint=True)

        _check_choice("training_mode", self.training_mode, _TRAINING_MODES)
        if self.training_mode == "semi_on_policy":
            if not isinstance(self.replay_dataset, str) or not self.replay_dataset:
                raise ValueError(
                    f"`replay_dataset` ({self.replay_dataset!r}) is required when `training_mode='semi_on_policy'`; "
                    "set it to the folder or Hub dataset id of a replay buffer made with `trl-arcopo collect`."
                )
        elif self.replay_dataset is not None:
            raise ValueError(
                f"`replay_dataset` ({self.replay_dataset!r}) is only used with `training_mode='semi_on_policy'` (got "
                f"{self.training_mode!r}); set `training_mode='semi_on_policy'` or leave `replay_dataset` unset."
            )
        _check_choice("exploration", self.exploration, _EXPLORATIONS)

        _check_choice("pivot_strategy", self.pivot_strategy, _PIVOT_STRATEGIES)
        if self.pivot_strategy == "fixed":
            if self.pivot_index is None:
                raise ValueError(
                    "`pivot_index` (None) is required when `pivot_strategy='fixed'`; set it to the 0-based index of "
                    "the chunk to train, e.g. `pivot_index=0`."
                )
            _check_int("pivot_index", self.pivot_index, minimum=0)
        elif self.pivot_index is not None:
            raise ValueError(
                f"`pivot_index` ({self.pivot_index!r}) is only used with `pivot_strategy='fixed'` (got "
                f"{self.pivot_strategy!r}); set `pivot_strategy='fixed'` or leave `pivot_index` unset."
            )
        if self.pivot_strategy == "weighted":
            if self.pivot_weights is None:
                raise ValueError(
                    "`pivot_weights` (None) is required when `pivot_strategy='weighted'`; pass one non-negative "
                    "weight per chunk, e.g. `[1, 1, 2, 2, 2, 1, 1]` for 7 chunks."
                )
            weights = self.pivot_weights
            if (
                not isinstance(weights, (list, tuple))
                or len(weights) == 0
                or not all(_is_finite_number(w) and w >= 0 for w in weights)
                or not any(w > 0 for w in weights)
            ):
                raise ValueError(
                    f"`pivot_weights` ({weights!r}) must be a non-empty list of finite, non-negative weights, not all "
                    "zero (one per chunk); fix the weights."
                )
            self.pivot_weights = [float(w) for w in weights]
        elif self.pivot_weights is not None:
            raise ValueError(
                f"`pivot_weights` ({self.pivot_weights!r}) is only used with `pivot_strategy='weighted'` (got "
                f"{self.pivot_strategy!r}); set `pivot_strategy='weighted'` or leave `pivot_weights` unset."
            )

    def _validate_objective(self) -> None:
        _check_int("num_generations", self.num_generations, minimum=2)
        if not _is_int(self.num_anchors) or not 1 <= self.num_anchors <= self.num_generations:
            raise ValueError(
                f"`num_anchors` ({self.num_anchors!r}) must be between 1 and `num_generations` "
                f"({self.num_generations}); lower `num_anchors`."
            )
        if not (_is_finite_number(self.noise_sigma) and 0.0 < self.noise_sigma <= 1.0):
            raise ValueError(f"`noise_sigma` ({self.noise_sigma!r}) must be in (0, 1]; the paper uses 0.5.")
        _check_positive("epsilon", self.epsilon, hint="the paper uses 1e-4")
        if self.epsilon_high is not None and not (_is_finite_number(self.epsilon_high) and self.epsilon_high >= 0):
            raise ValueError(
                f"`epsilon_high` ({self.epsilon_high!r}) must be a finite number >= 0; set it, or leave it unset to use "
                "`epsilon`."
            )
        _check_int("num_iterations", self.num_iterations, minimum=1)
        _check_positive("distance_temperature", self.distance_temperature, hint="use e.g. 0.5")
        _check_choice("temperature_mode", self.temperature_mode, _TEMPERATURE_MODES)
        _check_choice("advantage_normalization", self.advantage_normalization, _ADVANTAGE_NORMALIZATIONS)
        if not (_is_finite_number(self.advantage_epsilon) and self.advantage_epsilon >= 0):
            raise ValueError(
                f"`advantage_epsilon` ({self.advantage_epsilon!r}) must be a finite number >= 0; use e.g. 1e-6 "
                "(relative) or 1e-4 (absolute, the paper)."
            )
        _check_choice("advantage_epsilon_mode", self.advantage_epsilon_mode, _ADVANTAGE_EPSILON_MODES)
        _check_positive("quasi_norm_p", self.quasi_norm_p, hint="Neighbor GRPO uses 0.8")
        if self.advantage_clip is not None:
            _check_positive("advantage_clip", self.advantage_clip, hint="use e.g. 5.0, or None to disable clipping")
            self.advantage_clip = float(self.advantage_clip)
        if not (_is_finite_number(self.beta) and self.beta >= 0):
            raise ValueError(f"`beta` ({self.beta!r}) must be a finite number >= 0; use 0.0 to disable the KL term.")
        if self.train_steps is not None:
            steps = self.train_steps
            if (
                not isinstance(steps, (list, tuple))
                or len(steps) == 0
                or not all(_is_int(s) and s >= 0 for s in steps)
                or len(set(steps)) != len(steps)
            ):
                raise ValueError(
                    f"`train_steps` ({steps!r}) must be a non-empty list of unique, non-negative sampler step indices; "
                    "fix the list, or leave it unset to train every step."
                )
            self.train_steps = list(steps)

    def _validate_rewards_and_logging(self) -> None:
        weights = self.reward_weights
        if isinstance(weights, (list, tuple)) and weights and all(isinstance(w, str) for w in weights):
            weights = self.reward_weights = _parse_weight_strings(weights)
        if isinstance(weights, dict):
            if not weights or not all(isinstance(k, str) and k and _is_finite_number(w) for k, w in weights.items()):
                raise ValueError(
                    f"`reward_weights` ({weights!r}) must map reward columns or names to finite numbers, e.g. "
                    '{"videoalign:VQ": 1.0, "videoalign:MQ": 1.0, "videoalign:TA": 1.0}.'
                )
            self.reward_weights = {k: float(w) for k, w in weights.items()}
        elif weights is not None:
            if (
                not isinstance(weights, (list, tuple))
                or len(weights) == 0
                or not all(_is_finite_number(w) for w in weights)
            ):
                raise ValueError(
                    f"`reward_weights` ({weights!r}) must be a non-empty list of finite numbers (one per reward or per "
                    "reward column) or a dict keyed by reward column; fix the weights, or leave it unset for weights "
                    "of 1.0."
                )
            self.reward_weights = [float(w) for w in weights]
        _check_choice("multi_objective_aggregation", self.multi_objective_aggregation, _MULTI_OBJECTIVE_AGGREGATIONS)
        _check_choice("reward_error", self.reward_error, _REWARD_ERRORS)
        _check_int("max_consecutive_skipped_groups", self.max_consecutive_skipped_groups, minimum=1)
        if not (_is_finite_number(self.max_skipped_group_fraction) and 0 < self.max_skipped_group_fraction <= 1):
            raise ValueError(
                f"`max_skipped_group_fraction` ({self.max_skipped_group_fraction!r}) must be in (0, 1]; use e.g. "
                "0.25, or 1 to stop only on `max_consecutive_skipped_groups`."
            )
        _check_int("max_consecutive_nonfinite_losses", self.max_consecutive_nonfinite_losses, minimum=1)
        _check_int("log_videos_steps", self.log_videos_steps, minimum=0)
        _check_int("num_videos_to_log", self.num_videos_to_log, minimum=1)
        _check_int("video_fps", self.video_fps, minimum=1)


def _parse_weight_strings(values: list[str]) -> dict | list:
    """``--reward_weights 1.0 0.5`` or ``--reward_weights '{"videoalign:VQ": 1.0}'`` (strings from the command line)."""
    if len(values) == 1 and values[0].lstrip().startswith("{"):
        try:
            return json.loads(values[0])
        except json.JSONDecodeError as error:
            raise ValueError(f"`reward_weights` is not a valid JSON object ({error}): {values[0]!r}.") from None
    try:
        return [float(v) for v in values]
    except ValueError:
        raise ValueError(
            f"`reward_weights` ({values!r}) must be numbers or one JSON object keyed by reward column."
        ) from None


def _cuda_bf16_available() -> bool:
    """Whether a CUDA device with native bfloat16 support is available."""
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # older torch without `including_emulation`
        return torch.cuda.is_bf16_supported()


def _check_int(name: str, value: Any, minimum: int, none_hint: bool = False) -> None:
    if not _is_int(value) or value < minimum:
        hint = f"set it to an integer >= {minimum}" + (", or leave it unset" if none_hint else "")
        raise ValueError(f"`{name}` ({value!r}) must be an integer >= {minimum}; {hint}.")


def _check_positive(name: str, value: Any, hint: str) -> None:
    if not (_is_finite_number(value) and value > 0):
        raise ValueError(f"`{name}` ({value!r}) must be a finite number > 0; {hint}.")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` ({value!r}) must be one of {_format_choices(choices)}; pick one of these.")

"""``ARCoPOTrainer``: AR-CoPO (and the SDE-GRPO baseline) on a causal video pipeline, as a ``transformers.Trainer``.

The trainer orchestrates: rollouts come from :mod:`trl_arcopo.rollout`, rewards from :mod:`trl_arcopo.rewards`, every
piece of math from :mod:`trl_arcopo.copo`. It owns batching (one rollout group per prompt, reused for
``num_iterations`` optimizer steps), metrics, LoRA saving, model cards and exact resumption.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from datasets import Dataset, IterableDataset
from diffusers.training_utils import cast_training_params
from huggingface_hub import ModelCard, ModelCardData
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback
from transformers.integrations import TensorBoardCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, enable_full_determinism, rotate_checkpoints, set_seed
from trl.trainer.utils import RepeatSampler

from . import copo, memory
from .arcopo_config import ARCoPOConfig
from .checkpoints import load_process_state, save_process_state, staged_checkpoint
from .evaluation import evaluate_pipeline, resolve_rewards
from .pipelines.causal_wan import CausalWanPipeline, check_finite_latents, pipeline_source
from .replay import (
    buffer_settings,
    check_buffer_settings,
    generation_settings,
    load_replay_buffer,
    record_rewards,
    record_to_group,
    select_reward_columns,
)
from .rewards import (
    RewardFunctionError,
    RewardOutputError,
    compute_rewards,
    is_column_of,
    reward_column_weights,
    reward_names,
)
from .rewards.registry import rename_weight_keys
from .rollout import RolloutGroup, generate_group, rebuild_context, sample_pivot

logger = logging.getLogger(__name__)

RewardFunc = Callable[..., Any] | torch.nn.Module | str
_LORA_FILE = "pytorch_lora_weights.safetensors"
_CURVES_FILE = "training_curves.png"

_CITATION = """\
@article{arcopo2026,
    title   = {{AR-CoPO: Align Autoregressive Video Generation with Contrastive Policy Optimization}},
    journal = {arXiv preprint arXiv:2603.17461},
    year    = {2026}
}"""


class RewardFailure(RuntimeError):
    """A reward function raised, returned the wrong length or non-finite values (see ``reward_error``)."""


def _identity_collator(features: list[dict]) -> list[dict]:
    return features


def _check_dataset_type(name: str, dataset: Any) -> None:
    if dataset is not None and not isinstance(dataset, Dataset | IterableDataset):
        raise TypeError(
            f"`{name}` must be a `datasets.Dataset` (or `IterableDataset`) with a 'prompt' column, got "
            f"{type(dataset).__name__}; wrap a list of prompts with `datasets.Dataset.from_dict({{'prompt': prompts}})`."
        )


def _check_prompt_column(name: str, dataset: Dataset | IterableDataset | None) -> None:
    columns = getattr(dataset, "column_names", None)  # None for an IterableDataset of unknown features
    if columns is not None and "prompt" not in columns:
        raise ValueError(
            f"`{name}` needs a 'prompt' column (one rollout group per prompt); it has {columns}. Rename the column "
            "with `dataset.rename_column(old, 'prompt')`."
        )


def _check_one_optimizer_step(dataset: Dataset | IterableDataset | None, args: ARCoPOConfig, what: str) -> None:
    """A training dataset must give every process at least one full optimizer step (the sampler drops incomplete
    generation batches: a smaller dataset would train nothing and exit as if it had)."""
    if not isinstance(dataset, Dataset):  # an IterableDataset has no length to check
        return
    needed = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
    if len(dataset) < needed:
        raise ValueError(
            f"{what.format(rows=len(dataset))}, fewer than one optimizer step needs: per_device_train_batch_size "
            f"({args.per_device_train_batch_size}) x processes ({args.world_size}) x gradient_accumulation_steps "
            f"({args.gradient_accumulation_steps}) = {needed}, one rollout group each. Add prompts (repeating them is "
            "fine), or lower per_device_train_batch_size / gradient_accumulation_steps."
        )


def _from_pretrained_kwargs(model_init_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """``model_init_kwargs`` with a dtype given by name (``"bfloat16"``, checked by the config) as a torch dtype."""
    kwargs = dict(model_init_kwargs or {})
    for key in ("dtype", "torch_dtype"):
        if isinstance(kwargs.get(key), str) and kwargs[key] != "auto":
            kwargs[key] = getattr(torch, kwargs[key])
    return kwargs


class ARCoPOTrainer(Trainer):
    """Trainer for AR-CoPO: chunk-level noise forking + contrastive policy optimization of a LoRA adapter.

    Args:
        model: a :class:`~trl_arcopo.CausalWanPipeline`, or a Hub id / local path of one (loaded with
            ``args.model_init_kwargs``). Only the LoRA adapter named ``args.adapter_name`` trains.
        reward_funcs: one or several rewards ``f(prompts, videos, **kwargs) -> list[float | None]`` (or a dict of
            heads ``{head: scores}``, weighted by column with ``args.reward_weights``) with ``videos``
            ``[B, F, 3, H, W]`` in [0, 1], or names resolved with :func:`~trl_arcopo.rewards.load_reward` (built-ins
            such as ``"brightness"``, ``"videoalign"``, ``"pickscore"``, Hub ids, ``http(s)://`` reward-server URLs).
            ``nn.Module`` rewards are moved to the training device. Extra dataset columns and ``trainer_state`` reach
            them as keyword arguments.
        args: an :class:`~trl_arcopo.ARCoPOConfig`. With ``training_mode="semi_on_policy"`` the groups come from
            the replay buffer ``args.replay_dataset`` (no generation; its stored rewards are read for the columns of
            ``reward_funcs``, which are called only by :meth:`evaluate`).
        train_dataset / eval_dataset: datasets with a ``prompt`` column (one rollout group per row). Semi-on-policy
            training takes no ``train_dataset``: the buffer is the training dataset.
        peft_config: a ``peft.LoraConfig`` overriding the LoRA settings of ``args``.
        callbacks, optimizers: as in ``transformers.Trainer``.

    Example:
        ```py
        >>> from datasets import Dataset
        >>> from trl_arcopo import ARCoPOConfig, ARCoPOTrainer
        >>> from trl_arcopo.testing import tiny_causal_wan_pipeline

        >>> args = ARCoPOConfig("out", num_frames=21, height=32, width=32, num_generations=4, max_steps=2)
        >>> trainer = ARCoPOTrainer(tiny_causal_wan_pipeline(), "colorfulness", args=args,
        ...                         train_dataset=Dataset.from_dict({"prompt": ["a red car"]}))
        >>> trainer.train()
        ```
    """

    _tag_names = ["trl", "arcopo", "lora", "text-to-video", "diffusers"]
    _name = "AR-CoPO"
    _paper = {
        "title": "AR-CoPO: Align Autoregressive Video Generation with Contrastive Policy Optimization",
        "id": "2603.17461",
        "citation": _CITATION,
    }
    # compute_loss returns a per-microbatch mean; the Trainer divides by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: CausalWanPipeline | str,
        reward_funcs: RewardFunc | Sequence[RewardFunc],
        args: ARCoPOConfig | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | None = None,
        peft_config: LoraConfig | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, Any] = (None, None),
    ) -> None:
        if args is None:
            args = ARCoPOConfig(output_dir="arcopo-output")
        if not isinstance(args, ARCoPOConfig):
            raise TypeError(f"`args` must be an ARCoPOConfig, got {type(args).__name__}.")
        pipeline = self._load_pipeline(model, args)
        self.pipeline = pipeline
        self._check_video_size(args, pipeline)
        self.reward_funcs = resolve_rewards(reward_funcs)
        if not self.reward_funcs:
            raise ValueError("`reward_funcs` is empty: pass at least one reward function.")
        self.reward_func_names = reward_names(self.reward_funcs)
        _check_dataset_type("train_dataset", train_dataset)
        _check_dataset_type("eval_dataset", eval_dataset)
        if isinstance(args.reward_weights, dict):  # keys may name a reward as passed: "brightness", not its column
            specs = reward_funcs if isinstance(reward_funcs, list | tuple) else [reward_funcs]
            args.reward_weights = rename_weight_keys(args.reward_weights, specs, self.reward_func_names)
        if args.training_mode == "semi_on_policy":
            train_dataset = self._load_replay_buffer(args, pipeline, train_dataset)
        else:
            _check_prompt_column("train_dataset", train_dataset)
            _check_one_optimizer_step(train_dataset, args, "`train_dataset` has {rows} prompt(s)")
        _check_prompt_column("eval_dataset", eval_dataset)
        self._check_against_pipeline(args, pipeline)

        transformer = pipeline.transformer
        transformer.requires_grad_(False)
        for component in (pipeline.text_encoder, pipeline.vae):
            if component is not None:
                component.requires_grad_(False).eval()
        if peft_config is None:
            peft_config = LoraConfig(
                r=args.lora_r,
                lora_alpha=args.lora_alpha,
                lora_dropout=args.lora_dropout,
                target_modules=list(args.lora_target_modules),
            )
        # `Trainer.__init__` seeds only after the adapter exists: seed here so that `args.seed` decides the LoRA's
        # initial weights (with lora_B = 0 the rollouts do not show them, the first gradient does).
        if args.full_determinism:
            enable_full_determinism(args.seed)
        else:
            set_seed(args.seed)
        transformer.add_adapter(peft_config, adapter_name=args.adapter_name)
        transformer.set_adapter(args.adapter_name)
        cast_training_params(transformer, dtype=torch.float32)  # the LoRA trains in float32 whatever the base dtype
        if args.transformer_gradient_checkpointing:
            transformer.enable_gradient_checkpointing()

        self._metrics: dict[str, defaultdict[str, list[float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }
        self._buffered_inputs: list[list[dict]] | None = None
        # Reward columns (`name` or `name:head`) and their weights, known from the first scored group.
        self.reward_columns: list[str] | None = None
        self.reward_column_weights: torch.Tensor | None = None
        self._reward_thread: ThreadPoolExecutor | None = None  # created on first use (`overlap_rewards`)
        self._step = 0  # training_step calls (microbatches) so far
        self._nonfinite_losses = 0  # in a row
        self._skipped_in_a_row = 0  # skipped groups, over all processes (`reward_error="skip_group"`)
        self._skipped_groups = 0
        self._scored_groups = 0
        self._update_has_signal = False  # this process had a group to learn from in the current optimizer step
        self._last_reward_error: str | None = None  # named when the skipped groups pass their ceiling
        super().__init__(
            model=transformer,
            args=args,
            data_collator=_identity_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        pipeline.to(self.accelerator.device)
        pipeline.set_progress_bar_config(disable=True)
        for func in self.reward_funcs:
            if isinstance(func, torch.nn.Module):
                func.to(self.accelerator.device)
        # The rollout's randomness (noise, pivots, anchors); its state is part of every checkpoint.
        self.rollout_generator = torch.Generator().manual_seed(args.seed + self.accelerator.process_index)

    # ---------------------------------------------------------------------------------------------- setup

    @staticmethod
    def _load_pipeline(model: CausalWanPipeline | str, args: ARCoPOConfig) -> CausalWanPipeline:
        if isinstance(model, CausalWanPipeline):
            return model
        if isinstance(model, str | os.PathLike):
            return CausalWanPipeline.from_pretrained(model, **_from_pretrained_kwargs(args.model_init_kwargs))
        raise TypeError(f"`model` must be a CausalWanPipeline or a Hub id / path of one, got {type(model).__name__}.")

    def _load_replay_buffer(self, args: ARCoPOConfig, pipeline: CausalWanPipeline, train_dataset) -> Dataset:
        """The buffer of ``args.replay_dataset``, checked against this run: settings and reward columns."""
        if train_dataset is not None:
            raise ValueError(
                "`training_mode='semi_on_policy'` trains on the groups of `replay_dataset`: do not pass a "
                "`train_dataset`."
            )
        with args.main_process_first(desc="loading the replay buffer"):
            buffer = load_replay_buffer(args.replay_dataset)
        expected = generation_settings(
            pipeline,
            num_generations=args.num_generations,
            noise_sigma=args.noise_sigma,
            num_frames=args.num_frames,
            height=args.height,
            width=args.width,
            exploration=args.exploration,
        )
        for settings in buffer_settings(buffer):
            check_buffer_settings(settings, expected)
        select_reward_columns(list(buffer.features["rewards"]), self.reward_func_names)  # every reward is stored
        _check_one_optimizer_step(buffer, args, f"The replay buffer {args.replay_dataset!r} has {{rows}} group(s)")
        return buffer

    def _check_video_size(self, args: ARCoPOConfig, pipeline: CausalWanPipeline) -> None:
        """The video size and the pivot chunks of ``args`` against the pipeline's VAE and chunks, before anything
        heavy runs (rewards, replay buffer, rollouts)."""
        pipeline.check_video_size(args.num_frames, args.height, args.width)
        self.latent_shape = pipeline.latent_shape(args.num_frames, args.height, args.width)
        self.num_chunks = self.latent_shape[1] // pipeline.config.num_frame_per_block
        video = f"a video of `num_frames`={args.num_frames} has {self.num_chunks} chunks on this pipeline"
        if args.pivot_strategy == "fixed" and args.pivot_index >= self.num_chunks:
            raise ValueError(
                f"`pivot_index` ({args.pivot_index}) is out of range: {video}; use 0 .. {self.num_chunks - 1}."
            )
        if args.pivot_strategy == "weighted" and len(args.pivot_weights) != self.num_chunks:
            raise ValueError(
                f"`pivot_weights` has {len(args.pivot_weights)} weights, but {video}; pass one weight per chunk."
            )

    def _check_against_pipeline(self, args: ARCoPOConfig, pipeline: CausalWanPipeline) -> None:
        num_steps = len(pipeline.timesteps)
        if args.train_steps is not None and max(args.train_steps) >= num_steps:
            raise ValueError(
                f"`train_steps` {args.train_steps} names steps the sampler does not have (it runs {num_steps}: "
                f"0 .. {num_steps - 1})."
            )
        if isinstance(args.reward_weights, dict):
            names = self.reward_func_names
            unknown = [k for k in args.reward_weights if not any(is_column_of(k, n) for n in names)]
            if unknown:
                raise ValueError(
                    f"`reward_weights` keys {unknown} name no reward of {names}: use reward names or columns "
                    "'name:head' (e.g. 'videoalign:VQ')."
                )
        elif args.reward_weights is not None and len(args.reward_weights) < len(self.reward_funcs):
            raise ValueError(
                f"`reward_weights` has {len(args.reward_weights)} entries for {len(self.reward_funcs)} reward "
                f"functions ({self.reward_func_names}): give one per reward, or one per reward column."
            )
        if args.exploration == "sde" and args.train_steps is not None and min(args.train_steps) >= num_steps - 1:
            raise ValueError(
                "`exploration='sde'` trains the stochastic transitions: `train_steps` must include a step < T-1."
            )
        self.train_steps = list(args.train_steps) if args.train_steps is not None else list(range(num_steps))

    # ---------------------------------------------------------------------------------------------- data

    def _get_train_sampler(self, dataset=None) -> RepeatSampler:
        # Each generation batch (per_device_train_batch_size · processes · accumulation unique prompts, the same
        # order on every process) is repeated once per optimizer step that reuses it.
        dataset = dataset if dataset is not None else self.train_dataset
        accumulation = self.args.gradient_accumulation_steps
        return RepeatSampler(
            data_source=dataset,
            mini_repeat_count=1,
            batch_size=self.args.per_device_train_batch_size * self.accelerator.num_processes * accumulation,
            repeat_count=self.args.num_iterations * accumulation,
            shuffle=True,
            seed=self.args.seed,
        )

    def get_train_dataloader(self):
        if self.train_dataset is None:
            raise ValueError("ARCoPOTrainer needs a `train_dataset` with a 'prompt' column to train.")
        return self._get_dataloader(
            dataset=self.train_dataset,
            description="Training",
            batch_size=self._train_batch_size * self.args.gradient_accumulation_steps,
            sampler_fn=self._get_train_sampler,
            is_training=True,
        )

    def _prepare_inputs(self, generation_batch: list[dict]) -> list[dict]:
        """The groups of this microbatch: rolled out and scored once per ``num_iterations`` optimizer steps."""
        accumulation = self.args.gradient_accumulation_steps
        if self._buffered_inputs is None or self._step % (accumulation * self.args.num_iterations) == 0:
            groups = self._generate_and_score(generation_batch, mode="train")
            size = len(groups) // accumulation
            self._buffered_inputs = [groups[i * size : (i + 1) * size] for i in range(accumulation)]
        return self._buffered_inputs[self._step % accumulation]

    # ---------------------------------------------------------------------------------------------- rollouts

    def _score(
        self, prompts: list[str], videos: torch.Tensor, row: dict, num: int, mode: str = "train"
    ) -> torch.Tensor | None:
        """Rewards ``[num, K]`` (float64) for ``num`` videos of one prompt, or None when a reward failed under
        ``reward_error="skip_group"``."""
        kwargs = {k: [v] * num for k, v in row.items() if k != "prompt"}
        try:
            columns = compute_rewards(
                self.reward_funcs, prompts, videos, reward_kwargs={**kwargs, "trainer_state": self.state}
            )
            self._set_reward_columns(list(columns))
            rewards = torch.stack(list(columns.values()), dim=1)
            if not torch.isfinite(rewards).all():
                bad = [name for name, values in columns.items() if not torch.isfinite(values).all()]
                raise RewardFailure(f"reward(s) {bad} returned missing or non-finite values for {prompts[0]!r}.")
        except (RewardFunctionError, RewardOutputError, RewardFailure) as error:
            self._metrics[mode]["rewards/failed_groups"].append(1.0)
            if self.args.reward_error == "raise":
                raise RewardFailure(
                    f"{error} Set `reward_error='skip_group'` to skip such groups instead of stopping."
                ) from error
            logger.warning("Skipping a rollout group: %s", error)
            self._last_reward_error = str(error)
            return None
        self._metrics[mode]["rewards/failed_groups"].append(0.0)
        return rewards

    def _rollout_group(self, row: dict) -> RolloutGroup:
        """A group rolled out (and decoded) by the current policy; non-finite latents stop training (a policy that
        generates NaN has diverged: no reward can score it)."""
        args = self.args
        pivot = sample_pivot(
            self.num_chunks,
            args.pivot_strategy,
            index=args.pivot_index,
            weights=args.pivot_weights,
            generator=self.rollout_generator,
        )
        group = generate_group(
            self.pipeline,
            self.pipeline.encode_prompt(row["prompt"]),
            num_generations=args.num_generations,
            latent_shape=self.latent_shape,
            pivot=pivot,
            noise_sigma=args.noise_sigma,
            exploration=args.exploration,
            rollout_batch_size=args.rollout_batch_size,
            generator=self.rollout_generator,
        )
        check_finite_latents(group.latents, f"the rollout group of {row['prompt']!r} (step {self.state.global_step})")
        group.weights_version = self.state.global_step  # optimizer steps taken: the policy's version
        return group

    def _score_group(self, row: dict, group: RolloutGroup, mode: str) -> Future:
        """The rewards ``[G, K]`` of a rolled-out group (None: a reward failed and the group is skipped), as a future:
        computed in the background thread with ``overlap_rewards`` (while the next group is rolled out), else now."""
        num = self.args.num_generations

        def score() -> torch.Tensor | None:
            with torch.no_grad():  # grad mode is per thread
                return self._score([row["prompt"]] * num, group.videos, row, num, mode)

        if self.args.overlap_rewards:
            if self._reward_thread is None:
                self._reward_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="arcopo-rewards")
            return self._reward_thread.submit(score)
        future = Future()
        try:
            future.set_result(score())
        except Exception as error:  # re-raised by `future.result()`, as from the thread
            future.set_exception(error)
        return future

    def _replay_group(self, record: dict) -> tuple[RolloutGroup, torch.Tensor]:
        """A group of the replay buffer (the reference policy's predictions are the old policy) and its stored
        rewards ``[G, K]``."""
        embeds = self.pipeline.encode_prompt(str(record["prompt"]))
        group = record_to_group(record, embeds, device=self.accelerator.device)
        columns = record_rewards(record, self.reward_func_names)
        self._set_reward_columns(list(columns))
        return group, torch.stack(list(columns.values()), dim=1)

    def _set_reward_columns(self, columns: list[str]) -> None:
        """Fix the reward columns and their weights at the first scored group; later groups must match."""
        if self.reward_columns is not None:
            if columns != self.reward_columns:
                raise RewardOutputError(
                    f"the rewards returned the columns {columns}, but earlier groups had {self.reward_columns}: a "
                    "reward must return the same heads for every batch."
                )
            return
        weights = reward_column_weights(columns, self.reward_func_names, self.args.reward_weights)
        self.reward_columns, self.reward_column_weights = columns, torch.tensor(weights, dtype=torch.float64)
        ignored = [c for c, w in zip(columns, weights, strict=True) if w == 0]
        if ignored:
            logger.info("Reward columns %s have weight 0 (logged, not optimized).", ignored)

    @torch.no_grad()
    def _generate_and_score(self, rows: list[dict], mode: str) -> list[dict]:
        """One group per row with its advantages: generated and scored by the current policy, or, in semi-on-policy
        mode, read from the replay buffer (each row is a buffer record)."""
        start = time.perf_counter()
        self.model.eval()
        if self.args.training_mode == "semi_on_policy":
            scored = [self._finish_group(row, *self._replay_group(row)) for row in rows]
        else:
            # Group i is scored while group i + 1 is rolled out; at most two groups' videos are alive at once.
            scored, pending = [], None
            for row in rows:
                with self._gathered_weights():
                    group = self._rollout_group(row)
                future = self._score_group(row, group, mode)
                if pending is not None:
                    scored.append(self._finish_group(pending[0], pending[1], pending[2].result()))
                pending = (row, group, future)
            scored.append(self._finish_group(pending[0], pending[1], pending[2].result()))
        self.model.train()
        groups = [item for item, _ in scored]
        rewards = torch.stack([rewards for _, rewards in scored])
        pivots = [float(item["group"].pivot) for item in groups]
        gathered = self._log_rollout_metrics(rewards, pivots, time.perf_counter() - start, groups, mode)
        if mode == "train" and self.args.reward_error == "skip_group":
            self._count_skipped_groups(gathered.isnan().all(-1).all(-1).tolist())
        return groups

    def _count_skipped_groups(self, skipped: list[bool]) -> None:
        """Count the skipped groups of a generation batch (gathered: every process decides alike) and stop past the
        ceilings of ``reward_error="skip_group"``."""
        for is_skipped in skipped:
            self._skipped_in_a_row = self._skipped_in_a_row + 1 if is_skipped else 0
        self._skipped_groups += sum(skipped)
        self._scored_groups += len(skipped)
        args, reason = self.args, None
        if self._skipped_in_a_row >= args.max_consecutive_skipped_groups:
            reason = (
                f"{self._skipped_in_a_row} rollout groups in a row were skipped (`max_consecutive_skipped_groups`="
                f"{args.max_consecutive_skipped_groups})"
            )
        elif (
            self._scored_groups >= args.max_consecutive_skipped_groups
            and self._skipped_groups > args.max_skipped_group_fraction * self._scored_groups
        ):
            reason = (
                f"{self._skipped_groups} of {self._scored_groups} rollout groups were skipped, more than "
                f"`max_skipped_group_fraction`={args.max_skipped_group_fraction:g}"
            )
        if reason is not None:
            last = self._last_reward_error
            raise RewardFailure(
                f"{reason}: the reward keeps failing{f' (last error: {last})' if last else ''}. Fix the reward, "
                "then resume from the checkpoint saved now; or raise the ceiling."
            )

    def _finish_group(self, row: dict, group: RolloutGroup, rewards: torch.Tensor | None) -> tuple[dict, torch.Tensor]:
        """The training item of a scored group (advantages from the weighted rewards) and its rewards ``[G, K]``
        (NaN for a skipped group); sample videos are logged, then dropped."""
        args = self.args
        if rewards is None:  # skipped: no learning signal from this group
            rewards = torch.full((args.num_generations, self._num_reward_columns), math.nan, dtype=torch.float64)
            aggregated = torch.full((1, args.num_generations), math.nan, dtype=torch.float64)
            advantages = torch.zeros(args.num_generations, dtype=torch.float64)
        else:
            eps = {"eps": args.advantage_epsilon, "eps_mode": args.advantage_epsilon_mode}
            aggregated = copo.aggregate_rewards(
                rewards[None], self.reward_column_weights, mode=args.multi_objective_aggregation, **eps
            )
            advantages = copo.group_advantages(
                aggregated,
                normalization=args.advantage_normalization,
                quasi_norm_p=args.quasi_norm_p,
                clip=args.advantage_clip,
                **eps,
            )[0]
        if group.videos is not None:
            self._maybe_log_videos(row["prompt"], group)
            group.videos = None  # scored; keep only what the loss needs
        return {"group": group, "advantages": advantages.float(), "rewards": aggregated[0]}, rewards

    @property
    def _num_reward_columns(self) -> int:
        # Before any group was scored (the first one failed), one column per reward.
        return len(self.reward_columns) if self.reward_columns is not None else len(self.reward_funcs)

    def _log_rollout_metrics(self, rewards: torch.Tensor, pivots, seconds: float, groups, mode: str) -> torch.Tensor:
        """``rewards`` ``[N, G, K]``; gathered over processes (groups stay whole on one process) and returned."""
        metrics = self._metrics[mode]
        device = self.accelerator.device
        rewards = self.accelerator.gather(rewards.to(device)).cpu()
        if self.reward_columns is not None:  # else every group so far failed: nothing to report
            total = (rewards * self.reward_column_weights).sum(-1)  # NaN for skipped groups
            metrics["reward"].append(total.nanmean().item())
            metrics["reward_std"].append(torch.nan_to_num(total.std(dim=1)).mean().item())
            metrics["frac_reward_zero_std"].append((total.std(dim=1) < 1e-8).float().mean().item())
            for k, column in enumerate(self.reward_columns):
                metrics[f"rewards/{column}/mean"].append(rewards[..., k].nanmean().item())
                metrics[f"rewards/{column}/std"].append(torch.nan_to_num(rewards[..., k].std(dim=1)).mean().item())
        metrics["rollout/pivot"].extend(self.accelerator.gather(torch.tensor(pivots, device=device)).tolist())
        metrics["rollout/seconds"].append(seconds)
        # The candidates' spread at every sampler step of the pivot chunk, averaged over the groups: how much of the
        # fork each step keeps (the last step's is `rollout/candidate_distance`).
        spreads = torch.stack(
            [torch.stack([copo.mean_pairwise_distance(x0) for x0 in g["group"].predictions]) for g in groups]
        ).mean(0)
        metrics["rollout/candidate_distance"].append(spreads[-1].item())
        for s, spread in enumerate(spreads.tolist()):
            metrics[f"rollout/candidate_distance/step_{s}"].append(spread)
        return rewards

    # ---------------------------------------------------------------------------------------------- loss

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        start = time.perf_counter()
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        except RewardFailure:
            logger.error("A reward failed (see `reward_error`): saving a checkpoint before stopping.")
            self._save_checkpoint(model, trial=None)
            raise
        self._step += 1
        if self.accelerator.sync_gradients:  # the optimizer steps after this microbatch
            self._drop_gradients_without_signal(model)
        self._metrics["train"]["step_time"].append(time.perf_counter() - start)
        return loss

    def _drop_gradients_without_signal(self, model) -> None:
        """When no process had a group to learn from in this optimizer step (every group skipped, or non-finite
        losses), clear the gradients: torch optimizers skip parameters without a gradient, so Adam's moments, its
        step count and weight decay leave the LoRA bitwise unchanged (a zero gradient would still move it)."""
        signal = torch.tensor(float(self._update_has_signal), device=self.accelerator.device)
        self._update_has_signal = False
        has_signal = self.accelerator.reduce(signal, reduction="sum").item() > 0
        self._metrics["train"]["update_skipped"].append(0.0 if has_signal else 1.0)
        if not has_signal:
            for parameter in model.parameters():
                parameter.grad = None

    def compute_loss(self, model, inputs: list[dict], return_outputs: bool = False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("ARCoPOTrainer does not return outputs from compute_loss.")
        # A skipped group (`reward_error="skip_group"`) has NaN rewards: nothing to learn from it.
        losses = [self._group_loss(model, item) for item in inputs if not item["rewards"].isnan().all()]
        loss = torch.stack(losses).mean() if losses else None
        if loss is not None and torch.isfinite(loss):
            self._nonfinite_losses = 0
            self._update_has_signal = True
            self._metrics["train"]["nonfinite_loss"].append(0.0)
            return loss
        if loss is None:
            return self._zero_loss(model)
        self._nonfinite_losses += 1
        self._metrics["train"]["nonfinite_loss"].append(1.0)
        logger.warning("Non-finite loss (%d in a row): skipping this update.", self._nonfinite_losses)
        if self._nonfinite_losses >= self.args.max_consecutive_nonfinite_losses:
            logger.error("%d non-finite losses in a row: saving a checkpoint and stopping.", self._nonfinite_losses)
            # The Trainer saves checkpoint-{step} after this (skipped) update and stops.
            self.control.should_save = True
            self.control.should_training_stop = True
        return self._zero_loss(model)

    @staticmethod
    def _zero_loss(model) -> torch.Tensor:
        # Connected to every trainable weight: distributed gradient hooks stay in step.
        return sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0

    def _group_loss(self, model, item: dict) -> torch.Tensor:
        group: RolloutGroup = item["group"]
        pipeline, args = self.pipeline, self.args
        context = self._pivot_context(group)
        if args.exploration == "sde":
            return self._sde_loss(model, group, item["advantages"], context)
        num_anchors, steps = args.num_anchors, self.train_steps
        anchors = torch.randperm(group.num_generations, generator=self.rollout_generator)[:num_anchors]
        anchors = anchors.to(group.inputs.device)
        x_t = group.inputs[steps][:, anchors].flatten(0, 1)  # [S·B, C, f, H, W]
        rows = pipeline.fork(context, x_t.shape[0])
        step_of_row = [s for s in steps for _ in range(num_anchors)]
        with pipeline.transformer_forward(model):
            predicted = pipeline.predict_x0(rows, x_t, step_of_row).unflatten(0, (len(steps), num_anchors))
        candidates = group.predictions[steps]  # [S, G, C, f, H, W]
        log_probs, old_log_probs, ref_log_probs = [], [], []
        reference = None
        if args.beta:
            reference = self._reference_predictions(group, x_t, step_of_row).unflatten(0, (len(steps), num_anchors))
        for j in range(len(steps)):
            tau = copo.distance_temperature(candidates[j], args.distance_temperature, args.temperature_mode)
            log_probs.append(copo.surrogate_log_probs(predicted[j], candidates[j], tau))
            old_log_probs.append(copo.surrogate_log_probs(candidates[j][anchors], candidates[j], tau))
            if reference is not None:
                ref_log_probs.append(copo.surrogate_log_probs(reference[j], candidates[j], tau))
        old_log_probs = torch.stack(old_log_probs)  # [S, B, G]
        loss, stats = copo.copo_loss(
            torch.stack(log_probs),
            old_log_probs,
            item["advantages"].to(predicted.device),
            epsilon=args.epsilon,
            epsilon_high=args.epsilon_high,
            ref_log_probs=torch.stack(ref_log_probs) if reference is not None else None,
            beta=args.beta,
        )
        self._record_loss_stats(stats)
        self._record_policy_stats(copo.surrogate_policy_stats(old_log_probs, anchors), steps)
        return loss

    def _pivot_context(self, group: RolloutGroup):
        """The pivot chunk's context: the rollout's own while the policy has not stepped since the rollout (the first
        update of a group), else recomputed by the current weights. The rollout's is released after its use."""
        context, group.context = group.context, None
        if context is not None and group.weights_version == self.state.global_step:
            return context
        with self._gathered_weights():
            return rebuild_context(self.pipeline, group.prompt_embeds, group.prefix_latents)

    @contextlib.contextmanager
    def _gathered_weights(self) -> Iterator[None]:
        """Under FSDP2, the transformer's full weights for the block: its no-grad passes, whose number differs between
        processes (pivots, rebuilt contexts, evaluation shards), then run without collectives and cannot deadlock."""
        from torch.distributed.fsdp import FSDPModule

        modules = [m for m in self.model.modules() if isinstance(m, FSDPModule)]
        if not modules:
            yield
            return
        reshard = self.accelerator.state.fsdp_plugin.reshard_after_forward
        for module in modules:  # the same order on every process: one all-gather each
            module.unshard()
            module.set_reshard_after_forward(False, recurse=False)
        try:
            yield
        finally:
            for module in modules:
                module.set_reshard_after_forward(reshard, recurse=False)
                module.reshard()

    @torch.no_grad()
    def _reference_predictions(self, group: RolloutGroup, x_t: torch.Tensor, step_of_row: list[int]) -> torch.Tensor:
        """The reference policy's x̂0 ``[rows, C, f, H, W]`` for the step inputs ``x_t``: the adapters are disabled
        for the prefix context too, which the reference policy would have computed itself."""
        pipeline = self.pipeline
        with pipeline.adapters_disabled():
            context = rebuild_context(pipeline, group.prompt_embeds, group.prefix_latents)
            return pipeline.predict_x0(pipeline.fork(context, x_t.shape[0]), x_t, step_of_row)

    def _sde_loss(self, model, group: RolloutGroup, advantages: torch.Tensor, context) -> torch.Tensor:
        """SDE-GRPO: Gaussian log-likelihood of each branch's recorded re-noise transitions of the pivot chunk."""
        pipeline = self.pipeline
        steps = [s for s in self.train_steps if s < len(pipeline.timesteps) - 1]
        num = group.num_generations
        x_t = group.inputs[steps].flatten(0, 1)
        rows = pipeline.fork(context, x_t.shape[0])
        with pipeline.transformer_forward(model):
            predicted = pipeline.predict_x0(rows, x_t, [s for s in steps for _ in range(num)]).unflatten(
                0, (len(steps), num)
            )
        log_probs, old_log_probs = [], []
        for j, s in enumerate(steps):
            sigma = pipeline.sigmas[s + 1]
            log_probs.append(copo.gaussian_renoise_log_prob(group.inputs[s + 1], predicted[j], sigma))
            old_log_probs.append(copo.gaussian_renoise_log_prob(group.inputs[s + 1], group.predictions[s], sigma))
        loss, stats = copo.grpo_loss(
            torch.stack(log_probs, dim=1),
            torch.stack(old_log_probs, dim=1),
            advantages.to(predicted.device),
            epsilon=self.args.epsilon,
            epsilon_high=self.args.epsilon_high,
        )
        self._record_loss_stats(stats)
        return loss

    def _record_loss_stats(self, stats: dict[str, torch.Tensor]) -> None:
        metrics = self._metrics["train"]
        names = {
            "ratio_mean": "ratio/mean",
            "ratio_min": "ratio/min",
            "ratio_max": "ratio/max",
            "clip_low": "clip_ratio/low_mean",
            "clip_high": "clip_ratio/high_mean",
            "clip_region": "clip_ratio/region_mean",
            "kl": "kl",
        }
        for key, value in stats.items():
            metrics[names[key]].append(value.item())

    def _record_policy_stats(self, policy: dict[str, torch.Tensor], steps: list[int]) -> None:
        """``policy/entropy`` and ``policy/self_prob`` of π_old, over the trained steps and per sampler step."""
        metrics = self._metrics["train"]
        for name, per_step in policy.items():
            metrics[f"policy/{name}"].append(per_step.mean().item())
            for s, value in zip(steps, per_step.tolist(), strict=True):
                metrics[f"policy/{name}/step_{s}"].append(value)

    # ---------------------------------------------------------------------------------------------- eval

    @torch.no_grad()
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Generate one video per evaluation prompt (prompt ``i`` seeded ``seed + i``) with the current policy and
        score it with :func:`~trl_arcopo.evaluation.evaluate_pipeline`; the prompts are split over the processes."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("Evaluation needs an `eval_dataset` with a 'prompt' column.")
        start = time.perf_counter()
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        # Contiguous shards: shard r starts at the sum of the sizes of the shards before it.
        offset = sum(len(dataset) // world + (r < len(dataset) % world) for r in range(rank))
        shard = dataset.shard(num_shards=world, index=rank, contiguous=True)
        self.model.eval()
        with self._gathered_weights():
            result = evaluate_pipeline(
                self.pipeline,
                shard,
                self.reward_funcs,
                num_frames=self.args.num_frames,
                height=self.args.height,
                width=self.args.width,
                seed=self.args.seed + offset,
                progress_bar=False,
                reward_error="raise" if self.args.reward_error == "raise" else "nan",
            )
        self.model.train()
        self._set_reward_columns(result.reward_columns)
        # Shards differ in size when the processes do not divide the prompts: gather Python rows, not tensors.
        rows = [list(row) for row in zip(*(result.table[column] for column in self.reward_columns), strict=True)]
        scores = torch.tensor(gather_object(rows), dtype=torch.float64)  # [P, K]
        total = (scores * self.reward_column_weights).sum(-1)
        metrics = {
            f"{metric_key_prefix}_reward": total.nanmean().item(),
            f"{metric_key_prefix}_rewards/failed": total.isnan().double().mean().item(),
        }
        for k, column in enumerate(self.reward_columns):
            metrics[f"{metric_key_prefix}_rewards/{column}/mean"] = scores[:, k].nanmean().item()
        metrics[f"{metric_key_prefix}_runtime"] = time.perf_counter() - start
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # ---------------------------------------------------------------------------------------------- logging

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the averaged AR-CoPO metrics collected since the last log (NaN-free means; ``eval_`` prefixed for
        evaluation logs) and hand over to ``Trainer.log`` (trackers, history)."""
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        averaged = {}
        for key, values in self._metrics[mode].items():
            finite = [v for v in values if not math.isnan(v)]
            averaged[f"eval_{key}" if mode == "eval" else key] = sum(finite) / len(finite) if finite else None
        self._metrics[mode].clear()
        super().log({**logs, **averaged}, start_time)

    def _maybe_log_videos(self, prompt: str, group: RolloutGroup) -> None:
        every = self.args.log_videos_steps
        if not every or self.state.global_step % every or not self.accelerator.is_main_process:
            return
        from .utils.videos import log_videos

        tensorboard = next((c for c in self.callback_handler.callbacks if isinstance(c, TensorBoardCallback)), None)
        log_videos(
            group.videos[: self.args.num_videos_to_log],
            prompt,
            step=self.state.global_step,
            output_dir=self.args.output_dir,
            report_to=self.args.report_to,
            fps=self.args.video_fps,
            tensorboard_writer=getattr(tensorboard, "tb_writer", None),
        )

    def _write_training_curves(self, output_dir: str) -> bool:
        """``output_dir/training_curves.png`` (rewards per column, clip and ratio diagnostics) once something was
        logged; returns whether it was written."""
        if not any("reward" in entry for entry in self.state.log_history):
            return False
        from .utils.plots import plot_training_curves

        plot_training_curves(self.state.log_history, Path(output_dir) / _CURVES_FILE)
        return True

    def train(self, *args, **kwargs):
        """``Trainer.train``; at the start the run's peak memory per process is estimated and logged (a warning when
        the device cannot hold it), at the end the training curves are plotted into ``output_dir`` (main process)."""
        self._log_memory_estimate()
        try:
            output = super().train(*args, **kwargs)
        finally:
            if self._reward_thread is not None:
                self._reward_thread.shutdown(wait=True)
                self._reward_thread = None
        if self.args.should_save:
            self._write_training_curves(self.args.output_dir)
        return output

    def _log_memory_estimate(self) -> None:
        estimate = memory.estimate_memory(
            self.args,
            memory.GeneratorSpec.from_pipeline(self.pipeline),
            [memory.RewardSpec.for_reward(func) for func in self.reward_funcs],
            num_processes=self.accelerator.num_processes,
            strategy="fsdp2" if self.accelerator.is_fsdp2 else "ddp",
        )
        logger.info(
            "Estimated peak memory per process: %.1f GiB (%s phase; `trl-arcopo estimate-memory` explains it)\n%s",
            estimate.peak / memory.GiB,
            estimate.peak_phase,
            estimate.table(),
        )
        available = memory.device_memory(self.accelerator.device)
        if available is not None and estimate.peak > available:
            logger.warning(
                "The estimated peak memory, %.1f GiB, exceeds the %.1f GiB of %s: %s.",
                estimate.peak / memory.GiB,
                available / memory.GiB,
                self.accelerator.device,
                estimate.advice(),
            )

    # ---------------------------------------------------------------------------------------------- saving

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write only the adapter: the diffusers LoRA ``pytorch_lora_weights.safetensors`` (its LoRA config in the
        file's metadata; ``pipe.load_lora_weights(dir)``), PEFT's ``adapter_config.json`` and the training arguments
        as JSON (no pickle)."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        transformer = self.accelerator.unwrap_model(self.model)
        name = self.args.adapter_name
        # Under FSDP the Trainer gathers the full state dict on every rank and passes it here (the parameters of the
        # wrapped model are shards).
        lora_state = get_peft_model_state_dict(transformer, state_dict=state_dict, adapter_name=name)
        peft_config = transformer.peft_config[name]
        CausalWanPipeline.save_lora_weights(
            output_dir, transformer_lora_layers=lora_state, transformer_lora_adapter_metadata=peft_config.to_dict()
        )
        peft_config.save_pretrained(output_dir)
        Path(output_dir, "training_args.json").write_text(self.args.to_json_string())

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self.args.should_save and not _internal_call:
            self.create_model_card(output_dir=output_dir)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint and the AR-CoPO state of every process, written into
        ``output_dir/.staging/checkpoint-N`` and renamed into place (:mod:`trl_arcopo.checkpoints`): a run killed
        while saving leaves no partial checkpoint to resume from.

        ``Trainer._save_checkpoint`` writes straight into the final folder, so its steps are called here on the
        staged one: model, optimizer, scheduler, scaler and RNG states, callback states and ``trainer_state.json``,
        then the Hub upload and checkpoint rotation on the published folder.
        """
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}")
        if self.state.best_global_step and (
            self.state.best_global_step == self.state.global_step or os.path.isdir(best)
        ):
            self.state.best_model_checkpoint = best  # the checkpoint being saved is published below
        with staged_checkpoint(run_dir, name, self.accelerator) as staged:
            self.save_model(staged, _internal_call=True)
            if not self.args.save_only_model:
                self._save_optimizer_and_scheduler(staged)
                self._save_scaler(staged)
                self._save_rng_state(staged)
            self._save_trainer_state(staged)
            if self.args.should_save:
                for callback in [*self.callback_handler.callbacks, self.control]:
                    if isinstance(callback, ExportableState):
                        states = self.state.stateful_callbacks
                        callback_name = type(callback).__name__
                        if isinstance(states.get(callback_name), list):
                            states[callback_name].append(callback.state())
                        else:
                            states[callback_name] = callback.state()
                self.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
        if self.args.push_to_hub:
            self._push_from_checkpoint(os.path.join(run_dir, name))
        if self.args.should_save:
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )

    def _save_trainer_state(self, checkpoint: str) -> None:
        """Rollout RNG, step counters and the buffered rollouts of this process (so a resume continues exactly)."""
        save_process_state(
            checkpoint,
            self.accelerator.process_index,
            rollout_generator=self.rollout_generator,
            counters=self._counters(),
            buffered=self._buffered_inputs,
        )

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        lora_file = os.path.join(resume_from_checkpoint, _LORA_FILE)
        if not os.path.isfile(lora_file):
            raise ValueError(f"{resume_from_checkpoint} has no {_LORA_FILE}: not an ARCoPOTrainer checkpoint.")
        transformer = self.accelerator.unwrap_model(model if model is not None else self.model)
        state = {k.removeprefix("transformer."): v for k, v in load_file(lora_file).items()}
        result = set_peft_model_state_dict(transformer, state, adapter_name=self.args.adapter_name)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"Checkpoint LoRA has keys the adapter does not: {unexpected[:10]}")

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: the LoRA of the best checkpoint (the Trainer looks for full model weights)."""
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        state = load_process_state(checkpoint, self.accelerator.process_index, self.accelerator.device)
        if state is None:
            logger.warning("%s has no AR-CoPO state: rollouts restart from a fresh generator.", checkpoint)
            return
        generator_state, counters, self._buffered_inputs = state
        self.rollout_generator.set_state(generator_state)
        self._step, self._nonfinite_losses = counters["step"], counters["nonfinite_losses"]
        # Checkpoints written before the skip ceilings existed have no group counts.
        self._skipped_in_a_row = counters.get("skipped_in_a_row", 0)
        self._skipped_groups = counters.get("skipped_groups", 0)
        self._scored_groups = counters.get("scored_groups", 0)

    def _counters(self) -> dict[str, int]:
        return {
            "step": self._step,
            "nonfinite_losses": self._nonfinite_losses,
            "skipped_in_a_row": self._skipped_in_a_row,
            "skipped_groups": self._skipped_groups,
            "scored_groups": self._scored_groups,
        }

    # ---------------------------------------------------------------------------------------------- model card

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
        output_dir: str | None = None,
        **kwargs,
    ) -> None:
        """Write ``README.md``: a diffusers LoRA card naming the base generator, with a quick start that builds it and
        loads this LoRA (from the Hub repo when pushing, else from ``output_dir``), the number of steps, the rewards at
        the start and end of training, and the AR-CoPO citation."""
        if not self.is_world_process_zero():
            return
        output_dir = output_dir or self.args.output_dir
        source = pipeline_source(self.pipeline)
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        card_data = ModelCardData(
            base_model=source.hub_id,
            datasets=dataset_name,
            library_name="diffusers",
            model_name=model_name or Path(output_dir).name,
            pipeline_tag="text-to-video",
            tags=sorted({*self._tag_names, "generated_from_trainer", *tags}),
        )
        os.makedirs(output_dir, exist_ok=True)
        has_curves = self._write_training_curves(output_dir)
        if self.reward_columns is not None:
            weights = self.reward_column_weights.tolist()
            rewards = ", ".join(f"`{c}` (weight {w:g})" for c, w in zip(self.reward_columns, weights, strict=True))
        else:
            rewards = ", ".join(f"`{name}`" for name in self.reward_func_names)
        logged = [h["reward"] for h in self.state.log_history if h.get("reward") is not None]
        window = max(1, min(5, len(logged) // 2))
        hub_repo = (self.args.hub_model_id or getattr(self, "hub_model_id", None)) if self.args.push_to_hub else None
        card = ModelCard.from_template(
            card_data,
            template_path=str(Path(__file__).parent / "templates" / "arcopo_model_card.md"),
            repo_id=self.args.hub_model_id or Path(output_dir).name,
            base_model_name=source.name,
            load_code=source.code,
            lora_source=hub_repo or output_dir,
            prompt="A corgi surfing a wave at sunset",
            num_steps=self.state.global_step,
            reward_window=window,
            first_reward=f"{sum(logged[:window]) / window:.4g}" if logged else None,
            final_reward=f"{sum(logged[-window:]) / window:.4g}" if logged else None,
            rewards=rewards,
            training_curves=_CURVES_FILE if has_curves else None,
            method=self.args.exploration,
            citation=_CITATION,
            num_generations=self.args.num_generations,
            noise_sigma=self.args.noise_sigma,
            learning_rate=self.args.learning_rate,
            lora_r=self.args.lora_r,
            lora_alpha=self.args.lora_alpha,
            num_frames=self.args.num_frames,
            height=self.args.height,
            width=self.args.width,
            fps=self.args.video_fps,
        )
        card.save(os.path.join(output_dir, "README.md"))

"""ARCoPOConfig: paper defaults, validation, command-line / YAML parsing and serialization."""

import contextlib
import dataclasses
import json
import math
import re
import warnings

import pytest
import torch
from transformers import HfArgumentParser, TrainingArguments
from trl import TrlParser

from trl_arcopo.arcopo_config import ARCoPOConfig

# Newer transformers renamed `gradient_checkpointing` to `activation_checkpointing` (the old name warns); the
# dependency floor has only `gradient_checkpointing`.
RENAMED_CHECKPOINTING = "activation_checkpointing" in {field.name for field in dataclasses.fields(TrainingArguments)}


def make_config(tmp_path, **kwargs) -> ARCoPOConfig:
    return ARCoPOConfig(output_dir=str(tmp_path), report_to="none", **kwargs)


def _cuda_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


# Paper defaults (docs/method.md) and the project's choices for the options the paper leaves open.
PAPER_DEFAULTS = {
    # model and LoRA
    "model_init_kwargs": None,
    "lora_r": 64,
    "lora_alpha": 128,
    "lora_dropout": 0.0,
    "lora_target_modules": ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"],
    "adapter_name": "on_policy",
    "transformer_gradient_checkpointing": False,
    # generation
    "num_frames": 81,
    "height": 480,
    "width": 832,
    "rollout_batch_size": None,
    "pivot_strategy": "uniform",
    "pivot_index": None,
    "pivot_weights": None,
    "exploration": "fork",
    "training_mode": "on_policy",
    "replay_dataset": None,
    # objective
    "num_generations": 12,
    "num_anchors": 4,
    "noise_sigma": 0.5,
    "epsilon": 1e-4,
    "epsilon_high": None,
    "num_iterations": 2,
    "distance_temperature": 0.5,
    "temperature_mode": "relative",
    "advantage_normalization": "zscore",
    "advantage_epsilon": 1e-6,
    "advantage_epsilon_mode": "relative",
    "quasi_norm_p": 0.8,
    "advantage_clip": 5.0,
    "beta": 0.0,
    "train_steps": None,
    # rewards
    "reward_weights": None,
    "multi_objective_aggregation": "sum_then_normalize",
    "reward_error": "raise",
    "overlap_rewards": True,
    "max_consecutive_skipped_groups": 10,
    "max_skipped_group_fraction": 0.25,
    "max_consecutive_nonfinite_losses": 3,
    # logging
    "log_videos_steps": 0,
    "num_videos_to_log": 2,
    "video_fps": 16,
    # overridden TrainingArguments defaults
    "learning_rate": 1e-5,
    "logging_steps": 1,
    "per_device_train_batch_size": 1,
    "remove_unused_columns": False,
    "gradient_checkpointing": False,
    "auto_find_batch_size": False,
}


def test_defaults_are_the_paper_defaults(tmp_path):
    config = make_config(tmp_path)
    for name, expected in PAPER_DEFAULTS.items():
        assert getattr(config, name) == expected, name
    # `report_to` keeps the transformers default ("none" -> []).
    assert (
        ARCoPOConfig.__dataclass_fields__["report_to"].default
        == TrainingArguments.__dataclass_fields__["report_to"].default
    )
    assert isinstance(config, TrainingArguments)


def test_every_field_has_help_and_no_field_is_named_config():
    own = set(ARCoPOConfig.__dataclass_fields__) - set(TrainingArguments.__dataclass_fields__)
    assert set(PAPER_DEFAULTS) - set(TrainingArguments.__dataclass_fields__) == own
    for name in own | {"learning_rate", "logging_steps", "per_device_train_batch_size", "bf16"}:
        assert ARCoPOConfig.__dataclass_fields__[name].metadata.get("help"), name
    assert "config" not in ARCoPOConfig.__dataclass_fields__
    assert "model_init_kwargs" in ARCoPOConfig._VALID_DICT_FIELDS
    assert set(TrainingArguments._VALID_DICT_FIELDS) <= set(ARCoPOConfig._VALID_DICT_FIELDS)


def test_docstring_lists_every_own_parameter():
    own = set(ARCoPOConfig.__dataclass_fields__) - set(TrainingArguments.__dataclass_fields__)
    for name in own:
        assert f"{name} (`" in ARCoPOConfig.__doc__, name
    for section in (
        "the model and LoRA",
        "generation (rollouts)",
        "the AR-CoPO objective",
        "the rewards",
        "logging",
    ):
        assert f"> Parameters that control {section}\n" in ARCoPOConfig.__doc__


@pytest.mark.skipif(_cuda_bf16(), reason="bf16 resolves to True on a CUDA device with bf16 support")
def test_bf16_resolves_to_false_without_cuda_bf16(tmp_path):
    assert make_config(tmp_path).bf16 is False


def test_bf16_resolution(tmp_path):
    assert make_config(tmp_path).bf16 is _cuda_bf16()
    assert make_config(tmp_path, bf16=False).bf16 is False
    assert make_config(tmp_path, use_cpu=True).bf16 is False


def test_bf16_is_false_when_fp16_is_set(tmp_path, monkeypatch):
    # fp16 validation needs a GPU; only the resolution of bf16 is checked here.
    import trl_arcopo.arcopo_config as module

    monkeypatch.setattr(module, "_cuda_bf16_available", lambda: True)
    monkeypatch.setattr(TrainingArguments, "__post_init__", lambda self: None)
    assert make_config(tmp_path, fp16=True).bf16 is False


def test_valid_non_default_config(tmp_path):
    config = make_config(
        tmp_path,
        model_init_kwargs={"dtype": "bfloat16"},
        lora_r=16,
        lora_alpha=16,
        lora_dropout=0.1,
        lora_target_modules=["to_q", "to_v"],
        adapter_name="semi",
        transformer_gradient_checkpointing=True,
        num_frames=21,
        height=256,
        width=256,
        rollout_batch_size=3,
        pivot_strategy="weighted",
        pivot_weights=[0, 1, 2],
        exploration="sde",
        num_generations=6,
        num_anchors=6,
        noise_sigma=1.0,
        epsilon=0.2,
        epsilon_high=0.28,
        num_iterations=1,
        distance_temperature=0.25,
        temperature_mode="absolute",
        advantage_normalization="quasi_norm",
        advantage_epsilon=1e-4,
        advantage_epsilon_mode="absolute",
        quasi_norm_p=2.0,
        advantage_clip=None,
        beta=0.01,
        train_steps=[0, 2],
        reward_weights=[1.0, -0.5],
        multi_objective_aggregation="normalize_then_sum",
        reward_error="skip_group",
        max_consecutive_nonfinite_losses=1,
        log_videos_steps=10,
        num_videos_to_log=4,
        video_fps=8,
        per_device_train_batch_size=2,
    )
    assert config.pivot_weights == [0.0, 1.0, 2.0]
    assert all(isinstance(w, float) for w in config.pivot_weights)
    assert config.advantage_clip is None
    assert config.reward_weights == [1.0, -0.5]
    assert config.exploration == "sde"


def test_fixed_pivot(tmp_path):
    config = make_config(tmp_path, pivot_strategy="fixed", pivot_index=0)
    assert config.pivot_index == 0


@pytest.mark.parametrize(
    "overrides",
    [
        {"num_frames": 12, "height": 32, "width": 32},  # the toy generator's 4 chunks of per-frame latents
        {"num_frames": 10, "height": 24, "width": 40},  # no VAE takes it, but only the pipeline knows its VAE
        {"num_frames": 9, "pivot_strategy": "fixed", "pivot_index": 8},
        {"num_frames": 9, "pivot_strategy": "weighted", "pivot_weights": [1.0] * 9},
    ],
)
def test_video_size_and_pivot_chunks_are_left_to_the_pipeline(tmp_path, overrides):
    """The chunks a size makes depend on the pipeline's VAE: the config does not judge them (the trainer does)."""
    config = make_config(tmp_path, **overrides)
    assert {name: getattr(config, name) for name in overrides} == overrides


# (field overrides, the field name the error must mention)
INVALID = [
    ({"gradient_checkpointing": True}, "gradient_checkpointing"),
    ({"activation_checkpointing": True}, "gradient_checkpointing"),
    ({"auto_find_batch_size": True}, "auto_find_batch_size"),
    ({"per_device_train_batch_size": 0}, "per_device_train_batch_size"),
    ({"model_init_kwargs": "not json"}, "model_init_kwargs"),
    ({"model_init_kwargs": "[1, 2]"}, "model_init_kwargs"),
    ({"model_init_kwargs": 3}, "model_init_kwargs"),
    ({"model_init_kwargs": {"dtype": "float33"}}, "model_init_kwargs['dtype']"),
    ({"model_init_kwargs": '{"torch_dtype": "int"}'}, "model_init_kwargs['torch_dtype']"),
    # TrainingArguments fields that transformers accepts unchecked
    ({"learning_rate": -1e-3}, "learning_rate"),
    ({"learning_rate": math.nan}, "learning_rate"),
    ({"learning_rate": math.inf}, "learning_rate"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**32}, "seed"),
    ({"data_seed": -3}, "data_seed"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"max_grad_norm": math.nan}, "max_grad_norm"),
    ({"max_grad_norm": -1.0}, "max_grad_norm"),
    ({"adam_beta1": 1.5}, "adam_beta1"),
    ({"adam_beta2": -0.1}, "adam_beta2"),
    ({"adam_epsilon": 0.0}, "adam_epsilon"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps"),
    ({"lora_r": 0}, "lora_r"),
    ({"lora_alpha": 0}, "lora_alpha"),
    ({"lora_dropout": 1.0}, "lora_dropout"),
    ({"lora_dropout": -0.1}, "lora_dropout"),
    ({"lora_target_modules": []}, "lora_target_modules"),
    ({"lora_target_modules": ["to_q", ""]}, "lora_target_modules"),
    ({"adapter_name": ""}, "adapter_name"),
    ({"num_frames": 0}, "num_frames"),
    ({"num_frames": 21.0}, "num_frames"),
    ({"height": 0}, "height"),
    ({"width": -16}, "width"),
    ({"rollout_batch_size": 0}, "rollout_batch_size"),
    ({"pivot_strategy": "random"}, "pivot_strategy"),
    ({"pivot_strategy": "fixed"}, "pivot_index"),
    ({"pivot_strategy": "fixed", "pivot_index": -1}, "pivot_index"),
    ({"pivot_index": 2}, "pivot_index"),
    ({"pivot_strategy": "weighted"}, "pivot_weights"),
    ({"pivot_strategy": "weighted", "pivot_weights": [0.0, 0.0]}, "pivot_weights"),
    ({"pivot_strategy": "weighted", "pivot_weights": [1.0, -1.0]}, "pivot_weights"),
    ({"pivot_strategy": "weighted", "pivot_weights": [1.0, math.nan]}, "pivot_weights"),
    ({"pivot_strategy": "weighted", "pivot_weights": []}, "pivot_weights"),
    ({"pivot_weights": [1.0, 2.0]}, "pivot_weights"),
    ({"exploration": "noise"}, "exploration"),
    ({"training_mode": "semi_on_policy"}, "replay_dataset"),
    ({"training_mode": "semi_on_policy", "replay_dataset": ""}, "replay_dataset"),
    ({"replay_dataset": "replay-buffer"}, "replay_dataset"),
    ({"training_mode": "offline"}, "training_mode"),
    ({"num_generations": 1}, "num_generations"),
    ({"num_anchors": 0}, "num_anchors"),
    ({"num_anchors": 13}, "num_anchors"),
    ({"noise_sigma": 0.0}, "noise_sigma"),
    ({"noise_sigma": 1.5}, "noise_sigma"),
    ({"noise_sigma": math.nan}, "noise_sigma"),
    ({"epsilon": 0.0}, "epsilon"),
    ({"epsilon": math.inf}, "epsilon"),
    ({"epsilon_high": -0.1}, "epsilon_high"),
    ({"num_iterations": 0}, "num_iterations"),
    ({"distance_temperature": 0.0}, "distance_temperature"),
    ({"temperature_mode": "auto"}, "temperature_mode"),
    ({"advantage_normalization": "std"}, "advantage_normalization"),
    ({"advantage_epsilon": -1e-4}, "advantage_epsilon"),
    ({"advantage_epsilon": math.nan}, "advantage_epsilon"),
    ({"advantage_epsilon_mode": "batch"}, "advantage_epsilon_mode"),
    ({"quasi_norm_p": 0.0}, "quasi_norm_p"),
    ({"advantage_clip": 0.0}, "advantage_clip"),
    ({"advantage_clip": -1.0}, "advantage_clip"),
    ({"advantage_clip": "big"}, "advantage_clip"),
    ({"beta": -0.1}, "beta"),
    ({"beta": math.nan}, "beta"),
    ({"train_steps": [0, 0]}, "train_steps"),
    ({"train_steps": [-1]}, "train_steps"),
    ({"train_steps": []}, "train_steps"),
    ({"reward_weights": [1.0, math.inf]}, "reward_weights"),
    ({"reward_weights": [1.0, math.nan]}, "reward_weights"),
    ({"reward_weights": []}, "reward_weights"),
    ({"multi_objective_aggregation": "mean"}, "multi_objective_aggregation"),
    ({"reward_error": "ignore"}, "reward_error"),
    ({"max_consecutive_nonfinite_losses": 0}, "max_consecutive_nonfinite_losses"),
    ({"max_consecutive_skipped_groups": 0}, "max_consecutive_skipped_groups"),
    ({"max_skipped_group_fraction": 0.0}, "max_skipped_group_fraction"),
    ({"max_skipped_group_fraction": 1.5}, "max_skipped_group_fraction"),
    ({"max_skipped_group_fraction": math.nan}, "max_skipped_group_fraction"),
    ({"log_videos_steps": -1}, "log_videos_steps"),
    ({"num_videos_to_log": 0}, "num_videos_to_log"),
    ({"video_fps": 0}, "video_fps"),
]


@pytest.mark.parametrize(("overrides", "name"), INVALID, ids=[f"{n}-{i}" for i, (_, n) in enumerate(INVALID)])
def test_invalid_values_raise(tmp_path, overrides, name):
    if "activation_checkpointing" in overrides and not RENAMED_CHECKPOINTING:
        pytest.skip("this transformers has no `activation_checkpointing`")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # `gradient_checkpointing` is a deprecated alias
        with pytest.raises(ValueError, match=re.escape(f"`{name}`")):
            make_config(tmp_path, **overrides)


def test_error_messages_name_value_and_fix(tmp_path):
    with pytest.raises(ValueError) as info:
        make_config(tmp_path, num_anchors=16)
    assert "`num_anchors` (16) must be between 1 and `num_generations` (12); lower `num_anchors`." in str(info.value)

    with pytest.raises(ValueError) as info:
        make_config(tmp_path, temperature_mode="auto")
    assert '"relative", "absolute"' in str(info.value)

    with pytest.raises(ValueError) as info:
        make_config(tmp_path, training_mode="semi_on_policy")
    assert "`replay_dataset` (None) is required" in str(info.value) and "trl-arcopo collect" in str(info.value)

    with pytest.raises(ValueError) as info:
        make_config(tmp_path, replay_dataset="me/buffer")
    assert "only used with `training_mode='semi_on_policy'`" in str(info.value)

    with pytest.raises(ValueError) as info:
        make_config(tmp_path, training_mode="offline")
    assert '"on_policy"' in str(info.value)

    deprecated = pytest.warns(FutureWarning) if RENAMED_CHECKPOINTING else contextlib.nullcontext()
    with deprecated, pytest.raises(ValueError) as info:
        make_config(tmp_path, gradient_checkpointing=True)
    assert "transformer_gradient_checkpointing" in str(info.value)

    with pytest.raises(ValueError) as info:
        make_config(tmp_path, model_init_kwargs={"dtype": "bf16"})
    assert '(\'bf16\') is not a dtype; use one of "auto", "bfloat16", "float16", "float32"' in str(info.value)

    with pytest.raises(ValueError) as info:
        make_config(tmp_path, learning_rate=-1e-3)
    assert "`learning_rate` (-0.001) must be a finite number >= 0" in str(info.value)

    with pytest.raises(ValueError) as info:
        make_config(tmp_path, seed=-1)
    assert "`seed` (-1) must be an integer in [0, 2**32 - 1]" in str(info.value)


def test_model_init_kwargs_dtypes_and_other_strings_pass(tmp_path):
    config = make_config(tmp_path, model_init_kwargs={"dtype": torch.bfloat16, "revision": "main"})
    assert config.model_init_kwargs == {"dtype": torch.bfloat16, "revision": "main"}
    assert make_config(tmp_path, model_init_kwargs={"torch_dtype": "auto"}).model_init_kwargs == {
        "torch_dtype": "auto"
    }


def test_semi_on_policy_mode_names_its_adapter_semi(tmp_path):
    config = make_config(tmp_path, training_mode="semi_on_policy", replay_dataset="me/buffer")
    assert config.adapter_name == "semi" and config.replay_dataset == "me/buffer"
    assert make_config(tmp_path).adapter_name == "on_policy"
    named = make_config(tmp_path, training_mode="semi_on_policy", replay_dataset="me/buffer", adapter_name="mine")
    assert named.adapter_name == "mine"
    (parsed,) = TrlParser((ARCoPOConfig,)).parse_args_and_config(
        ["--output_dir", str(tmp_path), "--training_mode", "semi_on_policy", "--replay_dataset", "buffer"]
    )
    assert parsed.adapter_name == "semi" and parsed.replay_dataset == "buffer"
    assert ARCoPOConfig(**parsed.to_dict()).adapter_name == "semi"


def test_model_init_kwargs_json_string(tmp_path):
    config = make_config(tmp_path, model_init_kwargs='{"dtype": "bfloat16", "low_cpu_mem_usage": "true"}')
    assert config.model_init_kwargs == {"dtype": "bfloat16", "low_cpu_mem_usage": True}
    config = make_config(tmp_path, model_init_kwargs=' {"revision": "main"}')  # not parsed by TrainingArguments
    assert config.model_init_kwargs == {"revision": "main"}


def test_advantage_clip_from_strings(tmp_path):
    assert make_config(tmp_path, advantage_clip="none").advantage_clip is None
    assert make_config(tmp_path, advantage_clip="Null").advantage_clip is None
    assert make_config(tmp_path, advantage_clip="3").advantage_clip == 3.0
    assert make_config(tmp_path, advantage_clip=2).advantage_clip == 2.0


@pytest.mark.parametrize("parser_cls", [TrlParser, HfArgumentParser])
def test_parser_from_args(tmp_path, parser_cls):
    parser = parser_cls((ARCoPOConfig,))
    parser.format_help()  # `%` in help strings must be escaped
    (config,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--report_to",
            "none",
            "--num_generations",
            "4",
            "--num_anchors",
            "2",
            "--lora_target_modules",
            "to_q",
            "to_k",
            "--pivot_strategy",
            "weighted",
            "--pivot_weights",
            "1",
            "2",
            "--train_steps",
            "0",
            "3",
            "--reward_weights",
            "1",
            "0.5",
            "--advantage_clip",
            "none",
            "--epsilon_high",
            "0.01",
            "--model_init_kwargs",
            '{"dtype": "bfloat16"}',
            "--transformer_gradient_checkpointing",
            "--exploration",
            "sde",
        ]
    )
    assert isinstance(config, ARCoPOConfig)
    assert config.num_generations == 4
    assert config.num_anchors == 2
    assert config.lora_target_modules == ["to_q", "to_k"]
    assert config.pivot_weights == [1.0, 2.0]
    assert config.train_steps == [0, 3]
    assert config.reward_weights == [1.0, 0.5]
    assert config.advantage_clip is None
    assert config.epsilon_high == 0.01
    assert config.model_init_kwargs == {"dtype": "bfloat16"}
    assert config.transformer_gradient_checkpointing is True
    assert config.exploration == "sde"
    assert config.bf16 is _cuda_bf16()


def test_parser_defaults_match_dataclass_defaults(tmp_path):
    (config,) = TrlParser((ARCoPOConfig,)).parse_args_and_config(["--output_dir", str(tmp_path)])
    for name, expected in PAPER_DEFAULTS.items():
        assert getattr(config, name) == expected, name


def test_parser_rejects_unknown_choice(tmp_path):
    with pytest.raises(SystemExit):
        TrlParser((ARCoPOConfig,)).parse_args_and_config(["--output_dir", str(tmp_path), "--reward_error", "x"])


def test_parser_from_yaml(tmp_path):
    yaml_path = tmp_path / "config.yaml"
    yaml_path.write_text(
        "\n".join(
            [
                f"output_dir: {tmp_path}",
                "report_to: none",
                "num_generations: 8",
                "num_anchors: 8",
                "noise_sigma: 0.7",
                "epsilon: 1.0e-3",
                "lora_target_modules: [to_q, to_k, to_v]",
                "pivot_strategy: fixed",
                "pivot_index: 3",
                "advantage_clip: null",
                "train_steps: [1, 2]",
                "model_init_kwargs:",
                "  dtype: bfloat16",
                "env:",
                "  ARCOPO_TEST_ENV: set",
            ]
        )
    )
    parser = TrlParser((ARCoPOConfig,))
    (config,) = parser.parse_args_and_config(["--config", str(yaml_path), "--num_anchors", "3"])
    assert config.num_generations == 8
    assert config.num_anchors == 3  # the command line overrides the file
    assert config.noise_sigma == 0.7
    assert config.epsilon == 1e-3
    assert config.lora_target_modules == ["to_q", "to_k", "to_v"]
    assert config.pivot_strategy == "fixed"
    assert config.pivot_index == 3
    assert config.advantage_clip is None
    assert config.train_steps == [1, 2]
    assert config.model_init_kwargs == {"dtype": "bfloat16"}


def test_to_dict_and_json_round_trip(tmp_path):
    config = make_config(
        tmp_path,
        model_init_kwargs={"dtype": "bfloat16"},
        pivot_strategy="weighted",
        pivot_weights=[1.0, 2.0],
        train_steps=[0, 1],
        reward_weights=[1.0, 2.0],
        advantage_clip=None,
    )
    as_dict = config.to_dict()
    assert as_dict["pivot_weights"] == [1.0, 2.0]
    assert as_dict["model_init_kwargs"] == {"dtype": "bfloat16"}

    rebuilt = ARCoPOConfig(**as_dict)
    assert rebuilt.to_dict() == as_dict

    from_json = ARCoPOConfig(**json.loads(config.to_json_string()))
    assert from_json.to_dict() == as_dict

    replaced = dataclasses.replace(config, num_anchors=2)
    assert replaced.num_anchors == 2
    assert replaced.pivot_weights == [1.0, 2.0]

"""Secrets (a Hub token in `model_init_kwargs`, `hub_token`, API keys) never reach what is written or logged."""

import json

import torch
from datasets import Dataset

from trl_arcopo import ARCoPOConfig, ARCoPOTrainer
from trl_arcopo.replay import generation_settings, group_to_record
from trl_arcopo.rollout import RolloutGroup
from trl_arcopo.testing import TINY_TRAINING_ARGS, tiny_causal_wan_pipeline
from trl_arcopo.utils.redact import REDACTED, is_secret_key, redact_secrets

TOKEN = "hf_" + "a1B2c3D4e5" * 4


def test_secret_keys():
    secret = ["token", "hub_token", "HF_TOKEN", "access_token", "api_key", "openaiApiKey", "db_password", "secret"]
    plain = ["max_tokens", "num_tokens", "tokenizer", "tokenizer_name", "key", "api", "keywords", "secretary"]
    assert all(is_secret_key(key) for key in secret) and not any(is_secret_key(key) for key in plain)


def test_redact_secrets_is_a_deep_copy_of_everything_else():
    value = {"kwargs": {"token": TOKEN, "dtype": "bfloat16"}, "items": [{"api_key": "sk-1"}, ("x", TOKEN)], "n": 3}
    assert redact_secrets(value) == {
        "kwargs": {"token": REDACTED, "dtype": "bfloat16"},
        "items": [{"api_key": REDACTED}, ("x", REDACTED)],  # a Hub token is found in any string
        "n": 3,
    }
    assert value["kwargs"]["token"] == TOKEN  # the input is untouched
    assert redact_secrets({"token": None, "use_auth_token": True}) == {"token": None, "use_auth_token": True}


def test_training_arguments_never_show_a_token(tmp_path):
    """`model_init_kwargs={"token": ...}` was written verbatim to training_args.json (and pushed to the Hub)."""
    args = ARCoPOConfig(
        str(tmp_path / "out"), **TINY_TRAINING_ARGS, max_steps=1, hub_token=TOKEN, model_init_kwargs={"token": TOKEN}
    )
    assert args.model_init_kwargs["token"] == TOKEN  # the trainer still gets it
    for text in (args.to_json_string(), repr(args), str(args), json.dumps(args.to_sanitized_dict())):
        assert TOKEN not in text and REDACTED in text
    trainer = ARCoPOTrainer(
        tiny_causal_wan_pipeline(), "brightness", args=args, train_dataset=Dataset.from_dict({"prompt": ["a cat"]})
    )
    trainer.save_model()
    written = {path.name: path.read_text() for path in (tmp_path / "out").iterdir() if path.suffix in (".json", ".md")}
    assert {"training_args.json", "README.md"} <= set(written)
    assert json.loads(written["training_args.json"])["model_init_kwargs"] == {"token": REDACTED}
    assert not any(TOKEN in text for text in written.values())


def test_replay_settings_never_show_a_token():
    pipe = tiny_causal_wan_pipeline()
    settings = generation_settings(pipe, num_generations=2, noise_sigma=0.5, num_frames=9, height=32, width=32)
    settings["model_id"] = f"https://user:{TOKEN}@example.com/model"  # free text: a token may hide in it
    chunk = (16, 3, 4, 4)
    group = RolloutGroup(
        prompt_embeds=None, pivot=0, prefix_latents=torch.zeros(1, 16, 0, 4, 4), inputs=torch.zeros(4, 2, *chunk),
        predictions=torch.zeros(4, 2, *chunk), noise=torch.zeros(3, 2, *chunk), latents=None, videos=None,
        exploration="fork",
    )  # fmt: skip
    record = group_to_record(group, prompt="p", rewards={"r": [0.0, 1.0]}, settings=settings, group_index=0)
    assert TOKEN not in record["settings"] and REDACTED in json.loads(record["settings"])["model_id"]

"""Replay buffers: exact record round trips (disk, Hub, streaming), compact storage, bf16, resumable collection."""

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import datasets.arrow_dataset
import pytest
import torch
from datasets import Array5D, Dataset, load_dataset, load_from_disk
from fsspec.implementations.memory import MemoryFileSystem
from huggingface_hub import CommitOperationAdd

from trl_arcopo.replay import (
    buffer_settings,
    check_buffer_settings,
    collect_replay_buffer,
    generation_settings,
    group_to_record,
    load_replay_buffer,
    record_rewards,
    record_to_group,
    replay_features,
    settings_digest,
    validate_replay_buffer,
)
from trl_arcopo.rewards import brightness_reward, registry
from trl_arcopo.rollout import generate_group, sample_pivot
from trl_arcopo.scripts import collect, train
from trl_arcopo.testing import populate_hub_cache, tiny_causal_wan_pipeline

PROMPTS = ["a red car", "a blue sea", "a cat"]
SIZE = {"num_generations": 4, "num_frames": 21, "height": 32, "width": 32}  # 2 chunks of [16, 3, 4, 4] latents
TENSOR_COLUMNS = ("prefix_latents", "branch_noise", "step_noise", "predictions")


def redness(prompts, videos, **kwargs):
    return (videos[:, :, 0] - videos[:, :, 1:].mean(2)).mean(dim=(1, 2, 3)).tolist()


@pytest.fixture(scope="module")
def pipe():
    return tiny_causal_wan_pipeline()


@pytest.fixture(scope="module")
def buffer(pipe) -> Dataset:
    return collect_replay_buffer(
        pipe, PROMPTS, [brightness_reward, redness], num_groups=4, seed=3, progress_bar=False, **SIZE
    )


def _assert_same_rows(got, expected, reward_atol: float = 0.0) -> None:
    """Every column of every row equal, tensors bit for bit (rows as python objects)."""
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if key in TENSOR_COLUMNS:
                assert torch.equal(torch.tensor(a[key]), torch.tensor(b[key])), key
            elif key == "rewards":
                assert a[key].keys() == b[key].keys()
                for name in a[key]:
                    assert a[key][name] == pytest.approx(b[key][name], abs=reward_atol, rel=0), name
            else:
                assert a[key] == b[key], key


def _reference_group(pipe, index: int, seed: int = 3, exploration: str = "fork"):
    """Group `index` of a collection, rolled out directly: prompt `index mod 3`, generator seeded `seed + index`."""
    generator = torch.Generator().manual_seed(seed + index)
    pivot = sample_pivot(2, generator=generator)
    embeds = pipe.encode_prompt(PROMPTS[index % len(PROMPTS)])
    group = generate_group(
        pipe,
        embeds,
        num_generations=4,
        latent_shape=(16, 6, 4, 4),
        pivot=pivot,
        exploration=exploration,
        generator=generator,
    )
    return group, embeds


def _assert_same_group(rebuilt, group, atol: float = 0.0) -> None:
    """Bit for bit by default; with ``atol``, the latents, x̂0 and inputs up to float rounding (a collected group vs a
    direct rollout: collection batches the text contexts and cache reads differently). The noise is always exact."""
    assert rebuilt.pivot == group.pivot and rebuilt.exploration == group.exploration
    assert torch.equal(rebuilt.noise, group.noise)
    for name in ("prefix_latents", "inputs", "predictions"):
        torch.testing.assert_close(getattr(rebuilt, name), getattr(group, name), atol=atol, rtol=0, msg=name)


def test_collected_groups_are_the_rollouts_and_rebuild_their_inputs_exactly(pipe, buffer):
    rows = buffer.with_format("numpy", dtype=None)
    assert list(buffer["group_index"]) == [0, 1, 2, 3] and list(buffer["prompt"]) == [*PROMPTS, PROMPTS[0]]
    for index in range(4):
        group, embeds = _reference_group(pipe, index)
        record = rows[index]
        rebuilt = record_to_group(record, embeds)
        # The noisy inputs are not stored: renoise(x̂0_s, η_s, σ_{s+1}) reproduces them (bit for bit: the round trip).
        _assert_same_group(rebuilt, group, atol=1e-5)
        assert rebuilt.latents is None and rebuilt.videos is None
        rewards = record_rewards(record)
        assert list(rewards) == ["brightness_reward", "redness"]
        assert rewards["brightness_reward"].tolist() == pytest.approx(
            brightness_reward(["p"] * 4, group.videos), abs=1e-5
        )
        assert rewards["redness"].dtype == torch.float64
        assert rewards["redness"].tolist() == pytest.approx(redness(None, group.videos), abs=1e-5)
    assert set(buffer["pivot"]) == {0, 1}  # both the empty and a non-empty prefix are covered


@pytest.mark.parametrize(("exploration", "pivot"), [("fork", 1), ("sde", 0), ("sde", 1)])
def test_record_round_trip_for_both_explorations(pipe, tmp_path, exploration, pivot):
    embeds = pipe.encode_prompt("a dog")
    group = generate_group(
        pipe,
        embeds,
        num_generations=4,
        latent_shape=(16, 6, 4, 4),
        pivot=pivot,
        exploration=exploration,
        generator=torch.Generator().manual_seed(0),
    )
    settings = generation_settings(pipe, noise_sigma=0.5, exploration=exploration, **SIZE)
    rewards = {"score:a": torch.arange(4.0, dtype=torch.float64) / 3, "score:b": [0.1, 0.2, 0.3, 0.4]}
    record = group_to_record(group, prompt="a dog", rewards=rewards, settings=settings, group_index=7)
    Dataset.from_list([record], features=replay_features(settings, list(rewards))).save_to_disk(tmp_path / "b")
    loaded = load_replay_buffer(tmp_path / "b")[0]
    _assert_same_group(record_to_group(loaded, embeds), group)
    selected = record_rewards(loaded, ["score"])  # a reward with heads selects all its columns
    assert list(selected) == ["score:a", "score:b"] and torch.equal(selected["score:a"], rewards["score:a"])
    assert selected["score:b"].tolist() == [0.1, 0.2, 0.3, 0.4]  # float64, exact


def test_a_stored_group_is_compact(buffer):
    """At most G·T + G + T chunk-shaped tensors plus the prefix: the inputs x_{t_s} are rebuilt, not stored."""
    G, T, chunk = 4, 4, (16, 3, 4, 4)
    shapes = {name: buffer.features[name].shape for name in TENSOR_COLUMNS}
    assert all(isinstance(buffer.features[name], Array5D) and shape[1:] == chunk for name, shape in shapes.items())
    assert shapes["prefix_latents"][0] is None  # one entry per chunk before the pivot
    stored = sum(shape[0] for name, shape in shapes.items() if name != "prefix_latents")
    assert stored == G * T + G + (T - 1) <= G * T + G + T
    assert buffer.features["rewards"]["redness"].length == G
    settings = buffer_settings(buffer)
    assert len(settings) == 1 and settings[0]["exploration"] == "fork" and settings[0]["seed"] == 3


def test_bfloat16_storage_halves_the_size_and_rounds_only(pipe, buffer, tmp_path):
    half = collect_replay_buffer(
        pipe, PROMPTS, [brightness_reward, redness], num_groups=4, seed=3, storage_dtype=torch.bfloat16,
        progress_bar=False, **SIZE,
    )  # fmt: skip
    assert half.features["predictions"].dtype == "uint16"  # Arrow has no bfloat16: the raw 16 bits
    for name in TENSOR_COLUMNS:
        assert 2 * half.with_format("numpy", dtype=None)[1][name].nbytes == buffer.with_format("numpy")[1][name].nbytes
    assert half.data.nbytes < buffer.data.nbytes
    half.save_to_disk(tmp_path / "half")
    loaded = load_replay_buffer(tmp_path / "half")
    exact = buffer.with_format("numpy", dtype=None)
    for index in range(4):
        group = record_to_group(exact[index], torch.zeros(1, 16, 32))
        rounded = record_to_group(loaded[index], torch.zeros(1, 16, 32))
        assert torch.equal(rounded.predictions, group.predictions.bfloat16().float())
        assert torch.equal(rounded.prefix_latents, group.prefix_latents.bfloat16().float())
        torch.testing.assert_close(rounded.inputs, group.inputs, atol=0.05, rtol=0.01)
    # The torch format widens the stored uint16 to int64: the bits still decode exactly.
    widened = record_to_group(half.with_format("torch")[1], torch.zeros(1, 16, 32))
    assert torch.equal(widened.predictions, record_to_group(loaded[1], torch.zeros(1, 16, 32)).predictions)


class _FakeHub:
    """Stands in for the Hub in `Dataset.push_to_hub`: every uploaded file lands in `folder`."""

    def __init__(self, folder: Path):
        self.folder = folder

    def __call__(self, **kwargs):  # replaces the `HfApi(...)` constructor
        return self

    def _write(self, path_in_repo: str, content: bytes) -> None:
        target = self.folder / path_in_repo
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)

    def repo_info(self, repo_id, **kwargs):
        return SimpleNamespace(id=repo_id, sha="0" * 40)

    def list_repo_tree(
        self, repo_id, **kwargs
    ):  # the repository starts empty (datasets 4.7; newer use `HfFileSystem`)
        return []

    def preupload_lfs_files(self, repo_id, additions, **kwargs):
        for addition in additions:  # the temporary parquet file is deleted after this call
            self._write(addition.path_in_repo, Path(addition.path_or_fileobj).read_bytes())

    def create_commit(self, repo_id, operations, **kwargs):
        for operation in operations:
            if isinstance(operation, CommitOperationAdd) and isinstance(operation.path_or_fileobj, bytes):
                self._write(operation.path_in_repo, operation.path_or_fileobj)
        return SimpleNamespace(commit_url="https://example.invalid", oid="0" * 40)


def test_collect_script_pushes_a_buffer_that_loads_from_the_hub_bit_exactly(tmp_path, monkeypatch, hf_cache):
    hub = _FakeHub(tmp_path / "repo")
    monkeypatch.setattr(datasets.arrow_dataset, "HfApi", hub)
    # Newer datasets list the repository through `HfFileSystem` (datasets 4.7 has none: `list_repo_tree` above).
    monkeypatch.setattr(datasets.arrow_dataset, "HfFileSystem", lambda **kwargs: MemoryFileSystem(), raising=False)
    output = tmp_path / "buffer"
    argv = ["--output_dir", str(output), "--num_groups", "3", "--reward_funcs", "brightness", "colorfulness"]
    merged = collect.main([*argv, "--push_to_hub", "--hub_dataset_id", "me/tiny-replay"])
    assert list(merged["group_index"]) == [0, 1, 2] and not (output / "shards").exists()
    card = (tmp_path / "repo" / "README.md").read_text()
    assert "array5_d" in card and "colorfulness_reward" in card  # the features travel in the dataset card

    snapshot = populate_hub_cache("me/tiny-replay", tmp_path / "repo", cache_dir=hf_cache, repo_type="dataset")
    from_hub = load_replay_buffer("me/tiny-replay", cache_dir=hf_cache)  # HF_HUB_OFFLINE=1: served by the cache
    from_disk = load_replay_buffer(output)
    assert from_hub.features == from_disk.features
    _assert_same_rows(from_hub.with_format(None), from_disk.with_format(None))
    assert json.loads(from_hub[0]["settings"])["num_generations"] == 8  # the tiny preset's G

    streamed = load_replay_buffer(snapshot, streaming=True)
    _assert_same_rows(list(streamed), list(from_disk.with_format(None)))
    embeds = torch.zeros(1, 16, 32)
    first_streamed = record_to_group(next(iter(streamed)), embeds)
    _assert_same_group(first_streamed, record_to_group(from_disk[0], embeds))
    assert load_dataset(str(snapshot), split="train").features == from_disk.features


def test_interrupted_collection_resumes_without_losing_or_repeating_groups(tmp_path, monkeypatch):
    calls = {"n": 0, "fail_at": 3}

    def flaky(prompts, videos, **kwargs):
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            raise ConnectionError("reward server down")
        return videos.mean(dim=(1, 2, 3, 4)).tolist()

    monkeypatch.setitem(registry._LOADERS, "flaky", lambda: flaky)
    output = tmp_path / "buffer"
    argv = ["--output_dir", str(output), "--num_groups", "5", "--reward_funcs", "flaky", "--num_generations", "4"]
    with pytest.raises(RuntimeError, match="reward server down"):
        collect.main(argv)
    shards = sorted(p.name for p in (output / "shards").iterdir())
    assert shards == ["group-000000", "group-000001"]  # the group in progress left no partial shard behind
    kept = load_from_disk(str(output / "shards" / "group-000001"))[0]

    calls.update(n=0, fail_at=0)
    merged = collect.main(argv)
    assert calls["n"] == 3  # only the 3 missing groups were rolled out
    assert list(merged["group_index"]) == [0, 1, 2, 3, 4]
    _assert_same_rows([merged[1]], [kept])
    # Nothing is rewritten but the lock file, which filelock (up to 3.x) truncates on each acquire.
    files = {path: path.stat().st_mtime_ns for path in output.iterdir() if path.name != collect.LOCK_FILE}
    assert list(collect.main(argv)["group_index"]) == [0, 1, 2, 3, 4] and calls["n"] == 3  # complete: nothing to do
    assert {path: path.stat().st_mtime_ns for path in output.iterdir() if path.name != collect.LOCK_FILE} == files

    with pytest.raises(SystemExit):  # the same folder with another σ would mix incompatible groups
        collect.main([*argv, "--noise_sigma", "0.25", "--num_groups", "6"])


def test_processes_collect_disjoint_shares_that_merge_into_the_single_process_buffer(pipe, buffer, tmp_path):
    kwargs = {"num_groups": 4, "seed": 3, "noise_sigma": 0.5, "progress_bar": False, **SIZE}
    rewards = [brightness_reward, redness]
    assert collect.collect_shards(pipe, PROMPTS, rewards, tmp_path, process_index=1, num_processes=2, **kwargs) == [
        1,
        3,
    ]
    assert collect.collect_shards(pipe, PROMPTS, rewards, tmp_path, process_index=0, num_processes=2, **kwargs) == [
        0,
        2,
    ]
    _assert_same_rows(collect.merge_shards(tmp_path), buffer)


@pytest.mark.slow
def test_collect_script_on_two_loopback_machines(tmp_path, free_port, accelerate_launch):
    """`accelerate launch` over `--num_machines 2`, one process each (run here as two launches on 127.0.0.1): the
    processes collect disjoint shares that merge into the single-process buffer."""
    argv = ["--num_groups", "4", "--num_generations", "4"]
    module = ["-m", "trl_arcopo.scripts.collect", "--output_dir", tmp_path / "two", *argv]
    stdouts = accelerate_launch(module, free_port, machines=2)
    assert "4 rollout groups" in stdouts[0]
    # The groups are bit-identical; the rewards of the decoded videos only up to the order of the VAE's float sums,
    # which depends on the number of threads.
    single = collect.main(["--output_dir", str(tmp_path / "one"), *argv])
    _assert_same_rows(load_from_disk(str(tmp_path / "two")), single, reward_atol=1e-6)


def test_collect_help_lists_every_option(capsys):
    help_text = collect.make_parser().format_help()
    for flag in (
        "--num_groups",
        "--storage_dtype",
        "--push_to_hub",
        "--hub_dataset_id",
        "--prompt_file",
        "--reward_funcs",
        "--noise_sigma",
        "--model_revision",
    ):
        assert flag in help_text, flag
    with pytest.raises(SystemExit) as info:
        collect.main(["--preset", "huge"])
    assert info.value.code == 2 and "unknown --preset 'huge'" in capsys.readouterr().err


def test_buffer_settings_must_match_and_every_difference_is_listed(pipe):
    stored = generation_settings(pipe, noise_sigma=0.5, **SIZE)
    check_buffer_settings(stored, generation_settings(pipe, noise_sigma=0.5, seed=9, **SIZE))  # seed: informative
    other = generation_settings(
        tiny_causal_wan_pipeline(local_attn_size=6), noise_sigma=0.7, exploration="sde", model_id="me/model",
        num_generations=8, num_frames=33, height=32, width=64,
    )  # fmt: skip
    with pytest.raises(ValueError) as info:
        check_buffer_settings(stored, other)
    message = str(info.value)
    for line in (
        "num_generations: buffer 4, this run 8",
        "noise_sigma: buffer 0.5, this run 0.7",
        "exploration: buffer 'fork', this run 'sde'",
        "num_frames: buffer 21, this run 33",
        "width: buffer 32, this run 64",
        "latent_shape: buffer [16, 6, 4, 4], this run [16, 9, 4, 8]",
        "local_attn_size: buffer -1, this run 6",
    ):
        assert line in message, message
    assert "(7 difference(s))" in message  # the model id is unknown on the buffer's side: not compared
    with pytest.raises(ValueError, match="model_id: buffer 'me/a', this run 'me/b'"):
        check_buffer_settings({**stored, "model_id": "me/a"}, {**stored, "model_id": "me/b"})


def test_bad_buffers_and_records_raise_clear_errors(pipe, buffer, tmp_path):
    buffer.remove_columns(["predictions", "settings"]).save_to_disk(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['predictions', 'settings'\]"):
        load_replay_buffer(tmp_path / "missing")
    with pytest.raises(ValueError, match="holds no rollout group"):
        validate_replay_buffer(Dataset.from_dict({name: [] for name in buffer.features}, features=buffer.features))

    group, _ = _reference_group(pipe, 0)
    settings = generation_settings(pipe, noise_sigma=0.5, **SIZE)
    with pytest.raises(ValueError, match="must hold 4 finite scores"):
        group_to_record(group, prompt="p", rewards={"r": [1.0, math.nan, 0.0, 0.0]}, settings=settings, group_index=0)
    with pytest.raises(ValueError, match="does not match the settings"):
        group_to_record(group, prompt="p", rewards={}, settings={**settings, "num_generations": 8}, group_index=0)
    with pytest.raises(ValueError, match="no rewards for 'sharpness'"):
        record_rewards(buffer[0], ["sharpness"])
    with pytest.raises(ValueError, match="non-finite scores"):
        collect_replay_buffer(
            pipe, PROMPTS, lambda p, v: [math.inf] * len(p), num_groups=1, progress_bar=False, **SIZE
        )


def _with_settings(buffer: Dataset, edit) -> Dataset:
    return buffer.map(lambda row: {"settings": json.dumps(edit(json.loads(row["settings"])))})


def test_edited_settings_are_refused_by_their_digest(buffer, tmp_path, capsys):
    """A buffer's settings carry the sha256 of their canonical JSON: editing them (to pass `check_buffer_settings`)
    no longer trains on groups that were generated otherwise."""
    (stored,) = buffer_settings(buffer)
    assert "sha256" not in stored and json.loads(buffer[0]["settings"])["sha256"] == settings_digest(stored)
    edited = _with_settings(buffer, lambda settings: {**settings, "noise_sigma": 0.25})
    with pytest.raises(ValueError, match="settings were edited after the collection"):
        buffer_settings(edited)
    undigested = _with_settings(buffer, lambda settings: {k: v for k, v in settings.items() if k != "sha256"})
    with pytest.raises(ValueError, match="carry no digest: it was collected by an older trl_arcopo"):
        buffer_settings(undigested)
    # The trainer refuses it in one line.
    edited.save_to_disk(tmp_path / "edited")
    argv = ["--training_mode", "semi_on_policy", "--replay_dataset", str(tmp_path / "edited"), "--max_steps", "1"]
    argv += ["--reward_funcs", "brightness", "--output_dir", str(tmp_path / "out"), *_size_flags()]
    with pytest.raises(SystemExit) as info:
        train.main(argv)
    assert info.value.code == 2 and "settings were edited after the collection" in capsys.readouterr().err


def _size_flags() -> list[str]:
    return [f"--{key}={value}" for key, value in SIZE.items()]


def test_empty_or_missing_buffers_are_clear_errors(buffer, tmp_path):
    buffer.select([]).save_to_disk(tmp_path / "empty")  # datasets' load_from_disk raised an IndexError
    with pytest.raises(ValueError, match="Replay buffer '.*empty' holds no rollout group"):
        load_replay_buffer(tmp_path / "empty")
    buffer.select([]).to_parquet(tmp_path / "empty-parquet" / "train.parquet")
    with pytest.raises(ValueError, match="empty-parquet' holds no readable rollout group"):
        load_replay_buffer(tmp_path / "empty-parquet")
    # huggingface_hub said "Repo id must be in the form 'repo_name' or 'namespace/repo_name'".
    with pytest.raises(
        ValueError, match="the folder /nonexistent/buffer does not exist; for a Hub dataset use org/name"
    ):
        load_replay_buffer("/nonexistent/buffer")
    with pytest.raises(ValueError, match="'me/not-cached' is neither an existing folder nor a Hub dataset that could"):
        load_replay_buffer("me/not-cached", cache_dir=tmp_path / "hub")  # HF_HUB_OFFLINE=1


def test_collection_checks_its_arguments(pipe):
    for kwargs, message in [
        ({"num_generations": 1}, "`num_generations` must be >= 2"),
        ({"noise_sigma": 0.0}, r"`noise_sigma` must be in \(0, 1\]"),
        ({"noise_sigma": 5.0}, r"`noise_sigma` must be in \(0, 1\]"),
        ({"height": 40}, "must be a positive multiple of 16"),
        ({"num_frames": 10}, "does not split into whole chunks"),
    ]:
        with pytest.raises(ValueError, match=message):
            collect_replay_buffer(
                pipe, PROMPTS, brightness_reward, num_groups=1, progress_bar=False, **{**SIZE, **kwargs}
            )


def test_a_rerun_repairs_shards_left_by_a_merge_killed_while_deleting_them(tmp_path):
    """kill -9 between the merge and the deletion of its shards left every rerun failing ("holds some groups twice")."""
    output = tmp_path / "buffer"
    argv = ["--output_dir", str(output), "--num_groups", "3", "--num_generations", "4"]
    merged = collect.main(argv)
    for index in (0, 2):  # the shards the killed merge had not deleted yet
        merged.select([index]).save_to_disk(output / "shards" / f"group-{index:06d}")
    repaired = collect.main(argv)
    _assert_same_rows(repaired, merged)
    assert not (output / "shards").exists()


def test_two_collections_into_one_folder_are_refused(tmp_path, capsys):
    output = tmp_path / "buffer"
    argv = ["--output_dir", str(output), "--num_groups", "1", "--num_generations", "4"]
    with collect.collection_lock(output):  # another collection runs (here: this process)
        with pytest.raises(SystemExit) as info:
            collect.main(argv)
    error = capsys.readouterr().err
    assert info.value.code == 2 and f"{output} is already being collected into by pid {os.getpid()} on " in error
    assert len(collect.main(argv)) == 1  # released

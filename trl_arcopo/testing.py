"""Tiny offline components and Hub-cache helpers for tests and examples.

Nothing here downloads anything. Library code must not import this module.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from huggingface_hub.file_download import repo_folder_name
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPTokenizer,
    PreTrainedTokenizerFast,
    UMT5Config,
    UMT5EncoderModel,
)

from .presets import TINY_TRAINING_ARGS as TINY_TRAINING_ARGS  # re-exported: the base of the trainer tests
from .rewards.clip import AestheticHead

_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2, as in the umT5 tokenizer

_WORDS = """
a an the and or but of in on at to from with without by for over under above below into onto through across along
around behind beside between near far inside outside up down left right front back top bottom
is are was were be being been has have had do does did can will would should could may might
it its this that these those there here he she they we you i his her their our your my me him them us
one two three four five six seven eight nine ten many few some all every each several most more less
big small large tiny huge little long short tall wide narrow thick thin high low deep old young new
red orange yellow green blue purple pink brown black white gray grey gold silver golden dark bright colorful
light shadow sun sunlight sunset sunrise moon star stars sky cloud clouds rain snow wind fog storm lightning
water river lake sea ocean wave waves beach sand desert mountain mountains hill forest tree trees leaf leaves
flower flowers grass field garden park road street city town village house building bridge tower castle
room kitchen window door wall floor table chair bed car cars bus train boat ship plane bicycle
man woman person people child children boy girl baby family friend crowd dancer chef soldier astronaut robot
dog dogs cat cats bird birds fish horse cow sheep lion tiger bear elephant monkey rabbit fox wolf deer
panda dragon butterfly bee owl eagle duck
walk walks walking run runs running jump jumps jumping fly flies flying swim swims swimming dance dances dancing
sit sits sitting stand stands standing play plays playing eat eats eating drink drinking sleep sleeping
look looks looking watch watching smile smiling laugh laughing talk talking sing singing cook cooking
drive driving ride riding move moves moving turn turns turning fall falls falling rise rising hold holding
wear wearing open opening close closing throw catch climb climbing
slowly quickly gently softly happily together alone again
camera shot view scene video close-up closeup aerial wide-angle pan zoom tracking cinematic realistic
detailed beautiful cute happy sad calm peaceful dramatic vibrant soft warm cold hot wet dry quiet loud
morning evening night day time winter summer spring autumn
fire smoke glass ice stone wood metal paper hat coat dress shirt shoes glasses ball book guitar piano
"""

_PUNCTUATION = (".", ",", "!", "?", "'", '"', "-", ":", ";", "(", ")")


def tiny_transformer_config() -> dict[str, Any]:
    """Keyword arguments of a tiny `WanTransformer3DModel` (Wan2.1's architecture in miniature): 28 k parameters, 69 tensors.

    2 heads x head_dim 12 (inner dim 24), text_dim 32 (= the tiny text encoder's d_model), ffn_dim 32, 2 layers,
    rope_max_seq_len 32 (so at most 32 latent frames).
    """
    return {
        "patch_size": (1, 2, 2),
        "num_attention_heads": 2,
        "attention_head_dim": 12,
        "in_channels": 16,
        "out_channels": 16,
        "text_dim": 32,
        "freq_dim": 256,
        "ffn_dim": 32,
        "num_layers": 2,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
        "rope_max_seq_len": 32,
    }


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer over a few hundred common English words, built without the Hub.

    Ids: `<pad>` = 0, `</s>` = 1 (appended to every sequence), `<unk>` = 2, then punctuation and words
    (vocabulary size < 1103, the tiny text encoder's `vocab_size`). `model_max_length` is 512, as for umT5.
    """
    words = dict.fromkeys([*_SPECIAL_TOKENS, *_PUNCTUATION, *_WORDS.split()])  # ordered, de-duplicated
    vocab = {word: index for index, word in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def tiny_components(seed: int = 0, **transformer_overrides: Any) -> dict[str, Any]:
    """Tiny float32 Wan2.1 components (the real classes at toy sizes), built fully offline, all modules in eval mode.

    Args:
        seed: `torch.manual_seed(seed)` is called before building each module.
        **transformer_overrides: replace entries of [`tiny_transformer_config`] (e.g. `attention_head_dim=16`).

    Returns:
        `{"transformer", "vae", "text_encoder", "tokenizer", "scheduler"}`, the keyword arguments of a `WanPipeline`:
        - transformer: `WanTransformer3DModel`, latents [B, 16, F, H, W] with H, W even, F <= 32;
        - vae: `AutoencoderKLWan` with z_dim 16, strides 4 (time, first frame alone) / 8 (space);
        - text_encoder: `UMT5EncoderModel` with d_model 32, embeddings [B, L, 32];
        - tokenizer: [`tiny_tokenizer`];
        - scheduler: `FlowMatchEulerDiscreteScheduler(shift=5.0)` (a config holder).
    """
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(**{**tiny_transformer_config(), **transformer_overrides})
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    with torch.no_grad():
        # A random tiny decoder is dominated by its biases: it decodes every latent to nearly the same video, so no
        # video reward could depend on the generator. Amplifying its input path makes decoded frames (and rewards)
        # follow the latents.
        vae.post_quant_conv.weight.mul_(100.0)
        vae.decoder.conv_in.weight.mul_(100.0)
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=1103,
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=5,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="relu",
            layer_norm_epsilon=1e-6,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    return {
        "transformer": transformer.float().eval(),
        "vae": vae.float().eval(),
        "text_encoder": text_encoder.float().eval(),
        "tokenizer": tiny_tokenizer(),
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=5.0),
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def populate_hub_cache(
    repo_id: str,
    folder: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike,
    repo_type: str = "model",
    revision: str = "main",
    move: bool = False,
) -> Path:
    """Install the files of a local folder into a Hugging Face Hub cache as if `repo_id` had been downloaded.

    Writes the real cache layout::

        cache_dir/models--org--name/blobs/<sha256 of each file>
        cache_dir/models--org--name/snapshots/<commit>/<relative path>  -> ../../blobs/<sha256> (relative symlink)
        cache_dir/models--org--name/refs/<revision>                      (contains <commit>)

    (`datasets--org--name` for `repo_type="dataset"`). The commit is a deterministic 40-hex digest of the folder's
    content, so populating the same content twice is idempotent. With `HF_HUB_OFFLINE=1` in the environment *before*
    `huggingface_hub` is imported, `hf_hub_download(repo_id, filename, cache_dir=cache_dir)`, `snapshot_download`
    and `DiffusionPipeline.from_pretrained(repo_id, cache_dir=cache_dir)` then resolve these files through their
    ordinary code paths.

    Args:
        repo_id: `"org/name"`.
        folder: local folder whose files (recursively) become the repo's files.
        cache_dir: the cache to write to; pass the same `cache_dir` to the loading functions.
        repo_type: `"model"`, `"dataset"` or `"space"`.
        revision: the ref (branch or tag name) pointing to the new snapshot.
        move: move the files into the cache instead of copying them (a staging folder of large checkpoints that is
            deleted afterwards).

    Returns:
        The snapshot folder `cache_dir/<repo folder>/snapshots/<commit>`.

    Example:
        ```python
        >>> snapshot = populate_hub_cache("org/tiny", "my_folder", cache_dir=tmp_path / "hub")
        >>> hf_hub_download("org/tiny", "config.json", cache_dir=tmp_path / "hub")  # HF_HUB_OFFLINE=1
        ```
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a directory.")
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    if not files:
        raise ValueError(f"{folder} contains no files.")
    storage = Path(cache_dir) / repo_folder_name(repo_id=repo_id, repo_type=repo_type)
    blobs = {path.relative_to(folder).as_posix(): _sha256(path) for path in files}
    commit = hashlib.sha1("\n".join(f"{name} {blob}" for name, blob in blobs.items()).encode()).hexdigest()

    snapshot = storage / "snapshots" / commit
    for path, (name, blob) in zip(files, blobs.items(), strict=True):
        blob_path = storage / "blobs" / blob
        if not blob_path.exists():
            blob_path.parent.mkdir(parents=True, exist_ok=True)
            (shutil.move if move else shutil.copyfile)(path, blob_path)
        pointer = snapshot / name
        pointer.parent.mkdir(parents=True, exist_ok=True)
        if pointer.is_symlink() or pointer.exists():
            pointer.unlink()
        pointer.symlink_to(os.path.relpath(blob_path, pointer.parent))
    ref = storage / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)
    return snapshot


def tiny_causal_wan_pipeline(seed: int = 0, **overrides: Any):
    """A tiny, offline, float32 `CausalWanPipeline` (the embedded default of the demo and of the tests).

    Args:
        seed: seed of every component (see [`tiny_components`]).
        **overrides: pipeline config (`local_attn_size=6`, `sink_size=3`, `num_frame_per_block`, ...) or
            transformer config entries (any key of [`tiny_transformer_config`]).

    Returns a pipeline generating `[B, 16, F, H/8, W/8]` latents (F <= 32) with 16-token prompts; 32x32 pixels and
    9 + 12·(chunks - 1) frames are the usual test sizes.
    """
    from .pipelines.causal_wan import CausalWanPipeline, PipelineSource

    transformer_keys = tiny_transformer_config().keys()
    transformer_overrides = {k: v for k, v in overrides.items() if k in transformer_keys}
    pipeline_config = {"max_sequence_length": 16, **{k: v for k, v in overrides.items() if k not in transformer_keys}}
    pipe = CausalWanPipeline(**tiny_components(seed, **transformer_overrides), **pipeline_config)
    call = f"tiny_causal_wan_pipeline({', '.join(f'{k}={v!r}' for k, v in {'seed': seed, **overrides}.items())})"
    code = f"from trl_arcopo.testing import tiny_causal_wan_pipeline\n\npipe = {call}"
    pipe.source = PipelineSource(f"the tiny preset `{call}` (random weights, trl_arcopo.testing)", None, code)
    return pipe


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer (byte-level BPE) without merges, built without the Hub: every character is one token.

    Vocabulary: the 256 byte-level characters, the same with the end-of-word suffix `</w>`, then
    `<|startoftext|>` (id 512) and `<|endoftext|>` (id 513, also the padding token), 514 ids in all.
    `model_max_length` is 77, as for CLIP.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = [*alphabet, *(char + "</w>" for char in alphabet), "<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={token: index for index, token in enumerate(tokens)}, merges=[], model_max_length=77)


def save_tiny_clip(
    path: str | os.PathLike,
    *,
    seed: int = 0,
    image_size: int = 32,
    projection_dim: int = 16,
    with_model: bool = True,
    with_processor: bool = True,
) -> Path:
    """Save a tiny random CLIP in the layout of a CLIP Hub repo (e.g. `openai/clip-vit-large-patch14`).

    - model (`with_model`): `config.json` + `model.safetensors` of a float32 `CLIPModel` with 2-layer text and
      vision towers of width 32, patches of 8 pixels on `image_size`² images and embeddings `[.., projection_dim]`;
    - processor (`with_processor`): [`tiny_clip_tokenizer`] files and a `preprocessor_config.json` resizing the
      shortest edge to `image_size` (bicubic) and center-cropping `image_size`², with OpenAI CLIP's mean/std.

    Returns `path`.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_clip_tokenizer()
    if with_model:
        text_config = {
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": tokenizer.model_max_length,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        vision_config = {
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": 8,
        }
        torch.manual_seed(seed)
        config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=projection_dim)
        CLIPModel(config).float().save_pretrained(path)
    if with_processor:
        tokenizer.save_pretrained(path)
        size = {"shortest_edge": image_size}
        CLIPImageProcessorPil(size=size, crop_size={"height": image_size, "width": image_size}).save_pretrained(path)
    return path


def save_tiny_aesthetic_head(
    path: str | os.PathLike, *, in_features: int = 16, seed: int = 0, safe_serialization: bool = False
) -> Path:
    """Save a random [`AestheticHead`] for CLIP embeddings `[.., in_features]` in the layout of
    `trl-lib/ddpo-aesthetic-predictor`: `aesthetic-model.pth` (a `torch.save`d state dict, as on the Hub) or, with
    `safe_serialization`, `aesthetic-model.safetensors`. Returns the file's path.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    state_dict = AestheticHead(in_features).state_dict()
    if safe_serialization:
        save_file(state_dict, path / "aesthetic-model.safetensors")
        return path / "aesthetic-model.safetensors"
    torch.save(state_dict, path / "aesthetic-model.pth")
    return path / "aesthetic-model.pth"


def cache_tiny_clip_rewards(cache_dir: str | os.PathLike) -> None:
    """Install tiny stand-ins for every default checkpoint of `trl_arcopo.rewards.clip` into a Hub cache.

    `yuvalkirstain/PickScore_v1` (model only) with `laion/CLIP-ViT-H-14-laion2B-s32B-b79K` (processor only),
    `openai/clip-vit-large-patch14` (model and processor), all from [`save_tiny_clip`] (seeds 1, 0 and 5:
    most text-image cosines of the last are positive, so its CLIPScores are not all clamped to 0), and
    `trl-lib/ddpo-aesthetic-predictor` ([`save_tiny_aesthetic_head`], `.pth`). With
    `HF_HUB_OFFLINE=1`, `PickScoreReward.from_pretrained(cache_dir=cache_dir)` and friends then load them.
    """
    with tempfile.TemporaryDirectory() as staging:
        staging = Path(staging)
        pickscore = save_tiny_clip(staging / "pickscore", seed=1, with_processor=False)
        populate_hub_cache("yuvalkirstain/PickScore_v1", pickscore, cache_dir=cache_dir)
        laion = save_tiny_clip(staging / "laion", with_model=False)
        populate_hub_cache("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", laion, cache_dir=cache_dir)
        clip = save_tiny_clip(staging / "clip", seed=5)
        populate_hub_cache("openai/clip-vit-large-patch14", clip, cache_dir=cache_dir)
        head = save_tiny_aesthetic_head(staging / "aesthetic").parent
        populate_hub_cache("trl-lib/ddpo-aesthetic-predictor", head, cache_dir=cache_dir)


class TrainingPhases:
    """Seconds and peak memory of each phase of an :class:`~trl_arcopo.ARCoPOTrainer` run (see
    :func:`record_training_phases`).

    Attributes:
        seconds: ``{phase: seconds}`` spent inside each phase, nested phases excluded.
        peak_bytes: ``{phase: bytes}``, the most memory allocated inside each phase: on CUDA the allocator's
            (``torch.cuda.max_memory_allocated``, everything on the GPU included), elsewhere the tensor storages
            allocated since recording started (:class:`~trl_arcopo.memory.TensorMemoryTracker`).
    """

    def __init__(self, track_memory: bool = True, cuda: bool = False) -> None:
        from .memory import TensorMemoryTracker

        self.seconds: dict[str, float] = defaultdict(float)
        self.peak_bytes: dict[str, int] = {}
        self.cuda = track_memory and cuda
        self.tracker = TensorMemoryTracker() if track_memory and not cuda else None
        self._stack: list[list] = []  # [name, start, time spent in nested phases]

    def _flush_cuda_peak(self) -> None:
        """Attribute the CUDA peak since the last phase boundary to the innermost phase, then start a new one."""
        if self.cuda and self._stack:
            name = self._stack[-1][0]
            self.peak_bytes[name] = max(self.peak_bytes.get(name, 0), torch.cuda.max_memory_allocated())
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._flush_cuda_peak()
        frame = [name, time.perf_counter(), 0.0]
        self._stack.append(frame)
        memory = self.tracker.phase(name) if self.tracker is not None else contextlib.nullcontext()
        try:
            with memory:
                yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self._flush_cuda_peak()
            self._stack.pop()
            elapsed = time.perf_counter() - frame[1]
            self.seconds[name] += elapsed - frame[2]
            if self._stack:
                self._stack[-1][2] += elapsed
            if self.tracker is not None:
                self.peak_bytes = dict(self.tracker.phases)


@contextlib.contextmanager
def record_training_phases(trainer, *, track_memory: bool = True) -> Iterator[TrainingPhases]:
    """Record the phases of ``trainer``'s work inside the block: ``rollout``, ``decode``, ``reward``, ``update``
    (loss, backward, optimizer step), ``save`` (checkpoints) and ``resume`` (loading one).

    For benchmarks and memory tests: the trainer's methods are wrapped on the instance for the block. Off CUDA, tensor
    memory is tracked in the calling thread only: set ``overlap_rewards=False`` to see the rewards.
    """
    from transformers import TrainerCallback

    recorder = TrainingPhases(track_memory, cuda=trainer.accelerator.device.type == "cuda")
    wrapped = {
        (trainer, "_rollout_group"): "rollout",
        (trainer.pipeline, "decode"): "decode",
        (trainer, "_score"): "reward",
        (trainer, "compute_loss"): "update",
        (trainer.accelerator, "backward"): "update",
        (trainer, "_save_checkpoint"): "save",
        (trainer, "_load_from_checkpoint"): "resume",
        (trainer, "_load_optimizer_and_scheduler"): "resume",
    }

    def wrap(function, name):
        @functools.wraps(function)
        def run(*args, **kwargs):
            with recorder.phase(name):
                return function(*args, **kwargs)

        return run

    class OptimizerStep(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.step = recorder.phase("update")
            self.step.__enter__()

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.step.__exit__(None, None, None)

    callback = OptimizerStep()
    for (owner, attribute), name in wrapped.items():
        setattr(owner, attribute, wrap(getattr(owner, attribute), name))
    trainer.add_callback(callback)
    memory = recorder.tracker if recorder.tracker is not None else contextlib.nullcontext()
    try:
        with memory:
            yield recorder
    finally:
        trainer.remove_callback(callback)
        for owner, attribute in wrapped:
            del owner.__dict__[attribute]  # the class's method again

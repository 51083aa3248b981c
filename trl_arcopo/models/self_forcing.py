"""Load original Self-Forcing generator checkpoints into the stock `diffusers.WanTransformer3DModel`.

The released Self-Forcing generator (`gdhe17/Self-Forcing`, `checkpoints/self_forcing_dmd.pt`) is a `torch.save`'d
dict whose `generator` / `generator_ema` entries are state dicts of the original `CausalWanModel`, wrapped as `model.`
by the training code. The causal model has exactly the parameters of the bidirectional Wan2.1-T2V-1.3B network, so
after renaming the keys it loads strictly into `WanTransformer3DModel` (825 tensors for the 1.3B configuration).
Causality is a property of the sampler (chunk-wise KV caching), not of the weights.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import WanTransformer3DModel
from huggingface_hub import hf_hub_download
from safetensors.torch import load_file

logger = logging.getLogger(__name__)

SELF_FORCING_REPO_ID = "gdhe17/Self-Forcing"
SELF_FORCING_FILENAME = "checkpoints/self_forcing_dmd.pt"

WAN_1_3B_CONFIG: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 8960,
    "num_layers": 30,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}
"""`WanTransformer3DModel` keyword arguments of Wan2.1-T2V-1.3B, the architecture of the Self-Forcing generator."""

_TORCH_SUFFIXES = (".pt", ".pth")
_SAFETENSORS_SUFFIX = ".safetensors"

# Path components added by training wrappers: FSDP, activation checkpointing and `torch.compile`. They are removed
# wherever they occur; the `model.` of Self-Forcing's `WanDiffusionWrapper` is removed where it leads the key.
_WRAPPER_COMPONENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})
_LEADING_WRAPPER_COMPONENT = "model"


def _attention_rules(original: str, diffusers: str) -> list[tuple[str, str]]:
    return [
        (rf"^blocks\.(\d+)\.{original}\.(q|k|v)\.", rf"blocks.\1.{diffusers}.to_\2."),
        (rf"^blocks\.(\d+)\.{original}\.o\.", rf"blocks.\1.{diffusers}.to_out.0."),
        (rf"^blocks\.(\d+)\.{original}\.(norm_q|norm_k)\.", rf"blocks.\1.{diffusers}.\2."),
    ]


# (pattern, replacement) pairs, original CausalWanModel name -> diffusers name. Each key is rewritten by the FIRST
# rule whose pattern matches it (and by no other), so the norm2 <-> norm3 swap cannot be applied twice. Keys matching
# no rule keep their name: `patch_embedding.*` is identical in both layouts, anything else is reported by the strict
# load.
_RENAME_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in [
        (r"^text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
        (r"^text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
        (r"^time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
        (r"^time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
        (r"^time_projection\.1\.", "condition_embedder.time_proj."),
        (r"^head\.head\.", "proj_out."),
        (r"^head\.modulation$", "scale_shift_table"),
        (r"^blocks\.(\d+)\.modulation$", r"blocks.\1.scale_shift_table"),
        *_attention_rules("self_attn", "attn1"),
        *_attention_rules("cross_attn", "attn2"),
        # The original's affine cross-attention pre-norm is `norm3`, diffusers calls it `norm2`; the original's FFN
        # pre-norm `norm2` (no tensors) is diffusers' `norm3`.
        (r"^blocks\.(\d+)\.norm3\.", r"blocks.\1.norm2."),
        (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),
        (r"^blocks\.(\d+)\.ffn\.0\.", r"blocks.\1.ffn.net.0.proj."),
        (r"^blocks\.(\d+)\.ffn\.2\.", r"blocks.\1.ffn.net.2."),
    ]
)

_REQUIRED_ORIGINAL_KEYS = (
    "patch_size",
    "in_dim",
    "dim",
    "ffn_dim",
    "freq_dim",
    "text_dim",
    "out_dim",
    "num_heads",
    "num_layers",
    "qk_norm",
    "cross_attn_norm",
    "eps",
)


def wan_config_from_original(original: Mapping[str, Any]) -> dict[str, Any]:
    """Translate `CausalWanModel` constructor arguments into `WanTransformer3DModel` keyword arguments.

    Args:
        original: the original model's arguments (`patch_size`, `in_dim`, `dim`, `ffn_dim`, `freq_dim`, `text_dim`,
            `out_dim`, `num_heads`, `num_layers`, `qk_norm`, `cross_attn_norm`, `eps`, optionally `model_type`).
            Sampler-side entries (`text_len`, `local_attn_size`, `sink_size`, `tokens_per_frame`) are ignored.

    Returns:
        A dict with the same keys as [`WAN_1_3B_CONFIG`], e.g. `attention_head_dim = dim // num_heads`.

    Raises:
        ValueError: if a required key is missing, `dim` is not divisible by `num_heads` or `model_type` is not `"t2v"`.

    Example:
        ```python
        >>> import json
        >>> config = wan_config_from_original(json.load(open("model_config.json")))
        >>> model = WanTransformer3DModel(**config)
        ```
    """
    missing = [key for key in _REQUIRED_ORIGINAL_KEYS if key not in original]
    if missing:
        raise ValueError(f"Original Self-Forcing model config is missing required key(s) {missing}.")
    model_type = original.get("model_type", "t2v")
    if model_type != "t2v":
        raise ValueError(f"Only text-to-video checkpoints are supported, got model_type={model_type!r}.")
    dim, num_heads = int(original["dim"]), int(original["num_heads"])
    if num_heads <= 0 or dim % num_heads != 0:
        raise ValueError(f"Original config key 'dim' ({dim}) must be divisible by 'num_heads' ({num_heads}).")
    return {
        "patch_size": tuple(int(p) for p in original["patch_size"]),
        "num_attention_heads": num_heads,
        "attention_head_dim": dim // num_heads,
        "in_channels": int(original["in_dim"]),
        "out_channels": int(original["out_dim"]),
        "text_dim": int(original["text_dim"]),
        "freq_dim": int(original["freq_dim"]),
        "ffn_dim": int(original["ffn_dim"]),
        "num_layers": int(original["num_layers"]),
        "cross_attn_norm": bool(original["cross_attn_norm"]),
        "qk_norm": "rms_norm_across_heads" if original["qk_norm"] else None,
        "eps": float(original["eps"]),
        "rope_max_seq_len": 1024,
    }


def _strip_wrappers(key: str) -> str:
    components = [c for c in key.split(".") if c not in _WRAPPER_COMPONENTS]
    while components and components[0] == _LEADING_WRAPPER_COMPONENT:
        components.pop(0)
    return ".".join(components)


def _rename(key: str) -> str:
    for pattern, replacement in _RENAME_RULES:
        if pattern.match(key):
            return pattern.sub(replacement, key, count=1)
    return key


def convert_self_forcing_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an original Self-Forcing / CausalWanModel state dict to `WanTransformer3DModel` names.

    Wrapper prefixes (`model.`, `_fsdp_wrapped_module.`, `_orig_mod.`, `_checkpoint_wrapped_module.`) are removed, then
    every key is renamed by `_RENAME_RULES` (e.g. `blocks.0.self_attn.q.weight` ->
    `blocks.0.attn1.to_q.weight`, `blocks.0.norm3.weight` -> `blocks.0.norm2.weight`, `head.head.weight` ->
    `proj_out.weight`). Tensors are neither copied nor reshaped (e.g. `blocks.N.modulation` [1, 6, dim] becomes
    `blocks.N.scale_shift_table` [1, 6, dim]). Keys matching no rule keep their (stripped) name, so a strict load
    reports them as unexpected.

    Args:
        state_dict: original-layout tensors, e.g. `checkpoint["generator_ema"]`.

    Returns:
        A new dict with diffusers names and the same tensor objects.

    Raises:
        ValueError: if two original keys map to the same diffusers key.

    Example:
        ```python
        >>> checkpoint = torch.load("self_forcing_dmd.pt", map_location="cpu", weights_only=True)
        >>> converted = convert_self_forcing_state_dict(checkpoint["generator_ema"])
        >>> WanTransformer3DModel(**WAN_1_3B_CONFIG).load_state_dict(converted, strict=True)
        ```
    """
    converted: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    for key, tensor in state_dict.items():
        new_key = _rename(_strip_wrappers(key))
        if new_key in converted:
            raise ValueError(f"Checkpoint keys {sources[new_key]!r} and {key!r} both map to {new_key!r}.")
        converted[new_key] = tensor
        sources[new_key] = key
    return converted


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _select_generator(checkpoint: Any, use_ema: bool, path: Path) -> Mapping[str, torch.Tensor]:
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"Expected a dict in {path}, got {type(checkpoint).__name__}.")
    wanted, other = ("generator_ema", "generator") if use_ema else ("generator", "generator_ema")
    if wanted in checkpoint:
        return checkpoint[wanted]
    if other in checkpoint:
        logger.warning("Checkpoint %s has no %r entry; loading %r instead.", path, wanted, other)
        return checkpoint[other]
    if _is_state_dict(checkpoint):
        return checkpoint
    raise ValueError(
        f"Checkpoint {path} has neither a 'generator_ema' nor a 'generator' entry and is not a bare state dict; "
        f"top-level keys: {sorted(map(str, checkpoint))}."
    )


def _read_torch_checkpoint(path: Path) -> Any:
    try:
        # Memory-map zip-format files: only the selected generator is ever read from disk.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} contains non-tensor pickled objects and is refused for security: it is only read with "
            "torch.load(weights_only=True). If you trust the file, convert it once to safetensors (e.g. "
            "safetensors.torch.save_file(torch.load(path, weights_only=False)['generator_ema'], 'gen.safetensors')) "
            f"and load that instead. Original error: {error}"
        ) from error


def _resolve_checkpoint(
    checkpoint: str | os.PathLike,
    *,
    filename: str,
    revision: str | None,
    cache_dir: str | os.PathLike | None,
    token: str | bool | None,
) -> Path:
    path = Path(checkpoint)
    if path.exists():
        return path
    if isinstance(checkpoint, os.PathLike) or path.suffix in (*_TORCH_SUFFIXES, _SAFETENSORS_SUFFIX):
        raise FileNotFoundError(f"Checkpoint file {path} does not exist.")
    return Path(hf_hub_download(str(checkpoint), filename, revision=revision, cache_dir=cache_dir, token=token))


def _check_keys(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> None:
    expected = model.state_dict()
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    mismatched = sorted(
        f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in expected.keys() & state_dict.keys()
        if state_dict[key].shape != expected[key].shape
    )
    if not (missing or unexpected or mismatched):
        return
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", mismatched)):
        if keys:
            more = f" ... (+{len(keys) - 20} more)" if len(keys) > 20 else ""
            problems.append(f"{len(keys)} {label} key(s): {keys[:20]}{more}")
    raise ValueError(
        "The converted Self-Forcing checkpoint does not match WanTransformer3DModel("
        f"{json.dumps(dict(config), default=str)}): " + "; ".join(problems) + ". Pass the matching `config` "
        "(see `wan_config_from_original`)."
    )


def keeps_fp32(name: str) -> bool:
    """Whether state-dict entry ``name`` belongs to a module diffusers keeps in float32 (rope, time_embedder,
    scale_shift_table, norm1/2/3) whatever the model's dtype."""
    keep = WanTransformer3DModel._keep_in_fp32_modules or []
    return any(module in name.split(".") for module in keep)


def cast_transformer(model: WanTransformer3DModel, dtype: torch.dtype) -> WanTransformer3DModel:
    """Cast a ``WanTransformer3DModel``'s parameters to ``dtype`` in place as ``from_pretrained(dtype=...)`` does:
    the fp32-sensitive modules stay float32 (``model.to(bfloat16)`` would cast them too)."""
    for name, parameter in model.named_parameters():
        parameter.data = parameter.data.to(torch.float32 if keeps_fp32(name) else dtype)
    return model


def load_self_forcing_transformer(
    checkpoint: str | os.PathLike = SELF_FORCING_REPO_ID,
    *,
    config: Mapping[str, Any] | None = None,
    use_ema: bool = True,
    dtype: torch.dtype | None = None,
    filename: str = SELF_FORCING_FILENAME,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
) -> WanTransformer3DModel:
    """Build a `WanTransformer3DModel` holding the weights of an original Self-Forcing generator checkpoint.

    Args:
        checkpoint: one of
            - a local `.pt` / `.pth` file (a dict with `generator_ema` / `generator` state dicts, or a bare state
              dict); it is read with `torch.load(weights_only=True)` only;
            - a local `.safetensors` file holding one flat original-layout state dict (keys may start with `model.`);
            - a local directory in diffusers format (`config.json` + `diffusion_pytorch_model.safetensors`, as written
              by `transformer.save_pretrained`), loaded with `WanTransformer3DModel.from_pretrained` (no conversion;
              `config` and `use_ema` are not used);
            - otherwise a Hub repo id, from which `filename` is fetched with `huggingface_hub.hf_hub_download`.
        config: `WanTransformer3DModel` keyword arguments; defaults to [`WAN_1_3B_CONFIG`]. Use
            [`wan_config_from_original`] for checkpoints of other sizes.
        use_ema: load `generator_ema` (the released inference weights) rather than `generator` (`.pt` / `.pth` only).
            If only the other entry exists it is used with a warning.
        dtype: floating dtype of the parameters (default `torch.float32`). Modules listed in
            `WanTransformer3DModel._keep_in_fp32_modules` (rope, time_embedder, scale_shift_table, norm1/2/3) stay in
            float32, as with `from_pretrained(dtype=...)`; never `.to(bfloat16)` the whole model instead.
        filename: file inside the Hub repo (Hub ids only).
        revision: Hub revision (branch, tag or commit hash).
        cache_dir: Hub cache directory (default: the huggingface_hub cache).
        token: Hub token.

    Returns:
        The transformer in eval mode, on CPU. For the 1.3B config it has 825 state-dict tensors (1.419 B parameters).

    Raises:
        ValueError: if the file holds non-tensor pickled objects, has no generator entry, or its keys/shapes do not
            match the config (the message lists the missing / unexpected keys and the config used).
        FileNotFoundError: if a local checkpoint path does not exist.

    Example:
        ```python
        >>> import torch
        >>> from trl_arcopo.models.self_forcing import load_self_forcing_transformer
        >>> transformer = load_self_forcing_transformer(dtype=torch.bfloat16)  # gdhe17/Self-Forcing, generator_ema
        >>> transformer.blocks[0].attn1.to_q.weight.dtype, transformer.scale_shift_table.dtype
        (torch.bfloat16, torch.float32)
        ```
    """
    dtype = torch.float32 if dtype is None else dtype
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point dtype, got {dtype}.")
    path = _resolve_checkpoint(checkpoint, filename=filename, revision=revision, cache_dir=cache_dir, token=token)

    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"Directory {path} is not a diffusers transformer folder (no config.json).")
        if config is not None:
            logger.warning("Ignoring `config`: %s is loaded with its own config.json.", path)
        return WanTransformer3DModel.from_pretrained(path, dtype=dtype).eval()

    if path.suffix == _SAFETENSORS_SUFFIX:
        original = load_file(path, device="cpu")
    elif path.suffix in _TORCH_SUFFIXES:
        original = _select_generator(_read_torch_checkpoint(path), use_ema, path)
    else:
        raise ValueError(f"Unsupported checkpoint file {path}: expected .pt, .pth or .safetensors.")
    state_dict = convert_self_forcing_state_dict(original)
    del original

    config = dict(WAN_1_3B_CONFIG if config is None else config)
    # Parameters are created on the meta device (no random init, no second copy); buffers (the RoPE tables, which are
    # not in the state dict) are computed on CPU as usual.
    with init_empty_weights(include_buffers=False):
        model = WanTransformer3DModel(**config)
    _check_keys(model, state_dict, config)

    # Copy each tensor into the target dtype (float32 for the fp32-kept modules) so that parameters own their memory
    # (never a memory-mapped file), popping as we go to keep at most one extra tensor alive; `assign=True` then adopts
    # the tensors as the parameters.
    for key in list(state_dict):
        tensor = state_dict.pop(key)
        state_dict[key] = tensor.to(dtype=torch.float32 if keeps_fp32(key) else dtype, copy=True)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()

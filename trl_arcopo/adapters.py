"""Combine the two AR-CoPO adapters at inference: activate, export, fuse and push ``W = W0 + ΔW_semi + s·ΔW_on``.

AR-CoPO trains two LoRA adapters from the same base weights, ``"semi"`` (semi-on-policy: quality) and
``"on_policy"`` (exploration: reward gain), and merges them at inference with a scale on the on-policy one
(docs/method.md §8). Everything here works on adapters loaded into a pipeline with diffusers' LoRA machinery::

    pipe.load_lora_weights("semi-lora", adapter_name="semi")
    pipe.load_lora_weights("on-policy-lora", adapter_name="on_policy")
    merge_adapters(pipe, {"semi": 1.0, "on_policy": 0.8})  # activate the combination (nothing is copied)
    save_merged_lora(pipe, {"semi": 1.0, "on_policy": 0.8}, "merged-lora")  # one LoRA file, exact
    fuse_adapters(pipe, {"semi": 1.0, "on_policy": 0.8})  # bake it into the weights, then pipe.save_pretrained(...)
"""

from __future__ import annotations

import math
import numbers
import os
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from huggingface_hub import ModelCard, ModelCardData, create_repo, upload_folder
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

from .pipelines.causal_wan import pipeline_source

__all__ = [
    "fuse_adapters",
    "merge_adapters",
    "merged_lora_state_dict",
    "push_folder_to_hub",
    "save_fused",
    "save_merged_lora",
]

_MODEL_CARD = """\
---
{{ card_data }}
---

# {{ repo_id }}

{% if fused %}The {{ fused }} of the causal video generator {{ base_model_name }} with {{ num_adapters }} AR-CoPO adapters
fused into its weights, `W = W0 + {{ formula }}`:
{% else %}One LoRA for the causal video generator {{ base_model_name }} that is exactly the weighted combination of
{{ num_adapters }} AR-CoPO adapters, `W = W0 + {{ formula }}`:
{% endif %}
| adapter | scale | rank | source |
|---|---|---|---|
{{ adapter_rows }}
{% if not fused %}
The adapters' `A` matrices are stacked and their scaled `B` matrices concatenated, so the file is a rank
{{ rank }} LoRA (scaling 1) whose update is `Σ_k s_k·ΔW_k` to float precision, not an approximation.

## Quick start

```python
{{ load_code }}

pipe.load_lora_weights("{{ lora_source }}")
video = pipe("A corgi surfing a wave at sunset").frames[0]
```
{% endif %}"""


def _lora_layers(pipe: DiffusionPipeline) -> Iterator[tuple[str, LoraLayer]]:
    for name, module in pipe.transformer.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def _check_weights(pipe: DiffusionPipeline, weights: Mapping[str, float]) -> dict[str, float]:
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError(
            f"`weights` must be a non-empty dict {{adapter_name: scale}}, e.g. {{'semi': 1.0, 'on_policy': 0.8}}; "
            f"got {weights!r}."
        )
    loaded = pipe.get_list_adapters().get("transformer", [])
    unknown = [name for name in weights if name not in loaded]
    if unknown:
        raise ValueError(
            f"Unknown adapter(s) {unknown} in `weights`: the pipeline has {loaded or 'no adapters'}. Load one with "
            "`pipe.load_lora_weights(path, adapter_name=...)`."
        )
    for name, scale in weights.items():
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale < 0:
            raise ValueError(f"`weights[{name!r}]` must be a finite scale >= 0, got {scale!r}.")
    fused = sorted({adapter for _, layer in _lora_layers(pipe) for adapter in layer.merged_adapters})
    if fused:
        raise ValueError(
            f"Adapter(s) {fused} are fused into the weights; call `pipe.unfuse_lora()` before combining adapters."
        )
    return {name: float(scale) for name, scale in weights.items()}


def merge_adapters(pipe: DiffusionPipeline, weights: Mapping[str, float]) -> None:
    """Activate the weighted combination ``W = W0 + Σ_k s_k·ΔW_k`` of loaded LoRA adapters for inference.

    Uses diffusers' ``set_adapters`` (each adapter's LoRA scaling becomes ``s_k·alpha_k/r_k``); adapters not named in
    ``weights`` are deactivated, nothing is copied, and the setting stays until the next call. LoRA layers disabled
    with ``pipe.disable_lora()`` are enabled again.

    Args:
        pipe: a pipeline with a LoRA-loadable ``transformer`` (e.g. :class:`~trl_arcopo.CausalWanPipeline`).
        weights: ``{adapter_name: scale}``, e.g. ``{"semi": 1.0, "on_policy": 0.8}`` for ``ΔW_semi + 0.8·ΔW_on``.

    Raises:
        ValueError: unknown adapter names (the message lists the loaded ones), negative or non-finite scales, or
            adapters currently fused into the weights.
    """
    weights = _check_weights(pipe, weights)
    pipe.enable_lora()
    pipe.set_adapters(list(weights), list(weights.values()))


def merged_lora_state_dict(
    pipe: DiffusionPipeline, weights: Mapping[str, float]
) -> tuple[dict[str, torch.Tensor], dict]:
    """The combination ``Σ_k s_k·ΔW_k`` as one LoRA: its transformer state dict and LoRA config.

    ``Σ_k s_k·c_k·B_k A_k`` (``c_k`` the adapter's ``alpha/r`` scaling) equals ``B A`` with ``A = [A_1; A_2; ...]``
    ``[Σ r_k, in]`` and ``B = [s_1 c_1 B_1, s_2 c_2 B_2, ...]`` ``[out, Σ r_k]``: a LoRA of rank ``Σ r_k`` and scaling
    1, exact up to float rounding (PEFT's ``add_weighted_adapter(combination_type="cat")`` does the same in a
    ``PeftModel``). A layer that only some adapters target gets the rank of those; adapters with scale 0 are left out.
    The combination is activated on ``pipe`` as by :func:`merge_adapters`.

    Returns:
        ``(state_dict, lora_config)``: keys ``"{module}.lora_A.weight"`` / ``"{module}.lora_B.weight"`` (float32 CPU
        tensors, as ``peft.get_peft_model_state_dict`` names them) and ``LoraConfig.to_dict()`` for
        ``save_lora_weights(..., transformer_lora_adapter_metadata=...)``, with per-layer ranks in ``rank_pattern``.

    Raises:
        ValueError: as :func:`merge_adapters`; all scales zero; DoRA or LoRA-bias adapters (not a stackable LoRA).
    """
    merge_adapters(pipe, weights)
    names = [name for name, scale in weights.items() if scale != 0]
    if not names:
        raise ValueError(f"All scales in `weights` are 0 ({dict(weights)}): the combination is the base model.")
    state_dict: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for module_name, layer in _lora_layers(pipe):
        present = [name for name in names if name in layer.lora_A]
        if not present:
            continue
        for name in present:
            if layer.use_dora.get(name) or layer.lora_bias.get(name):
                raise ValueError(
                    f"Adapter {name!r} uses DoRA or a LoRA bias on {module_name}; only plain LoRA adapters can be "
                    "exported as one LoRA. Use `fuse_adapters` instead."
                )
        # After `merge_adapters`, `layer.scaling[name]` is s_k·alpha_k/r_k (or /sqrt(r_k) for rsLoRA). Exported in
        # float32 so that scaling B adds no rounding of a low-precision dtype.
        lora_a = torch.cat([layer.lora_A[name].weight.float() for name in present], dim=0)
        lora_b = torch.cat([layer.lora_B[name].weight.float() * layer.scaling[name] for name in present], dim=1)
        state_dict[f"{module_name}.lora_A.weight"] = lora_a.detach().cpu().contiguous()
        state_dict[f"{module_name}.lora_B.weight"] = lora_b.detach().cpu().contiguous()
        ranks[module_name] = lora_a.shape[0]
    rank = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {module: r for module, r in ranks.items() if r != rank}
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=sorted(ranks),
        rank_pattern=pattern,
        alpha_pattern=pattern,  # alpha == rank everywhere: scaling 1, the scales are inside B
    )
    return state_dict, config.to_dict()


def save_merged_lora(
    pipe: DiffusionPipeline,
    weights: Mapping[str, float],
    save_directory: str | os.PathLike,
    *,
    adapter_sources: Mapping[str, str] | None = None,
    repo_id: str | None = None,
) -> Path:
    """Export the combination of :func:`merged_lora_state_dict` as one diffusers LoRA folder.

    Writes ``pytorch_lora_weights.safetensors`` (with the LoRA config as adapter metadata, so
    ``pipe.load_lora_weights(save_directory)`` rebuilds the same ranks and scaling) and a ``README.md`` model card
    listing the adapters, their scales, ranks and ``adapter_sources``.

    Args:
        pipe: pipeline with the adapters loaded.
        weights: ``{adapter_name: scale}`` as in :func:`merge_adapters`.
        save_directory: output folder (created).
        adapter_sources: ``{adapter_name: path or Hub id}`` the adapters were loaded from, for the model card.
        repo_id: the Hub repo the folder is meant for (model card title and quick start); default: the folder name.

    Returns:
        ``save_directory`` as a ``Path``.
    """
    state_dict, config = merged_lora_state_dict(pipe, weights)
    save_directory = Path(save_directory)
    type(pipe).save_lora_weights(
        save_directory, transformer_lora_layers=state_dict, transformer_lora_adapter_metadata=config
    )
    rank = f"{config['r']} (per-layer ranks in the adapter metadata)" if config["rank_pattern"] else config["r"]
    _write_model_card(pipe, weights, save_directory, adapter_sources, repo_id, rank=rank)
    return save_directory


def _write_model_card(
    pipe: DiffusionPipeline,
    weights: Mapping[str, float],
    save_directory: Path,
    adapter_sources: Mapping[str, str] | None,
    repo_id: str | None,
    *,
    rank: str | int | None = None,
    fused: str | None = None,
) -> None:
    """``save_directory/README.md`` for an exported combination (``rank`` of the LoRA) or a fused ``fused``
    component; call it while the adapters are still loaded (their ranks go into the card)."""
    source = pipeline_source(pipe)
    sources = dict(adapter_sources or {})
    adapter_ranks = {
        name: sorted({layer.r[name] for _, layer in _lora_layers(pipe) if name in layer.r}) for name in weights
    }
    rows = "\n".join(
        f"| `{name}` | {scale:g} | {', '.join(map(str, adapter_ranks[name]))} | {sources.get(name, 'n/a')} |"
        for name, scale in weights.items()
    )
    card_data = ModelCardData(
        base_model=source.hub_id,
        library_name="diffusers",
        pipeline_tag="text-to-video",
        tags=["arcopo", "diffusers", "text-to-video", "trl", *(["fused-lora"] if fused else ["lora", "merged-lora"])],
        merged_adapters={name: float(scale) for name, scale in weights.items()},
    )
    card = ModelCard.from_template(
        card_data,
        template_str=_MODEL_CARD,
        repo_id=repo_id or save_directory.name,
        base_model_name=source.name,
        load_code=source.code,
        lora_source=repo_id or str(save_directory),
        num_adapters=len(weights),
        formula=" + ".join(f"{scale:g}·ΔW_{name}" for name, scale in weights.items()),
        adapter_rows=rows,
        rank=rank,
        fused=fused,
    )
    card.save(save_directory / "README.md")


def save_fused(
    pipe: DiffusionPipeline,
    weights: Mapping[str, float],
    save_directory: str | os.PathLike,
    *,
    component: str = "pipeline",
    adapter_sources: Mapping[str, str] | None = None,
    repo_id: str | None = None,
) -> Path:
    """Fuse the combination into the weights (:func:`fuse_adapters`) and save the ``"pipeline"`` or only its
    ``"transformer"`` with ``save_pretrained``, plus a ``README.md`` model card naming the adapters and scales.

    Returns:
        ``save_directory`` as a ``Path``.
    """
    if component not in ("pipeline", "transformer"):
        raise ValueError(f"`component` must be 'pipeline' or 'transformer', got {component!r}.")
    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    _write_model_card(pipe, weights, save_directory, adapter_sources, repo_id, fused=component)
    fuse_adapters(pipe, weights)
    (pipe if component == "pipeline" else pipe.transformer).save_pretrained(save_directory)
    return save_directory


def fuse_adapters(pipe: DiffusionPipeline, weights: Mapping[str, float], *, unload: bool = True) -> None:
    """Add ``Σ_k s_k·ΔW_k`` into the transformer's weights in place (diffusers' ``fuse_lora``).

    With ``unload`` the LoRA layers are removed afterwards, leaving a plain transformer whose ``save_pretrained``
    (or the pipeline's) writes the fused weights; without it, ``pipe.unfuse_lora()`` subtracts them again.

    Raises:
        ValueError: as :func:`merge_adapters`.
    """
    merge_adapters(pipe, weights)
    pipe.fuse_lora(components=["transformer"], adapter_names=list(weights))
    if unload:
        pipe.unload_lora_weights()


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload merged AR-CoPO LoRA",
) -> str:
    """Create the model repo ``repo_id`` if needed and upload ``folder`` (an exported LoRA or a fused pipeline).

    ``token`` defaults to the logged-in token (``hf auth login`` / ``HF_TOKEN``); it is never logged or written.
    Returns the URL of the commit.
    """
    repo = create_repo(repo_id, token=token, private=private, exist_ok=True)
    commit = upload_folder(repo_id=repo.repo_id, folder_path=folder, token=token, commit_message=commit_message)
    return commit.commit_url

"""The trained toy generator shipped inside the package, loaded as an ordinary ``CausalWanPipeline`` folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..pipelines.causal_wan import CausalWanPipeline, PipelineSource

__all__ = ["TOY_PIPELINE_DIR", "load_toy_pipeline"]

# A `save_pretrained` folder (model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/) + README.md.
TOY_PIPELINE_DIR = Path(__file__).resolve().parent / "weights"


def load_toy_pipeline(
    device: str | torch.device | None = None, dtype: torch.dtype | None = None, **pipeline_config: Any
) -> CausalWanPipeline:
    """The trained toy-world generator: 12 frames of 32x32 pixels from 4 chunks of the 4-step Self-Forcing sampler.

    It loads through ``CausalWanPipeline.from_pretrained`` (the same path as a Hub pipeline), from the package.

    Args:
        device: where to put it (default: CPU).
        dtype: dtype of its components (default: float32, the dtype it was trained in).
        pipeline_config: pipeline config overrides, as for ``CausalWanPipeline.from_pretrained`` (``local_attn_size``,
            ``sink_size``, ...).

    Example:
        ```python
        >>> from trl_arcopo.toy import load_toy_pipeline
        >>> pipe = load_toy_pipeline()
        >>> video = pipe("a red circle moving left", num_frames=12, height=32, width=32, output_type="pt").frames
        ```
    """
    if not (TOY_PIPELINE_DIR / "model_index.json").is_file():
        raise FileNotFoundError(
            f"The toy pipeline's weights are missing from {TOY_PIPELINE_DIR}: reinstall trl_arcopo, or retrain them "
            "with `trl-arcopo toy-train` and copy its `pipeline` folder there."
        )
    pipe = CausalWanPipeline.from_pretrained(str(TOY_PIPELINE_DIR), dtype=dtype or torch.float32, **pipeline_config)
    # Model cards name the package's loader rather than the install path of the folder.
    pipe.source = PipelineSource(
        "the toy-world generator shipped with trl_arcopo (`trl_arcopo.toy.load_toy_pipeline()`)",
        None,
        "from trl_arcopo.toy import load_toy_pipeline\n\npipe = load_toy_pipeline()",
    )
    return pipe.to(device) if device is not None else pipe

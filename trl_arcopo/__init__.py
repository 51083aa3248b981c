"""trl_arcopo: align streaming autoregressive video generators with AR-CoPO, the TRL way."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0.dev0"

# Public names and the module that defines them; modules are imported on first access (diffusers is heavy).
_LAZY_EXPORTS = {
    "ARCoPOConfig": "trl_arcopo.arcopo_config",
    "ARCoPOTrainer": "trl_arcopo.arcopo_trainer",
    "CausalWanPipeline": "trl_arcopo.pipelines.causal_wan",
    "CausalWanPipelineOutput": "trl_arcopo.pipelines.causal_wan",
    "merge_adapters": "trl_arcopo.adapters",
    "sweep_merge_scale": "trl_arcopo.sweep",
}

__all__ = sorted(_LAZY_EXPORTS)

if TYPE_CHECKING:
    from .adapters import merge_adapters
    from .arcopo_config import ARCoPOConfig
    from .arcopo_trainer import ARCoPOTrainer
    from .pipelines.causal_wan import CausalWanPipeline, CausalWanPipelineOutput
    from .sweep import sweep_merge_scale


def __getattr__(name: str):
    if name in _LAZY_EXPORTS:
        return getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
    raise AttributeError(f"module 'trl_arcopo' has no attribute {name!r}")

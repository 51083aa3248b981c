"""Model-level pieces: causal attention with a KV cache on Wan, and Self-Forcing weight loading."""

from .kv_cache import CausalAttentionRuntime, KVCache, block_causal_mask, enable_causal_attention
from .self_forcing import load_self_forcing_transformer, wan_config_from_original

__all__ = [
    "CausalAttentionRuntime",
    "KVCache",
    "block_causal_mask",
    "enable_causal_attention",
    "load_self_forcing_transformer",
    "wan_config_from_original",
]

"""The toy world's text side: a word-level tokenizer over the caption vocabulary and a small umT5 encoder.

Both are the stock classes the real pipeline loads (``PreTrainedTokenizerFast`` saved as ``tokenizer/``,
``transformers.UMT5EncoderModel`` saved as ``text_encoder/``), so ``CausalWanPipeline.from_pretrained`` loads the toy
pipeline through the same code path as Wan2.1's.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from .world import vocabulary

__all__ = ["SPECIAL_TOKENS", "toy_text_encoder", "toy_tokenizer"]

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2, as in the umT5 tokenizer


def toy_tokenizer(max_length: int = 32) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer over :func:`~trl_arcopo.toy.world.vocabulary` (``</s>`` appended)."""
    vocab = {word: index for index, word in enumerate([*SPECIAL_TOKENS, *vocabulary()])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_length
    )


def toy_text_encoder(d_model: int = 64, num_layers: int = 2) -> UMT5EncoderModel:
    """A small random umT5 encoder whose vocabulary covers :func:`toy_tokenizer` (trained with the generator)."""
    config = UMT5Config(
        vocab_size=len(SPECIAL_TOKENS) + len(vocabulary()),
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=2 * d_model,
        num_layers=num_layers,
        num_heads=4,
        relative_attention_num_buckets=16,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return UMT5EncoderModel(config)

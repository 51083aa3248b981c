"""Redaction of secrets (Hub tokens, API keys, passwords) in arguments before they are written or logged."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = ["REDACTED", "is_secret_key", "redact_secrets"]

REDACTED = "<redacted>"

# The words of a key (split at `_`, `-`, `.` and camelCase) that mark its value as a secret. `tokens` (max_tokens)
# and `tokenizer` are not secrets, `hub_token`, `access_token`, `api_key` and `secret_key` are.
_SECRET_WORDS = {"token", "password", "passwd", "secret", "apikey", "credential", "credentials", "authorization"}
_WORD_SPLIT = re.compile(r"[_\-.\s]+|(?<=[a-z0-9])(?=[A-Z])")
# Values that are Hub access tokens wherever they appear (e.g. pasted into a free-form string).
_HUB_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{30,}\b")


def is_secret_key(key: str) -> bool:
    """Whether the value of the argument ``key`` is a secret: a word of it is ``token``, ``password``, ``secret``,
    ``credential(s)``, ``authorization``, or it ends with ``api_key`` (``hub_token``, ``HF_TOKEN``, ``apiKey``, ``db_password``)."""
    words = [word.lower() for word in _WORD_SPLIT.split(key) if word]
    return bool(_SECRET_WORDS.intersection(words)) or "".join(words[-2:]) == "apikey"


def redact_secrets(value: Any) -> Any:
    """A copy of ``value`` (nested dicts, lists and tuples) where the non-empty string values of secret keys
    (:func:`is_secret_key`) and Hub tokens (``hf_...``) inside strings are replaced by ``"<redacted>"``.

    Call it on whatever arguments are written to disk, pushed to the Hub or logged.

    >>> redact_secrets({"model_init_kwargs": {"token": "hf_abc", "dtype": "bfloat16"}, "max_tokens": 8})
    {'model_init_kwargs': {'token': '<redacted>', 'dtype': 'bfloat16'}, 'max_tokens': 8}
    """
    if isinstance(value, Mapping):
        return {key: REDACTED if _is_secret_item(key, item) else redact_secrets(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_secrets(item) for item in value)
    if isinstance(value, str):
        return _HUB_TOKEN.sub(REDACTED, value)
    return value


def _is_secret_item(key: Any, value: Any) -> bool:
    return isinstance(key, str) and isinstance(value, str) and bool(value) and is_secret_key(key)

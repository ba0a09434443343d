"""Token ids for OpenAI token strings, only where they can be known offline.

OpenAI returns token *strings*. The id of a string is known when the model's
tiktoken encoding is on this machine already (tiktoken's cache, or
``TIKTOKEN_CACHE_DIR``); tiktoken would otherwise download it, and workers must
not reach the internet to guess. Without the encoding the id is stored as NULL,
never made up.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Sequence
from functools import cache
from typing import Protocol

log = logging.getLogger(__name__)

#: Where tiktoken downloads each encoding from (tiktoken_ext/openai_public.py); the
#: cache file is named by the sha1 of this URL.
_ENCODING_URLS = {
    "r50k_base": "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken",
    "p50k_base": "https://openaipublic.blob.core.windows.net/encodings/p50k_base.tiktoken",
    "p50k_edit": "https://openaipublic.blob.core.windows.net/encodings/p50k_base.tiktoken",
    "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
    "o200k_base": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
}


class SingleTokenEncoder(Protocol):
    def encode_single_token(self, text_or_bytes: str | bytes) -> int: ...


def _tiktoken_cache_dir() -> str:
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return os.environ["TIKTOKEN_CACHE_DIR"]
    if "DATA_GYM_CACHE_DIR" in os.environ:
        return os.environ["DATA_GYM_CACHE_DIR"]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def encoding_available_offline(name: str) -> bool:
    """Whether tiktoken can build encoding ``name`` without a download."""
    url = _ENCODING_URLS.get(name)
    cache_dir = _tiktoken_cache_dir()
    if url is None or not cache_dir:
        return False
    return os.path.exists(os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest()))


@cache
def offline_encoding(model: str) -> SingleTokenEncoder | None:
    """The tiktoken encoding of ``model`` if it is available offline, else None."""
    try:
        import tiktoken

        name = tiktoken.encoding_name_for_model(model)
    except (ImportError, KeyError):
        return None
    if not encoding_available_offline(name):
        log.info("tiktoken encoding %s of %s is not cached here; token ids stay NULL",
                 name, model)
        return None
    try:
        return tiktoken.get_encoding(name)
    except Exception as exc:  # a corrupt cache would trigger a download: give up instead
        log.warning("could not load tiktoken encoding %s: %s", name, exc)
        return None


def token_bytes(token: str, raw: Sequence[int] | None = None) -> bytes:
    """The bytes of an OpenAI token string.

    Chat completions give the bytes (``raw``). Legacy completions spell a token
    that is not valid UTF-8 on its own as ``"bytes:\\xe2\\x80"``.
    """
    if raw is not None:
        return bytes(raw)
    if token.startswith("bytes:"):
        return token[len("bytes:"):].encode("latin-1").decode("unicode_escape").encode("latin-1")
    return token.encode("utf-8")


def token_id(encoding: SingleTokenEncoder | None, token: str,
             raw: Sequence[int] | None = None) -> int | None:
    """The id of ``token`` in ``encoding``; None without an encoding or when not one token."""
    if encoding is None:
        return None
    try:
        return encoding.encode_single_token(token_bytes(token, raw))
    except (KeyError, ValueError, UnicodeError):
        return None

"""Settings read from the environment (``LOGPROBE_*``), with an embedded default.

With no URLs set, logprobe keeps everything under ``LOGPROBE_HOME``
(default ``~/.logprobe``): a SQLite file and an embedded Redis server.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .constants import (
    DEFAULT_MAX_LOGITS_BYTES,
    ENV_ARTIFACTS_URL,
    ENV_DATABASE_URL,
    ENV_HOME,
    ENV_MAX_LOGITS_BYTES,
    ENV_REDIS_URL,
)
from .errors import ConfigError


def _default_home() -> Path:
    return _absolute_home(os.environ.get(ENV_HOME) or Path.home() / ".logprobe")


def _absolute_home(home: object) -> Path:
    """``LOGPROBE_HOME`` made absolute: a client and a worker started in different
    directories must find the same SQLite file and embedded Redis."""
    return Path(str(home)).expanduser().absolute()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number of bytes") from None


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Where the broker and the database are. ``None`` URLs mean the embedded default."""

    redis_url: str | None = None
    database_url: str | None = None
    home: Path = field(default_factory=_default_home)
    #: Artifact store (uploaded embeddings, full logits): a directory or an fsspec URL;
    #: None = ``home/artifacts``.
    artifacts_url: str | None = None
    #: The largest full-logits artifact one job may write (checked at submit and in the worker).
    max_logits_bytes: int = DEFAULT_MAX_LOGITS_BYTES

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        values: dict[str, object] = {
            "redis_url": os.environ.get(ENV_REDIS_URL) or None,
            "database_url": os.environ.get(ENV_DATABASE_URL) or None,
            "home": _default_home(),
            "artifacts_url": os.environ.get(ENV_ARTIFACTS_URL) or None,
            "max_logits_bytes": _env_int(ENV_MAX_LOGITS_BYTES, DEFAULT_MAX_LOGITS_BYTES),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        values["home"] = _absolute_home(values["home"])
        return cls(**values)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        """The URLs with their passwords masked: a notebook that shows ``client.settings``
        or a log line that formats it must not print them."""
        shown = {name: mask_url(value) if name.endswith("_url") and isinstance(value, str)
                 else value for name, value in vars(self).items()}
        return "Settings(" + ", ".join(f"{name}={value!r}" for name, value in shown.items()) + ")"

    @property
    def sqlite_path(self) -> Path:
        return self.home / "logprobe.db"

    def resolved_database_url(self) -> str:
        """The database URL, or the embedded SQLite file under ``home``."""
        if self.database_url:
            return self.database_url
        self.home.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{self.sqlite_path}"

    def resolved_artifacts_url(self) -> str:
        """The artifact store's URL, or the directory ``home/artifacts``."""
        return self.artifacts_url or str(self.home / "artifacts")

    def resolved_redis_url(self) -> str:
        """The Redis URL, starting the embedded Redis server when none is set."""
        if self.redis_url:
            return self.redis_url
        from .embedded_redis import ensure_embedded_redis

        return ensure_embedded_redis(self.home / "redis")


#: A ``password`` query parameter's value (up to the next ``&`` or ``#``).
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, for messages and logs.

    The credentials end at the *last* ``@`` of the URL, whatever precedes it: a
    password with an unencoded ``/``, ``?``, ``#`` or ``@`` (which ``urlsplit`` would
    cut into host, path, query or fragment) is masked whole. Everything from ``://``
    (or after the user name's ``:``) to that ``@`` becomes ``***``; a user name alone
    (no ``:``) is kept. A ``password=`` query parameter (redis-py and libpq read one)
    is masked too.
    """
    url = _QUERY_PASSWORD.sub(r"\1***", url)
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest or rest.startswith("/"):  # no authority: sqlite:///a@b
        return url
    userinfo, _, host = rest.rpartition("@")
    user, colon, _password = userinfo.partition(":")
    unreadable = any(char in userinfo for char in "/?#")
    if not colon and not unreadable:
        return url
    if any(char in user for char in "/?#"):
        user = ""
    return f"{scheme}://{user}:***@{host}"

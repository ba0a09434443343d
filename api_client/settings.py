"""Settings read from the environment (``LOGPROBE_*``), with an embedded default.

With no URLs set, logprobe keeps everything under ``LOGPROBE_HOME``
(default ``~/.logprobe``): a SQLite file and an embedded Redis server.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .constants import ENV_DATABASE_URL, ENV_HOME, ENV_REDIS_URL


def _default_home() -> Path:
    return Path(os.environ.get(ENV_HOME) or Path.home() / ".logprobe").expanduser()


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Where the broker and the database are. ``None`` URLs mean the embedded default."""

    redis_url: str | None = None
    database_url: str | None = None
    home: Path = field(default_factory=_default_home)

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        values: dict[str, object] = {
            "redis_url": os.environ.get(ENV_REDIS_URL) or None,
            "database_url": os.environ.get(ENV_DATABASE_URL) or None,
            "home": _default_home(),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        values["home"] = Path(str(values["home"])).expanduser()
        return cls(**values)  # type: ignore[arg-type]

    @property
    def sqlite_path(self) -> Path:
        return self.home / "logprobe.db"

    def resolved_database_url(self) -> str:
        """The database URL, or the embedded SQLite file under ``home``."""
        if self.database_url:
            return self.database_url
        self.home.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{self.sqlite_path}"

    def resolved_redis_url(self) -> str:
        """The Redis URL, starting the embedded Redis server when none is set."""
        if self.redis_url:
            return self.redis_url
        from .embedded_redis import ensure_embedded_redis

        return ensure_embedded_redis(self.home / "redis")


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, for messages and logs."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))

"""The worker's Celery app: the shared broker configuration plus the task."""

from __future__ import annotations

from functools import cache

from celery import Celery

from api_client.broker import make_celery
from api_client.database import check_database_url
from api_client.settings import Settings


def create_app(settings: Settings | None = None) -> Celery:
    settings = settings or Settings.from_env()
    if settings.database_url:  # refused at the start, not in every job's error
        check_database_url(settings.database_url)
    app = make_celery(settings.resolved_redis_url(), name="logprobe-worker")
    from .tasks import register_tasks

    register_tasks(app)
    return app


@cache
def default_app() -> Celery:
    return create_app()


def __getattr__(name: str) -> Celery:
    # `celery -A worker.app inspect active` finds `app` here, built on first access.
    if name == "app":
        return default_app()
    raise AttributeError(name)

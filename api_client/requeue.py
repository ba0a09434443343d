"""Resubmitting jobs that SQL holds but the broker lost (``logprobe requeue``).

SQL is the system of record: a job row is ``queued`` or ``running`` until a worker
stores its outcome. If Redis lost its data (restarted without persistence, flushed,
failed over), the messages of such jobs are gone and no worker would ever run them.
This module looks at what the broker still holds — messages waiting in the queues
and messages delivered but not yet acknowledged (kombu's ``unacked`` hash, where a
running job's message stays until it finishes) — and resubmits the rest.

A running job whose worker still reports progress (a heartbeat younger than
``stale_after`` seconds) is left alone even if its message is gone: it is alive
and will store its result. Resubmitting a job twice is harmless anyway: results
are written once per job id, and a job that already finished is skipped.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from .constants import progress_key
from .schema import Job, JobStatus

if TYPE_CHECKING:
    from .client import Client

#: kombu's Redis transport keeps delivered-but-unacked messages in this hash.
UNACKED_KEY = "unacked"
#: kombu stores priority levels of queue Q as separate lists "Q\x06\x16<priority>".
PRIORITY_SEPARATOR = "\x06\x16"


def _job_ids_in_message(raw: bytes | str) -> Iterator[str]:
    """The job ids inside one stored kombu message (JSON envelope, base64 JSON body)."""
    try:
        envelope = json.loads(raw)
        if isinstance(envelope, list):  # unacked entries are [message, exchange, key]
            envelope = envelope[0]
        body = envelope["body"]
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        for item in args[0]["jobs"]:
            yield str(item["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        return  # not one of ours


def broker_job_ids(redis: Any, queues: Iterable[str]) -> set[str]:
    """Ids of the jobs whose messages the broker holds: waiting in ``queues`` or unacked."""
    held: set[str] = set()
    for queue in set(queues):
        keys = [queue, *(k.decode() if isinstance(k, bytes) else k
                         for k in redis.scan_iter(match=f"{queue}{PRIORITY_SEPARATOR}*"))]
        for key in keys:
            for raw in redis.lrange(key, 0, -1):
                held.update(_job_ids_in_message(raw))
    for raw in redis.hvals(UNACKED_KEY):
        held.update(_job_ids_in_message(raw))
    return held


def _alive(redis: Any, job_id: str, stale_after: float) -> bool:
    updated = redis.hget(progress_key(job_id), "updated")
    return updated is not None and time.time() - float(updated) < stale_after


def requeue_lost_jobs(client: Client, *, older_than: float = 60.0, stale_after: float = 30.0,
                      dry_run: bool = False) -> list[str]:
    """Resubmit queued/running jobs the broker no longer holds; return their ids.

    ``older_than``: skip jobs created in the last that-many seconds (their message may
    be on its way). ``stale_after``: a running job whose worker reported progress
    more recently than this is alive and is skipped. ``dry_run``: only list them.
    """
    cutoff = datetime.now(timezone.utc) - timedelta(seconds=older_than)
    with client.session() as session:
        rows = list(session.scalars(
            select(Job).where(Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]),
                              Job.created_at <= cutoff)
            .order_by(Job.created_at)
        ))
    if not rows:
        return []
    redis = client.redis
    held = broker_job_ids(redis, {row.queue for row in rows})
    lost = [
        row for row in rows
        if row.id not in held
        and not (row.status is JobStatus.RUNNING and _alive(redis, row.id, stale_after))
    ]
    if lost and not dry_run:
        client._enqueue([{"id": row.id, "spec": row.spec, "queue": row.queue,
                          "model": row.model, "time_limit": row.time_limit} for row in lost])
    return [row.id for row in lost]

"""The Python entry point: submit probes, get job handles, query results with SQL."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, delete, text
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

from .artifacts import EMBEDDINGS_DIR, ArtifactStore, embedding_array
from .broker import make_celery, max_job_time_limit, message_limits, redis_client
from .bulk_insert import insert_rows
from .constants import TASK_RUN_PROBES, default_queue
from .database import ensure_schema, make_engine, make_sessionmaker
from .determinism import config_hash_of
from .determinism import report as determinism_report
from .embedding_specs import ArtifactEmbedding, InterpolateEmbedding, NoiseEmbedding
from .errors import ConfigError, SpecError
from .jobs import JobHandle
from .logits import check_logits_size_at_submit
from .messages import chunk_messages
from .reuse import spec_hash_of
from .schema import MAX_QUEUE_LENGTH, Job, JobStatus
from .settings import Settings, mask_url
from .specs import GenerateSpec, ScoreSpec, make_spec, parse_spec, token_id_list
from .sweeps import SweepHandle, as_list, sweep_specs

if TYPE_CHECKING:
    import pandas as pd
    import redis
    from celery import Celery

AnySpec = ScoreSpec | GenerateSpec
_EMBEDDING_SPECS = (ArtifactEmbedding, NoiseEmbedding, InterpolateEmbedding)


def _job_row(job: Mapping[str, Any], created_at: datetime,
             sweep_id: str | None) -> dict[str, Any]:
    """The ``jobs`` row (column values) of a job :meth:`Client.submit_many` planned:
    ``{"id", "model", "spec" (parsed), "queue", "time_limit", "position"}``."""
    spec = job["spec"]
    data = spec.model_dump(mode="json")
    return {
        "id": job["id"],
        "kind": spec.kind,
        "backend": spec.backend,
        "model": spec.model,
        "status": JobStatus.QUEUED,
        "spec": data,
        "queue": job["queue"],
        "seed": getattr(spec, "seed", None),
        "config_hash": config_hash_of(data),
        "time_limit": job["time_limit"],
        "created_at": created_at,
        "sweep_id": sweep_id,
        "sweep_index": job["position"] if sweep_id is not None else None,
        "spec_hash": spec_hash_of(data),
    }


class Client:
    """Submit probe jobs and read their results.

    With no arguments, URLs come from ``LOGPROBE_REDIS_URL`` and
    ``LOGPROBE_DATABASE_URL``; when those are unset, an embedded Redis server and
    a SQLite file under ``LOGPROBE_HOME`` (``~/.logprobe``) are used.
    Connections open on first use.
    """

    def __init__(
        self,
        redis_url: str | None = None,
        database_url: str | None = None,
        *,
        home: str | None = None,
        queue: str | None = None,
        artifacts_url: str | None = None,
        routes: dict[str, str] | None = None,
        chunk_size: int | None = None,
    ) -> None:
        #: Where submissions go when a call names no queue (default: logprobe.<backend>).
        self.queue = queue
        #: Model name -> queue, for jobs of that model when a call names no queue
        #: (e.g. ``{"meta-llama/Llama-2-7b-hf": model_queue("llama-7b")}``).
        self.routes = dict(routes or {})
        #: Jobs per broker message when many are submitted together; None: 64, more
        #: for short Hugging Face score jobs (:mod:`api_client.messages`).
        self.chunk_size = chunk_size
        self.settings = Settings.from_env(redis_url=redis_url, database_url=database_url,
                                          home=home, artifacts_url=artifacts_url)
        self._engine: Engine | None = None
        self._sessionmaker: sessionmaker[Session] | None = None
        self._celery: Celery | None = None
        self._redis: redis.Redis | None = None

    # --- connections -------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = make_engine(self.settings.resolved_database_url())
            if self.settings.database_url is None:
                ensure_schema(self._engine)  # the embedded default sets itself up
        return self._engine

    @property
    def database_url_safe(self) -> str:
        """The database URL with any password masked, for messages."""
        return mask_url(self.engine.url.render_as_string(hide_password=True))

    def session(self) -> Session:
        if self._sessionmaker is None:
            self._sessionmaker = make_sessionmaker(self.engine)
        return self._sessionmaker()

    @property
    def celery(self) -> Celery:
        if self._celery is None:
            self._celery = make_celery(self.settings.resolved_redis_url())
        return self._celery

    @property
    def artifacts(self) -> ArtifactStore:
        """The artifact store (``LOGPROBE_ARTIFACTS_URL``, default ``$LOGPROBE_HOME/artifacts``)."""
        return ArtifactStore.from_settings(self.settings)

    @property
    def redis(self) -> redis.Redis:
        """A Redis client for live state (progress, cancel flags); opened on first use."""
        if self._redis is None:
            self._redis = redis_client(
                self.settings.resolved_redis_url(), socket_timeout=10, socket_connect_timeout=10
            )
        return self._redis

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
            self._sessionmaker = None
        if self._celery is not None:
            self._celery.close()
            self._celery = None
        if self._redis is not None:
            self._redis.close()
            self._redis = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- submitting --------------------------------------------------------------

    def submit(self, spec: AnySpec | dict[str, Any], *, queue: str | None = None,
               time_limit: int | None = None) -> JobHandle:
        """Submit one probe spec (a spec object or its JSON dict); returns at once."""
        return self.submit_many([spec], queue=queue, time_limit=time_limit)[0]

    def submit_many(
        self, specs: Iterable[AnySpec | dict[str, Any]], *, queue: str | None = None,
        time_limit: int | None = None, chunk_size: int | None = None,
        sweep_id: str | None = None,
    ) -> list[JobHandle]:
        """Validate every spec, then, message by message, write its jobs' rows (one
        transaction) and send it: a worker starts on the first message while later
        ones are still being written.

        ``time_limit``: seconds each job may run before the worker stops it (default
        ``LOGPROBE_JOB_TIME_LIMIT`` or 6 h; at most :func:`~api_client.broker.max_job_time_limit`,
        below the broker's visibility timeout). Jobs go to the broker ``chunk_size``
        (default ``self.chunk_size``; None: 64, up to 512 for short Hugging Face score
        jobs, :mod:`api_client.messages`) to a message, grouped by queue and model, so
        a worker can batch them. Nothing is written if any spec is invalid
        (:class:`SpecError`). If a write fails or the broker cannot be reached, the
        rows written so far are removed again (a worker that already took one of
        their messages finds no job and skips it) and the error raised.
        """
        check_time_limit(time_limit)
        parsed = [parse_spec(s) for s in specs]
        for spec in parsed:
            check_logits_size_at_submit(spec, self.settings.max_logits_bytes)
        if not parsed:
            return []
        # What grouping into messages needs, for every job; the rest of each row (the
        # spec as JSON, its hashes: most of the work) just before its message is
        # written, so the first message goes out after its own rows, not everyone's.
        planned = [{"id": uuid.uuid4().hex, "model": spec.model, "spec": spec,
                    "queue": queue or self.routes.get(spec.model) or self.queue
                    or default_queue(spec.backend), "time_limit": time_limit,
                    "position": position}
                   for position, spec in enumerate(parsed)]
        for queue_name in {job["queue"] for job in planned}:
            check_queue_name(queue_name)
        by_id = {job["id"]: job for job in planned}
        now = datetime.now(timezone.utc)
        written: list[str] = []
        celery = self.celery  # a malformed broker URL is refused here, before any row
        try:
            with ExitStack() as stack:
                session = stack.enter_context(self.session())
                try:
                    producer = stack.enter_context(celery.producer_or_acquire())
                except Exception as exc:
                    raise self._broker_error(exc) from exc
                for queue_name, items in chunk_messages(
                        planned, self.chunk_size if chunk_size is None else chunk_size):
                    rows = [_job_row(by_id[item["id"]], now, sweep_id) for item in items]
                    for item, row in zip(items, rows, strict=True):
                        item["spec"] = row["spec"]
                    try:
                        with session.begin():  # PostgreSQL: one COPY, not an INSERT per job
                            insert_rows(session, Job, tuple(rows[0]),
                                        [tuple(row.values()) for row in rows])
                    except (OperationalError, ProgrammingError) as exc:
                        if (schema_error := self._schema_error(exc)) is None:
                            raise
                        raise schema_error from exc
                    written.extend(item["id"] for item in items)
                    try:
                        self._send(producer, queue_name, items)
                    except Exception as exc:
                        raise self._broker_error(exc) from exc
        except BaseException:
            if written:
                with self.session() as session, session.begin():
                    session.execute(delete(Job).where(Job.id.in_(written)))
            raise
        return [JobHandle(self, job["id"]) for job in planned]

    def _enqueue(self, rows: Sequence[Mapping[str, Any]], chunk_size: int = 1) -> None:
        """Send messages for jobs whose rows exist already (``requeue``)."""
        with self.celery.producer_or_acquire() as producer:
            for queue_name, items in chunk_messages(rows, chunk_size):
                self._send(producer, queue_name, items)

    def _schema_error(self, exc: Exception) -> ConfigError | None:
        """A clear error if ``exc`` says the database has no ``jobs`` table (an explicit
        LOGPROBE_DATABASE_URL whose schema was never created), else None."""
        message = str(getattr(exc, "orig", exc))
        if "jobs" not in message or not any(
                phrase in message for phrase in ("no such table", "does not exist")):
            return None
        return ConfigError(
            f"the database at {self.database_url_safe} has no logprobe tables; create them "
            "with `logprobe db upgrade` (on the same LOGPROBE_DATABASE_URL)")

    def _broker_error(self, exc: Exception) -> ConfigError:
        url = self.settings.redis_url or ""
        tls = (" (a rediss:// URL needs Redis's TLS port; a plain-text port takes "
               "redis://)" if url.startswith("rediss://") and "timeout" in str(exc).lower()
               else "")
        return ConfigError(
            f"could not send the jobs to the broker at "
            f"{mask_url(url) or 'the embedded Redis'}: {exc}; "
            f"check LOGPROBE_REDIS_URL{tls} and that Redis is running")

    def _send(self, producer: Any, queue_name: str, items: list[dict[str, Any]]) -> None:
        """One ``run_probes`` message for ``items`` (``{"id", "spec", "time_limit"}``
        each, from :func:`chunk_messages`)."""
        # Each job checks its own limit at every decoding step; Celery's soft and hard
        # limits on the message (its jobs' limits together, plus time to load the
        # model, below the visibility timeout) follow later as a backstop.
        soft, hard = message_limits(item["time_limit"] for item in items)
        self.celery.send_task(
            TASK_RUN_PROBES,
            args=[{"jobs": items}],
            queue=queue_name,
            producer=producer,
            soft_time_limit=soft,
            time_limit=hard,
        )

    def score(
        self,
        text: str | None = None,
        *,
        model: str,
        token_ids: Sequence[int] | None = None,
        prepend_bos: bool = False,
        top_logprobs: int = 0,
        backend: str = "hf",
        queue: str | None = None,
        embedding: Any = None,
        time_limit: int | None = None,
        **options: Any,
    ) -> JobHandle:
        """Score a text (or token ids): loss and per-token logprobs. Returns at once.

        ``embedding`` scores an input embedding instead: an array ``[seq, hidden]``
        (numpy or torch; uploaded to the artifact store) or an embedding spec
        (:class:`NoiseEmbedding`, :class:`InterpolateEmbedding`, or its dict);
        ``token_ids`` are then the target ids of its positions.
        ``options`` are the remaining :class:`ScoreSpec` fields (revision, dtype,
        device, return_logits, logits_last_n, logits_dtype).
        """
        spec = make_spec("score", text=text, token_ids=token_id_list(token_ids),
                         model=model, prepend_bos=prepend_bos, top_logprobs=top_logprobs,
                         backend=backend, embedding=self._embedding_field(embedding),
                         **options)
        return self.submit(spec, queue=queue, time_limit=time_limit)

    def score_many(
        self, texts: Iterable[str], *, model: str, queue: str | None = None,
        time_limit: int | None = None, chunk_size: int | None = None, **options: Any
    ) -> list[JobHandle]:
        """Score many texts with the same options: one job each, submitted together
        (``chunk_size`` jobs to a message, as in :meth:`submit_many`)."""
        specs = [make_spec("score", text=t, model=model, **options)
                 for t in as_list("texts", texts)]
        return self.submit_many(specs, queue=queue, time_limit=time_limit,
                                chunk_size=chunk_size)

    def generate(
        self,
        prompt: str | None = None,
        *,
        model: str,
        max_new_tokens: int = 16,
        do_sample: bool = False,
        backend: str = "hf",
        queue: str | None = None,
        embedding: Any = None,
        time_limit: int | None = None,
        **options: Any,
    ) -> JobHandle:
        """Continue a prompt, or an input ``embedding`` (an array or embedding spec, as
        for :meth:`score`). ``options`` are the remaining :class:`GenerateSpec` fields
        (temperature, top_k, top_p, seed, num_return_sequences, top_logprobs,
        return_logits, ...)."""
        spec = make_spec("generate", prompt=prompt, model=model, max_new_tokens=max_new_tokens,
                         do_sample=do_sample, backend=backend,
                         embedding=self._embedding_field(embedding), **options)
        return self.submit(spec, queue=queue, time_limit=time_limit)

    def requeue(self, *, older_than: float = 60.0, stale_after: float = 30.0,
                dry_run: bool = False) -> list[str]:
        """Resubmit jobs SQL says are queued or running but the broker no longer holds
        (e.g. after Redis lost its data). See :func:`api_client.requeue.requeue_lost_jobs`."""
        from .requeue import requeue_lost_jobs

        return requeue_lost_jobs(self, older_than=older_than, stale_after=stale_after,
                                 dry_run=dry_run)

    # --- embeddings and repeats ----------------------------------------------------

    def upload_embedding(self, array: Any) -> ArtifactEmbedding:
        """Store a ``[seq, hidden]`` (or ``[1, seq, hidden]``) array as safetensors in the
        artifact store; returns the spec that refers to it by URI and sha256.

        Raises :class:`SpecError` for a wrong shape, a non-float dtype or NaN/inf values.
        """
        values = embedding_array(array)
        ref = self.artifacts.put_array(EMBEDDINGS_DIR, "embedding", values)
        return ArtifactEmbedding(uri=ref.uri, sha256=ref.sha256,
                                 shape=(values.shape[0], values.shape[1]),
                                 dtype=ref.dtype)  # type: ignore[arg-type]

    def _embedding_field(self, embedding: Any) -> Any:
        """An embedding argument as spec JSON: arrays are uploaded, specs passed through."""
        if embedding is None or isinstance(embedding, dict):
            return embedding
        if isinstance(embedding, _EMBEDDING_SPECS):
            return embedding.model_dump(mode="json")
        return self.upload_embedding(embedding).model_dump(mode="json")

    def repeat(
        self,
        probe: AnySpec | dict[str, Any] | None = None,
        n: int = 5,
        *,
        queues: Sequence[str] | None = None,
        **fields: Any,
    ) -> list[JobHandle]:
        """Submit the same probe ``n`` times (to each of ``queues``, if given).

        ``probe`` is a spec (object or dict), or leave it out and pass the spec's
        fields as keywords (``kind="generate", prompt=..., model=...``). All the
        jobs share one ``config_hash``; compare them with :meth:`determinism`. Every
        run computes its result: ``reuse`` is off unless the spec sets it.
        """
        if n < 1:
            raise ValueError("n must be at least 1")
        if probe is None:
            kind = fields.pop("kind", None)
            if kind is None:
                raise ValueError("repeat() needs a probe spec, or kind=... and the spec fields")
            if "embedding" in fields:
                fields["embedding"] = self._embedding_field(fields["embedding"])
            probe = make_spec(kind, **fields)
        elif fields:
            raise ValueError("pass either a probe spec or keyword fields, not both")
        spec = parse_spec(probe)
        if spec.reuse is None:  # a copy of the first run would measure nothing
            spec = spec.model_copy(update={"reuse": False})
        handles: list[JobHandle] = []
        for queue in as_list("queues", queues) if queues else [None]:
            handles.extend(self.submit_many([spec] * n, queue=queue))
        return handles

    def determinism(self, *, config_hash: str | None = None, model: str | None = None,
                    kind: str | None = None) -> pd.DataFrame:
        """The ``determinism_report`` view: one row per probe configuration."""
        return determinism_report(self, config_hash=config_hash, model=model, kind=kind)

    def sweep(
        self,
        texts: Iterable[str],
        *,
        models: Iterable[str],
        seeds: Iterable[int] | None = None,
        kind: str | None = None,
        queue: str | None = None,
        chunk_size: int | None = None,
        time_limit: int | None = None,
        **probe_options: Any,
    ) -> SweepHandle:
        """Submit the cross product texts x models (x seeds) as one sweep.

        ``kind`` is ``"score"`` (the default) or ``"generate"`` (the default when
        ``seeds`` are given: each seed is one sampled generation, ``do_sample=True``).
        ``probe_options`` are the remaining spec fields, the same for every job;
        ``time_limit`` is each job's, as in :meth:`submit_many`. Every job row gets
        the sweep's ``sweep_id``; returns at once.
        """
        sweep_id = uuid.uuid4().hex
        specs = sweep_specs(texts, models=models, seeds=seeds, kind=kind, **probe_options)
        jobs = self.submit_many(specs, queue=queue, chunk_size=chunk_size,
                                time_limit=time_limit, sweep_id=sweep_id)
        return SweepHandle(self, sweep_id, [job.id for job in jobs])

    # --- reading -----------------------------------------------------------------

    def get_sweep(self, sweep_id: str) -> SweepHandle:
        """A handle on an earlier sweep, by its id."""
        return SweepHandle(self, sweep_id)

    def job(self, job_id: str) -> JobHandle:
        return JobHandle(self, job_id)

    def sql(self, query: str, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Run a SQL query on the results database and return a pandas DataFrame."""
        import pandas as pd

        with self.engine.connect() as connection:
            return pd.read_sql_query(text(query), connection, params=params)


def check_queue_name(queue: str) -> None:
    """Refuse a queue name the ``jobs.queue`` column cannot hold."""
    if not queue or len(queue) > MAX_QUEUE_LENGTH:
        raise SpecError(f"queue: {queue[:40]!r}{'...' if len(queue) > 40 else ''} is "
                        f"{len(queue)} characters; name a queue of 1 to {MAX_QUEUE_LENGTH}")


def check_time_limit(time_limit: int | None) -> None:
    """Refuse a time limit that is not positive or would outlast the visibility timeout."""
    if time_limit is None:
        return
    cap = max_job_time_limit()
    if isinstance(time_limit, bool) or not isinstance(time_limit, int) or time_limit < 1:
        raise SpecError(f"time_limit: {time_limit!r} is not a whole number of seconds >= 1")
    if time_limit > cap:
        raise SpecError(
            f"time_limit: {time_limit} s is more than {cap} s, the most the broker's "
            "visibility timeout allows (a longer job would be delivered to a second worker "
            "while it runs); lower it, or raise LOGPROBE_VISIBILITY_TIMEOUT on clients and "
            "workers"
        )

"""Live control of a running job: progress reports, the cancel flag, the time limit.

The runner gives each running job a :class:`JobControl`. A backend asks for the
control of the spec it is running (:func:`control_for`), calls :meth:`begin` /
:meth:`advance` as it makes progress, and :meth:`should_stop` once per decoding
step. That call only reads an event and the clock: a background thread does the
Redis work (polling the cancel flags every 50 ms, writing progress a few
times a second), so checking costs the decoding loop nothing.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from api_client.constants import LIVE_KEY_TTL, cancel_key, progress_key

log = logging.getLogger(__name__)

#: How often the monitor thread looks at the cancel flag (seconds).
CANCEL_POLL_INTERVAL = float(os.environ.get("LOGPROBE_CANCEL_POLL_SECONDS", "0.05"))
#: How often it writes progress to Redis (seconds).
PROGRESS_INTERVAL = float(os.environ.get("LOGPROBE_PROGRESS_SECONDS", "0.5"))
#: When it writes the first report, after the message's jobs began (seconds). A
#: message done sooner (a batch of tiny probes) writes no progress at all: its jobs'
#: status is in SQL, and two reports per job cost a 64-probe message ~8 ms of CPU.
FIRST_REPORT_DELAY = float(os.environ.get("LOGPROBE_FIRST_PROGRESS_SECONDS", "0.1"))
#: A running job whose heartbeat is younger than this is alive (seconds).
HEARTBEAT_FRESH = 5.0

CANCELLED = "cancelled"
TIME_LIMIT = "time_limit"


class JobStopped(Exception):
    """A backend ended its job before the job had anything to store, because it was
    cancelled or ran out of time (the control's ``stop_reason``): ``when`` says at what
    point ("before its OpenAI request was sent"). The runner stores such a job without
    rows, as cancelled or as failed with ``TimeLimitExceeded``."""

    def __init__(self, when: str) -> None:
        super().__init__(when)
        self.when = when


class JobControl:
    """What a backend may ask about, and report on, the job it is running."""

    def __init__(self, job_id: str, *, time_limit: float, redis: Any | None = None,
                 worker: str = "", attempt: int | None = None) -> None:
        self.job_id = job_id
        self.time_limit = time_limit
        # The limit counts from the job's own start (begin): the jobs of a message run
        # one after another. Until then, from the claim, so a job is always bounded.
        self.deadline = time.monotonic() + time_limit
        self.redis = redis
        self.worker = worker
        self.attempt = attempt
        self.done = 0
        self.total: int | None = None
        self.unit = "tokens"
        self.begun_at: float | None = None  # epoch seconds when compute began
        #: Why the job was stopped early (CANCELLED or TIME_LIMIT), None if it was not.
        self.stop_reason: str | None = None
        self.stopped_at: float | None = None  # time.monotonic() when it was stopped
        self._cancel = threading.Event()

    # --- called by backends (cheap: no I/O) -----------------------------------------

    def begin(self, total: int, unit: str = "tokens") -> None:
        """The job's work is ``total`` units (tokens to score or to generate).

        Starts the job's clock if :meth:`start` did not already."""
        self.total, self.unit, self.done = total, unit, 0
        self.start()

    def start(self) -> None:
        """The job's own computation begins: its time limit counts from the first call."""
        if self.begun_at is None:
            self.begun_at = time.time()
            self.deadline = time.monotonic() + self.time_limit

    def advance(self, done: int) -> None:
        self.done = done

    def remaining(self) -> float:
        """Seconds left before the time limit (negative once it has passed)."""
        return self.deadline - time.monotonic()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``, waking as soon as the job is cancelled (the monitor
        sets the flag within one poll) or reaches its time limit; returns
        :meth:`should_stop`. For backends that wait between calls (retries, rate limits)."""
        self._cancel.wait(max(0.0, min(seconds, self.remaining())))
        return self.should_stop()

    def stop_requested(self) -> bool:
        """Whether :meth:`should_stop` would be true, without recording a stop."""
        return (self.stop_reason is not None or self._cancel.is_set()
                or time.monotonic() >= self.deadline)

    def should_stop(self) -> bool:
        """True once the job was cancelled or ran past its time limit (sets stop_reason)."""
        if self.stop_reason is not None:
            return True
        if self._cancel.is_set():
            self.stop_reason = CANCELLED
        elif time.monotonic() >= self.deadline:
            self.stop_reason = TIME_LIMIT
        if self.stop_reason is not None:
            self.stopped_at = time.monotonic()
            return True
        return False

    def stop_before_sending(self) -> bool:
        """:meth:`should_stop`, with the job's cancel flag read in Redis now (one
        ``EXISTS``), not at the monitor's next poll: for a backend about to do what
        cannot be taken back (send a billed request), so that a job whose ``cancel()``
        has returned is not sent in the poll's interval. Redis unreadable: the job goes
        on, as when the monitor cannot poll."""
        if self.should_stop():
            return True
        if self.redis is None:
            return False
        try:
            if self.redis.exists(cancel_key(self.job_id)):
                self._cancel.set()
        except Exception as exc:  # (RedisError, or a connection error the client raised)
            log.debug("job %s: cancel flag not read before sending: %s", self.job_id, exc)
        return self.should_stop()

    # --- used by the runner ----------------------------------------------------------

    @property
    def cancel_requested(self) -> bool:
        """Whether the monitor saw the job's cancel flag (also for a job not computing)."""
        return self._cancel.is_set()

    def progress_fields(self) -> dict[str, str]:
        """This job's own fields of its progress hash (the heartbeat): those the jobs of
        a message share (who runs it, when, ``final``) :meth:`Monitor._report` adds."""
        fields = {"done": str(self.done), "unit": self.unit}
        if self.total is not None:
            fields["total"] = str(self.total)
        if self.begun_at is not None:
            fields["started"] = repr(self.begun_at)
        if self.attempt is not None:
            fields["attempt"] = str(self.attempt)
        return fields


#: Writes many jobs' progress hashes in one command. KEYS: the hashes; ARGV[1]: their
#: time to live; ARGV[2]: a JSON array of each key's own fields (an object of strings);
#: then the fields and values every hash gets. (A pipeline of HSET and EXPIRE per job
#: cost a 256-job message ~15 ms of the worker's Python per report; every field an
#: argument of its own, ~20 ms for 512 jobs, most of it the client packing ~10,000
#: arguments; so, ~5 ms, mostly Redis running the script.)
_WRITE_PROGRESS = """
local ttl = ARGV[1]
local own = cjson.decode(ARGV[2])
for k = 1, #KEYS do
  local fields = {}
  for i = 3, #ARGV do fields[#fields + 1] = ARGV[i] end
  for name, value in pairs(own[k]) do
    fields[#fields + 1] = name
    fields[#fields + 1] = value
  end
  redis.call('HSET', KEYS[k], unpack(fields))
  redis.call('EXPIRE', KEYS[k], ttl)
end
"""

#: Writes the same fields to many jobs' progress hashes, anew (what an earlier
#: attempt left is dropped). KEYS: the hashes; ARGV[1]: their time to live; then the
#: fields and values. (The heartbeat a message's jobs get when claimed: one command
#: whatever the message's size, no per-job fields to build.)
_ANNOUNCE = """
local ttl = ARGV[1]
for k = 1, #KEYS do
  redis.call('DEL', KEYS[k])
  redis.call('HSET', KEYS[k], unpack(ARGV, 2))
  redis.call('EXPIRE', KEYS[k], ttl)
end
"""

#: Sets fields of many jobs' progress hashes that exist (a final mark). KEYS and ARGV
#: as in ``_ANNOUNCE``.
_MARK = """
local ttl = ARGV[1]
for k = 1, #KEYS do
  if redis.call('EXISTS', KEYS[k]) == 1 then
    redis.call('HSET', KEYS[k], unpack(ARGV, 2))
    redis.call('EXPIRE', KEYS[k], ttl)
  end
end
"""


class Monitor:
    """One thread for all the jobs of a message: every ``CANCEL_POLL_INTERVAL`` it reads
    their cancel flags and, from ``first_report_delay`` on, every ``PROGRESS_INTERVAL``
    it writes their progress, each in one Redis command (a thread and a poll per
    job cost a batch of tiny probes more than their compute). Jobs whose progress was
    written get a final report when the message ends.

    The runner covers a message's jobs from their claim to their stored outcome:
    :meth:`announce` right after the claim (a heartbeat for every job, in one
    command, before any model loads), :meth:`start` the thread, :meth:`stop` (the
    final mark) only once every outcome is stored or the message gives up. A redelivered
    copy of the message meanwhile finds each job's heartbeat fresh (:func:`live_state`)."""

    def __init__(self, controls: list[JobControl],
                 first_report_delay: float = FIRST_REPORT_DELAY) -> None:
        self.controls = [c for c in controls if c.redis is not None]
        self.redis = self.controls[0].redis if self.controls else None
        self.first_report_delay = first_report_delay
        self._finished = threading.Event()
        self._thread: threading.Thread | None = None
        self._reported = False
        self._announced = False
        scripts = ([self.redis.register_script(text) for text in (_WRITE_PROGRESS, _ANNOUNCE,
                                                                    _MARK)]
                   if self.redis is not None else [None] * 3)
        self._write_progress, self._announce, self._mark = scripts

    def announce(self) -> None:
        """Write every job's heartbeat now (no progress yet), in one Redis command: the
        jobs are claimed and this process runs them. A Redis that cannot be reached is
        logged (the claim in SQL still holds; :func:`live_state` says why it matters)."""
        if self.redis is None:
            return
        try:
            self._announced = True
            self._announce(keys=[progress_key(c.job_id) for c in self.controls],
                           args=[LIVE_KEY_TTL, "done", 0, *self._shared_fields(final=False)])
        except SoftTimeLimitExceeded:
            raise
        except Exception as exc:
            log.warning("could not write the heartbeats of %d claimed jobs: %s",
                        len(self.controls), exc)

    def _mark_final(self) -> None:
        self._mark(
            keys=[progress_key(c.job_id) for c in self.controls],
            args=[LIVE_KEY_TTL, "final", 1, "updated", time.time()])

    def _poll_cancel_flags(self) -> None:
        running = [control for control in self.controls if not control._cancel.is_set()]
        # One EXISTS over all flags (almost always 0); only then which ones.
        if not running or not self.redis.exists(*(cancel_key(c.job_id) for c in running)):
            return
        flags = _read_cancel_flags(self.redis, [control.job_id for control in running])
        for control, flagged in zip(running, flags, strict=True):
            if flagged:
                control._cancel.set()

    def _shared_fields(self, final: bool) -> list[Any]:
        """The progress fields all the message's jobs share, as field, value, ...: who
        runs them (the runner gives a message's controls one worker name), when, and
        whether this is their final report."""
        return ["updated", time.time(), "worker", self.controls[0].worker,
                "pid", os.getpid(), "host", socket.gethostname(), "final", int(final)]

    def _report(self, final: bool = False) -> None:
        own = json.dumps([control.progress_fields() for control in self.controls])
        self._reported = True  # even if it fails midway: a final report then tidies up
        self._write_progress(keys=[progress_key(c.job_id) for c in self.controls],
                             args=[LIVE_KEY_TTL, own, *self._shared_fields(final)])

    def _watch(self) -> None:
        next_report = time.monotonic() + self.first_report_delay
        while not self._finished.is_set():
            now = time.monotonic()
            try:
                self._poll_cancel_flags()
                if now >= next_report:
                    self._report()
                    next_report = now + PROGRESS_INTERVAL
            except Exception as exc:  # Redis restarting: try again shortly
                log.debug("progress/cancel check failed: %s", exc)
                next_report = now + PROGRESS_INTERVAL
            self._finished.wait(CANCEL_POLL_INTERVAL)

    def start(self) -> None:
        if self.redis is None or self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self._watch, name=f"monitor-{self.controls[0].job_id[:8]}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._finished.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.redis is None or not (self._reported or self._announced):
            return
        try:
            if self._reported:
                self._report(final=True)
            else:  # a message done before the first report: only the claim's heartbeat
                self._mark_final()
        except SoftTimeLimitExceeded:
            raise
        except Exception as exc:
            log.warning("final heartbeat of %d jobs not written: %s", len(self.controls), exc)


class RunningHere:
    """The jobs this process is running now, on any thread (``--pool threads`` runs
    several messages side by side in one process): from before their claim until
    their outcome is stored. A heartbeat says which process runs a job, not which
    thread, so a message the broker restored to another thread of the same process
    is told apart here."""

    def __init__(self) -> None:
        self._ids: set[str] = set()
        self._lock = threading.Lock()

    def reserve(self, job_ids: list[str]) -> set[str]:
        """Take the jobs of ``job_ids`` no thread of this process runs; return them."""
        with self._lock:
            taken = set(job_ids) - self._ids
            self._ids |= taken
            return taken

    def release(self, job_ids: set[str]) -> None:
        with self._lock:
            self._ids -= job_ids

    def __contains__(self, job_id: object) -> bool:
        with self._lock:
            return job_id in self._ids


#: This process's running jobs (a forked pool process starts with none: its parent
#: runs no jobs).
running_here = RunningHere()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class LiveState:
    """What Redis says of a message's jobs before they are claimed."""

    #: ``{job_id: description}`` of the jobs another live process, or another thread of
    #: this one, is running now.
    running_elsewhere: dict[str, str]
    #: The jobs whose cancel flag is set.
    cancelled: set[str]


def live_state(redis: Any, job_ids: list[str]) -> LiveState:
    """Heartbeats and cancel flags of ``job_ids``: one Redis round trip of two
    ``EXISTS`` (a message's first delivery has no heartbeat, almost never a flag),
    then one to read those that exist.

    A message can be delivered again while its jobs still run: the broker connection
    dropped and Celery restored the unacknowledged message, or a visibility timeout
    was set too short. A job's heartbeat says whether its runner is alive: fresh,
    not final, and not a dead process on this host. A job :data:`running_here` runs
    on another thread of this process (its heartbeat's pid is this one's; a heartbeat
    of this pid for a job no thread here runs is a leftover). A flag set after this read is
    seen by the monitor's first poll, as the jobs start. If Redis cannot be read,
    no job is running elsewhere or cancelled (the claim in SQL and the idempotent
    store still keep results single; the jobs run, and their results go to SQL).
    """
    if not job_ids:
        return LiveState({}, set())
    here = {job_id: f"this process (pid {os.getpid()}, another thread)"
            for job_id in job_ids if job_id in running_here}
    try:
        pipe = redis.pipeline(transaction=False)
        pipe.exists(*(progress_key(job_id) for job_id in job_ids))
        pipe.exists(*(cancel_key(job_id) for job_id in job_ids))
        any_heartbeat, any_flag = pipe.execute()
        heartbeats: list[dict[bytes, bytes]] = [{}] * len(job_ids)
        flags = [0] * len(job_ids)
        if any_heartbeat or any_flag:
            pipe = redis.pipeline(transaction=False)
            if any_heartbeat:
                for job_id in job_ids:
                    pipe.hgetall(progress_key(job_id))
            if any_flag:
                _queue_cancel_flags(pipe, job_ids)
            replies = pipe.execute()
            if any_heartbeat:
                heartbeats, replies = replies[: len(job_ids)], replies[len(job_ids):]
            if any_flag:
                flags = replies
    except SoftTimeLimitExceeded:
        raise
    except Exception as exc:
        log.warning("could not read the heartbeats and cancel flags of %d jobs: %s",
                    len(job_ids), exc)
        return LiveState(here, set())
    owners = here
    for job_id, raw in zip(job_ids, heartbeats, strict=True):
        owner = live_owner({k.decode(): v.decode() for k, v in raw.items()})
        if owner is not None and job_id not in owners:
            owners[job_id] = owner
    return LiveState(owners, {job_id for job_id, flag in zip(job_ids, flags, strict=True)
                              if flag})


def live_owner(heartbeat: dict[str, str]) -> str | None:
    """Who wrote ``heartbeat`` if that process is alive and still running the job."""
    if not heartbeat or heartbeat.get("final") == "1" or "updated" not in heartbeat:
        return None
    age = time.time() - float(heartbeat["updated"])
    pid = int(heartbeat.get("pid") or 0)
    if age > HEARTBEAT_FRESH or pid == os.getpid():
        return None
    if heartbeat.get("host") == socket.gethostname() and not _pid_alive(pid):
        return None
    return f"{heartbeat.get('worker') or '?'} (pid {pid}, heartbeat {age:.1f}s ago)"


def _queue_cancel_flags(pipe: Any, job_ids: list[str]) -> None:
    """Add to ``pipe`` one reply per job: whether its cancel flag is set."""
    for job_id in job_ids:
        pipe.exists(cancel_key(job_id))


def _read_cancel_flags(redis: Any, job_ids: list[str]) -> list[bool]:
    pipe = redis.pipeline(transaction=False)
    _queue_cancel_flags(pipe, job_ids)
    return [bool(flag) for flag in pipe.execute()]


_active: ContextVar[Mapping[int, JobControl] | None] = ContextVar("logprobe_job_controls",
                                                                  default=None)


def control_for(spec: object) -> JobControl | None:
    """The control of the job running ``spec`` (the very object the runner passed)."""
    controls = _active.get()
    return None if controls is None else controls.get(id(spec))


@contextmanager
def monitoring(pairs: list[tuple[object, JobControl]],
               monitor: Monitor | None = None) -> Iterator[None]:
    """Make each spec's control findable while the block runs, and run one monitor for
    them meanwhile, unless ``monitor`` (started by the caller, who stops it) watches
    them already."""
    token = _active.set({id(spec): control for spec, control in pairs})
    own = monitor is None
    if own:
        monitor = Monitor([control for _, control in pairs])
        monitor.start()
    try:
        yield
    finally:
        if own:
            monitor.stop()  # type: ignore[union-attr]
        _active.reset(token)

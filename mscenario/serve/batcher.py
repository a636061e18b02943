"""The service's micro-batcher: concurrent requests -> one encode + score (or explain) call
on a single worker thread, supervised (a dead batching task fails its jobs with 503 and is
restarted), with a bounded queue and a per-request timeout; `health()`/`stats()` feed
/healthz. Split from server.py, which keeps the HTTP side (routes, limits, auth, OpenAPI).
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import time

from mscenario.serve.predictor import Predictor

log = logging.getLogger("mscenario.serve")


class Unavailable(Exception):
  """Scoring cannot answer now (restarting, stalled, queue full): HTTP 503 + Retry-After."""

  def __init__(self, reason: str, retry_after: int = 1):
    super().__init__(reason)
    self.retry_after = retry_after


@dataclasses.dataclass
class _Job:
  groups: list            # predictor.Parsed, one per sub-request
  rows: int
  model: object           # the ModelVersion that parsed the groups: it also scores them
  future: asyncio.Future
  arrived: float


class MicroBatcher:
  """Collects concurrent requests into one encode + score call on a single worker thread.

  Supervised: if the batching task dies, the jobs it held fail with 503 and it is restarted
  (after a short back-off); a request never waits longer than `request_timeout_s`; the queue
  is bounded in rows. `health()` says why scoring cannot answer, for /healthz.
  """

  def __init__(self, predictor: Predictor, max_wait_ms: float, max_rows: int, *,
               max_queued_rows: int = 65_536, request_timeout_s: float = 30.0,
               work=None):
    self.predictor = predictor
    self.work = work or score_jobs  # (model, jobs) -> per job, per sub-request results
    self.max_wait = max(0.0, max_wait_ms) / 1000.0
    self.max_rows = max_rows
    self.max_queued_rows = max_queued_rows
    self.timeout = request_timeout_s
    self._pending: collections.deque[_Job] = collections.deque()
    self._queued_rows = 0
    self._inflight: list[_Job] = []
    self._busy_since: float | None = None
    self._wake: asyncio.Event | None = None
    self._task: asyncio.Task | None = None
    self._stopping = False
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="score")
    self.batches = 0
    self.rows = 0
    self.restarts = 0
    self.timeouts = 0
    self.last_failure: str | None = None

  def start(self) -> None:
    self._wake = asyncio.Event()
    self._spawn()

  def _spawn(self) -> None:
    if self._stopping:
      return
    self._task = asyncio.get_running_loop().create_task(self._run())
    self._task.add_done_callback(self._on_done)

  def _on_done(self, task: asyncio.Task) -> None:
    """The supervisor: a dead batching task fails what it held and is started again."""
    if self._stopping or task.cancelled():
      return
    exc = task.exception()
    self.restarts += 1
    self.last_failure = repr(exc)
    log.error("serve: scoring task died (%r); restarting", exc, exc_info=exc)
    dead = Unavailable(f"scoring restarted after an internal error: {exc!r}")
    for job in [*self._inflight, *self._pending]:
      if not job.future.done():
        job.future.set_exception(dead)
    self._inflight, self._busy_since = [], None
    self._pending.clear()
    self._queued_rows = 0
    delay = min(5.0, 0.05 * 2 ** min(self.restarts, 7))
    asyncio.get_running_loop().call_later(delay, self._spawn)

  def health(self) -> str | None:
    """None when scoring can answer, else the reason it cannot."""
    if self._task is None or self._task.done():
      return f"scoring task is restarting (last failure: {self.last_failure})"
    if self._busy_since is not None and time.perf_counter() - self._busy_since > self.timeout:
      return (f"one batch has been scoring for {time.perf_counter() - self._busy_since:.0f} s "
              f"(> {self.timeout:g} s)")
    return None

  def stats(self) -> dict:
    """The queue as /healthz reports it: its health, what waits and what runs now (requests
    and rows), its limits, and counters since start."""
    reason = self.health()
    busy = None if self._busy_since is None else time.perf_counter() - self._busy_since
    out = {"status": "unavailable" if reason else "ok",
           "queued_requests": len(self._pending), "queued_rows": self._queued_rows,
           "in_flight_requests": len(self._inflight),
           "in_flight_rows": sum(j.rows for j in self._inflight),
           "busy_s": None if busy is None else round(busy, 3),
           "max_queued_rows": self.max_queued_rows, "max_batch_rows": self.max_rows,
           "request_timeout_s": self.timeout, "batches": self.batches, "rows": self.rows,
           "restarts": self.restarts, "timeouts": self.timeouts}
    if reason:
      out["reason"] = reason
    return out

  async def stop(self) -> None:
    self._stopping = True
    if self._task:
      self._task.cancel()
      with contextlib.suppress(asyncio.CancelledError):
        await self._task
    self._pool.shutdown(wait=False, cancel_futures=True)

  async def submit(self, groups: list, rows: int, model):
    """-> list of probability arrays per sub-request, scored by `model` (the version that
    parsed them). Raises Unavailable instead of waiting past the request timeout."""
    if self._task is None or self._task.done():
      raise Unavailable(self.health() or "scoring is not running")
    if self._queued_rows and self._queued_rows + rows > self.max_queued_rows:
      raise Unavailable(f"{self._queued_rows} rows already waiting to be scored")
    fut = asyncio.get_running_loop().create_future()
    self._pending.append(_Job(groups, rows, model, fut, time.perf_counter()))
    self._queued_rows += rows
    self._wake.set()
    try:
      return await asyncio.wait_for(fut, self.timeout)
    except TimeoutError:
      self.timeouts += 1
      raise Unavailable(f"scoring did not answer within {self.timeout:g} s",
                        retry_after=max(1, round(self.timeout))) from None

  def _next_batch(self) -> list[_Job]:
    """Consecutive queued jobs of one model version, up to max_rows (at least one job)."""
    jobs, rows = [], 0
    while self._pending and (not jobs or (self._pending[0].model is jobs[0].model and
                                          rows + self._pending[0].rows <= self.max_rows)):
      job = self._pending.popleft()
      self._queued_rows -= job.rows
      if job.future.done():  # client went away or timed out
        continue
      jobs.append(job)
      rows += job.rows
    return jobs

  async def _run(self) -> None:
    loop = asyncio.get_running_loop()
    while True:
      await self._wake.wait()
      self._wake.clear()
      while self._pending:
        wait = self._pending[0].arrived + self.max_wait - time.perf_counter()
        if wait > 0 and self._queued_rows < self.max_rows:
          await asyncio.sleep(wait)
        jobs = self._next_batch()
        if not jobs:
          continue
        model = jobs[0].model
        rows = sum(j.rows for j in jobs)
        self._inflight, self._busy_since = jobs, time.perf_counter()
        try:
          results = await loop.run_in_executor(self._pool, self.work, model, jobs)
        except Exception as e:  # noqa: BLE001 — never let one batch stop the service
          log.exception("scoring failed")
          results = [e] * len(jobs)
        self._inflight, self._busy_since = [], None
        self.batches += 1
        self.rows += rows
        for job, res in zip(jobs, results):
          if job.future.done():
            continue
          if isinstance(res, BaseException):
            job.future.set_exception(res)
          else:
            job.future.set_result(res)


def _run_jobs(model, jobs, compute):
  """Encode all jobs together and run `compute(model, arrays)` (-> an array, or a dict of
  arrays, over rows) once; split per job and sub-request. If that fails, per job, so one bad
  job fails alone."""
  try:
    out_all = compute(model, model.encode([g for j in jobs for g in j.groups]))
    out, start = [], 0
    for j in jobs:
      per = []
      for g in j.groups:
        sl = slice(start, start + g.n)
        per.append({k: v[sl] for k, v in out_all.items()} if isinstance(out_all, dict)
                   else out_all[sl])
        start += g.n
      out.append(per)
    return out
  except Exception:  # noqa: BLE001
    if len(jobs) == 1:
      raise
  results = []
  for j in jobs:
    try:
      results.append(_run_jobs(model, [j], compute)[0])
    except Exception as e:  # noqa: BLE001
      results.append(e)
  return results


def score_jobs(model, jobs):
  """Probabilities [n] per sub-request."""
  return _run_jobs(model, jobs, lambda m, arrays: m.score_arrays(arrays))


def explain_jobs(model, jobs):
  """{'attributions', 'logit', 'baseline_logit'} per sub-request."""
  return _run_jobs(model, jobs, lambda m, arrays: m.explain_arrays(arrays))

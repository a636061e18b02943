"""`mscenario serve`: the online scoring service (Starlette on uvicorn).

Requests are validated on the event loop (cheap, so a bad one gets its 422 at once), then
queued; one batcher task takes everything queued — waiting at most `max_batch_wait_ms` for
company — and encodes + scores it as one batch in a worker thread, padded into the compiled
bucket sizes. Each batch reads the served version once, so a hot swap (MODEL_DIR/CURRENT
changed, or POST /v1/reload) never mixes versions inside a response.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import hmac
import json
import logging
import os
import time

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from mscenario.errors import MscenarioError
from mscenario.serve.predictor import Predictor, RequestError

log = logging.getLogger("mscenario.serve")


@dataclasses.dataclass
class Limits:
  max_body_bytes: int = 4 << 20      # 413 beyond this
  max_items: int = 10_000            # items per HTTP request (all sub-requests together)
  max_requests: int = 1_000          # sub-requests in the batch form
  max_batch_rows: int = 8192         # rows the batcher scores in one go


class Oversized(Exception):
  pass


@dataclasses.dataclass
class _Job:
  groups: list            # predictor.Parsed, one per sub-request
  rows: int
  future: asyncio.Future
  arrived: float


class MicroBatcher:
  """Collects concurrent requests into one encode + score call on a single worker thread."""

  def __init__(self, predictor: Predictor, max_wait_ms: float, max_rows: int):
    self.predictor = predictor
    self.max_wait = max(0.0, max_wait_ms) / 1000.0
    self.max_rows = max_rows
    self._pending: collections.deque[_Job] = collections.deque()
    self._wake: asyncio.Event | None = None
    self._task: asyncio.Task | None = None
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="score")
    self.batches = 0
    self.rows = 0

  def start(self) -> None:
    self._wake = asyncio.Event()
    self._task = asyncio.get_running_loop().create_task(self._run())

  async def stop(self) -> None:
    if self._task:
      self._task.cancel()
      with contextlib.suppress(asyncio.CancelledError):
        await self._task
    self._pool.shutdown(wait=False, cancel_futures=True)

  async def submit(self, groups: list, rows: int):
    """-> (list of probability arrays per sub-request, version name)."""
    fut = asyncio.get_running_loop().create_future()
    self._pending.append(_Job(groups, rows, fut, time.perf_counter()))
    self._wake.set()
    return await fut

  async def _run(self) -> None:
    loop = asyncio.get_running_loop()
    while True:
      await self._wake.wait()
      self._wake.clear()
      while self._pending:
        wait = self._pending[0].arrived + self.max_wait - time.perf_counter()
        if wait > 0 and sum(j.rows for j in self._pending) < self.max_rows:
          await asyncio.sleep(wait)
        jobs, rows = [], 0
        while self._pending and (not jobs or rows + self._pending[0].rows <= self.max_rows):
          job = self._pending.popleft()
          if job.future.done():  # client went away
            continue
          jobs.append(job)
          rows += job.rows
        if not jobs:
          continue
        model = self.predictor.current  # one version for the whole batch
        try:
          results = await loop.run_in_executor(self._pool, _score_jobs, model, jobs)
        except Exception as e:  # noqa: BLE001 — never let one batch stop the service
          log.exception("scoring failed")
          results = [e] * len(jobs)
        self.batches += 1
        self.rows += rows
        for job, res in zip(jobs, results):
          if job.future.done():
            continue
          if isinstance(res, BaseException):
            job.future.set_exception(res)
          else:
            job.future.set_result((res, model.version))


def _score_jobs(model, jobs):
  """Encode + score all jobs together; if that fails, per job, so one bad job fails alone."""
  try:
    arrays = model.encode([g for j in jobs for g in j.groups])
    probs = model.score_arrays(arrays)
    out, start = [], 0
    for j in jobs:
      per = []
      for g in j.groups:
        per.append(probs[start:start + g.n])
        start += g.n
      out.append(per)
    return out
  except Exception:  # noqa: BLE001
    if len(jobs) == 1:
      raise
  results = []
  for j in jobs:
    try:
      results.append(_score_jobs(model, [j])[0])
    except Exception as e:  # noqa: BLE001
      results.append(e)
  return results


# ---------------------------------------------------------------------------- HTTP
def _error(status: int, detail: str, errors=None) -> JSONResponse:
  body = {"detail": detail}
  if errors is not None:
    body["errors"] = errors
  return JSONResponse(body, status_code=status)


async def _read_body(request: Request, limit: int) -> bytes:
  length = request.headers.get("content-length")
  if length is not None:
    try:
      if int(length) > limit:
        raise Oversized
    except ValueError:
      pass
  chunks, size = [], 0
  async for chunk in request.stream():
    size += len(chunk)
    if size > limit:
      raise Oversized
    chunks.append(chunk)
  return b"".join(chunks)


def create_app(model_dir: str, *, token: str | None = None, max_batch_wait_ms: float = 0.5,
               watch_interval_s: float = 1.0, limits: Limits | None = None,
               predictor: Predictor | None = None) -> Starlette:
  """The ASGI app; `watch_interval_s <= 0` disables polling MODEL_DIR (reload still works)."""
  limits = limits or Limits()
  predictor = predictor or Predictor(model_dir)
  batcher = MicroBatcher(predictor, max_batch_wait_ms, limits.max_batch_rows)
  reload_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="reload")
  started = time.time()

  def authorised(request: Request) -> bool:
    if not token:
      return True
    got = request.headers.get("authorization", "")
    scheme, _, value = got.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(),
                                                              token.encode())

  def unauthorised() -> JSONResponse:
    return JSONResponse({"detail": "missing or invalid bearer token"}, status_code=401,
                        headers={"WWW-Authenticate": "Bearer"})

  async def reload_now() -> bool:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(reload_pool, predictor.maybe_reload)

  async def watch() -> None:
    while True:
      await asyncio.sleep(watch_interval_s)
      try:
        if await reload_now():
          log.warning("serve: now serving version %s", predictor.current.version)
      except Exception:  # noqa: BLE001 — a broken new version leaves the old one serving
        log.exception("serve: reload failed; still serving %s", predictor.current.version)

  async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok", "version": predictor.current.version})

  async def metadata(request: Request) -> JSONResponse:
    if not authorised(request):
      return unauthorised()
    meta = predictor.current.metadata()
    meta["uptime_s"] = round(time.time() - started, 3)
    meta["batches"], meta["rows"] = batcher.batches, batcher.rows
    return JSONResponse(meta)

  async def predict(request: Request) -> JSONResponse:
    if not authorised(request):
      return unauthorised()
    try:
      body = await _read_body(request, limits.max_body_bytes)
    except Oversized:
      return _error(413, f"request body larger than {limits.max_body_bytes} bytes")
    try:
      payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
      return _error(422, "invalid request", [{"loc": [], "msg": f"invalid JSON: {e}"}])
    model = predictor.current
    batch_form = isinstance(payload, dict) and "requests" in payload
    if batch_form:
      subs = payload["requests"]
      if not isinstance(subs, list) or not subs or set(payload) != {"requests"}:
        return _error(422, "invalid request", [{"loc": ["requests"], "msg":
                      "expected a non-empty list of {scenario, user, items} objects (and no "
                      "other keys)"}])
      if len(subs) > limits.max_requests:
        return _error(413, f"more than {limits.max_requests} requests in one call")
      locs = [["requests", i] for i in range(len(subs))]
    else:
      subs, locs = [payload], [[]]
    n_items = sum(len(s["items"]) for s in subs
                  if isinstance(s, dict) and isinstance(s.get("items"), list))
    if n_items > limits.max_items:
      return _error(413, f"{n_items} items in one call; at most {limits.max_items}")
    groups, errors = [], []
    for sub, loc in zip(subs, locs):
      try:
        groups.append(model.parse(sub, loc))
      except RequestError as e:
        errors.extend(e.errors)
    if errors:
      return _error(422, "invalid request", errors)
    try:
      per, version = await batcher.submit(groups, n_items)
    except (RequestError, MscenarioError, ValueError) as e:
      errs = getattr(e, "errors", None) or [{"loc": [], "msg": str(e)}]
      return _error(422, "invalid request", errs)
    except Exception:  # noqa: BLE001
      log.exception("predict failed")
      return _error(500, "internal error while scoring")
    if batch_form:
      return JSONResponse({"version": version, "model": model.manifest["model"],
                           "results": [{"probabilities": _floats(p)} for p in per]})
    return JSONResponse({"version": version, "model": model.manifest["model"],
                         "probabilities": _floats(per[0])})

  async def reload(request: Request) -> JSONResponse:
    if not authorised(request):
      return unauthorised()
    try:
      changed = await reload_now()
    except Exception as e:  # noqa: BLE001
      log.exception("reload failed")
      return _error(500, f"reload failed; still serving {predictor.current.version}: {e}")
    return JSONResponse({"changed": changed, "version": predictor.current.version})

  @contextlib.asynccontextmanager
  async def lifespan(app):
    batcher.start()
    watcher = (asyncio.get_running_loop().create_task(watch())
               if watch_interval_s > 0 else None)
    try:
      yield
    finally:
      if watcher:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
          await watcher
      await batcher.stop()
      reload_pool.shutdown(wait=False)

  app = Starlette(routes=[
      Route("/healthz", healthz, methods=["GET"]),
      Route("/v1/metadata", metadata, methods=["GET"]),
      Route("/v1/predict", predict, methods=["POST"]),
      Route("/v1/reload", reload, methods=["POST"]),
  ], lifespan=lifespan)
  app.state.predictor = predictor
  app.state.batcher = batcher
  return app


def _floats(p: np.ndarray) -> list[float]:
  return [float(x) for x in np.asarray(p, np.float64).tolist()]


def read_token(path: str | None) -> str | None:
  if not path:
    return None
  try:
    with open(path) as f:
      token = f.read().strip()
  except OSError as e:
    raise MscenarioError(f"--token-file {path}: {e.strerror}") from None
  if not token:
    raise MscenarioError(f"--token-file {path} is empty")
  return token


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8080, *,
          token_file: str | None = None, max_batch_wait_ms: float = 0.5,
          watch_interval_s: float = 1.0, limits: Limits | None = None) -> None:
  import uvicorn
  token = read_token(token_file)
  if host not in ("127.0.0.1", "localhost", "::1") and not token:
    log.warning("serve: listening on %s without --token-file: anyone who can reach it can "
                "score and reload", host)
  app = create_app(model_dir, token=token, max_batch_wait_ms=max_batch_wait_ms,
                   watch_interval_s=watch_interval_s, limits=limits)
  v = app.state.predictor.current
  print(f"serve: model {v.manifest['model']} version {v.version} on http://{host}:{port} "
        f"(buckets {list(v.buckets)}, max batch wait {max_batch_wait_ms} ms"
        f"{', bearer token required' if token else ''})", flush=True)
  uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False,
              limit_concurrency=None, timeout_keep_alive=30)

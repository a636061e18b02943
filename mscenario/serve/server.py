"""`mscenario serve`: the online scoring service (Starlette on uvicorn).

Requests are validated on the event loop (cheap, so a bad one gets its 422 at once), then
queued; one batcher task takes everything queued — waiting at most `max_batch_wait_ms` for
company — and encodes + scores it as one batch in a worker thread, padded into the compiled
bucket sizes. A request is pinned to the version that parsed it: that version scores it and is
named in the response, so a hot swap (MODEL_DIR/CURRENT changed, or POST /v1/reload) never
mixes versions inside a response, nor scores a request with a version that did not check it.

Hostile input: every limit is checked before anything is materialised (body bytes, items,
string lengths, list lengths, 64-bit integers, numeric range); bad input gets a 422 naming the
field; the batcher is supervised and a request waits at most `request_timeout_s` (503 +
Retry-After); connection-level limits are uvicorn's own settings (`uvicorn_config`).

Length: the routes share the app's state (auth, limits, the current version, both
batchers), which create_app closes over; the OpenAPI document is built from the same limits.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import json
import logging
import math
import time

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from mscenario.errors import MscenarioError
from mscenario.serve import Limits  # noqa: F401  (defined beside the CLI flags)
from mscenario.serve.batcher import MicroBatcher, Unavailable, explain_jobs
from mscenario.serve.predictor import InputLimits, ModelUnavailable, Predictor, RequestError

log = logging.getLogger("mscenario.serve")


class Oversized(Exception):
  pass


# ---------------------------------------------------------------------------- HTTP
def _error(status: int, detail: str, errors=None, headers=None) -> JSONResponse:
  body = {"detail": detail}
  if errors is not None:
    body["errors"] = errors
  return JSONResponse(body, status_code=status, headers=headers)


def _unavailable(e: Unavailable) -> JSONResponse:
  return _error(503, str(e), headers={"Retry-After": str(e.retry_after)})


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


def _no_constant(name: str):
  raise ValueError(f"{name} is not JSON (numbers must be finite)")


def _parse_json(body: bytes):
  """json.loads without NaN/Infinity. Raises ValueError with a message for the client: Python
  itself refuses integers over 4300 digits and nesting deeper than its recursion limit."""
  try:
    return json.loads(body, parse_constant=_no_constant)
  except RecursionError:
    raise ValueError("JSON nested too deeply") from None
  except UnicodeDecodeError as e:
    raise ValueError(f"body is not UTF-8 text: {e.reason}") from None


def create_app(model_dir: str, *, token: str | None = None, max_batch_wait_ms: float = 0.5,
               watch_interval_s: float = 1.0, limits: Limits | None = None,
               predictor: Predictor | None = None) -> Starlette:
  """The ASGI app; `watch_interval_s <= 0` disables polling MODEL_DIR (reload still works)."""
  limits = limits or Limits()
  input_limits = InputLimits(max_string_chars=limits.max_string_chars,
                             max_list_len=limits.max_list_len)
  predictor = predictor or Predictor(model_dir)
  batcher = MicroBatcher(predictor, max_batch_wait_ms, limits.max_batch_rows,
                         max_queued_rows=limits.max_queued_rows,
                         request_timeout_s=limits.request_timeout_s)
  # Explanations (many model evaluations per row) queue apart, on their own worker thread:
  # a burst of them must not hold up plain scoring.
  explainer = MicroBatcher(predictor, max_batch_wait_ms, limits.max_batch_rows,
                           max_queued_rows=limits.max_queued_rows,
                           request_timeout_s=limits.request_timeout_s, work=explain_jobs)
  reload_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="reload")
  started = time.time()
  openapi_cache: dict = {}

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
    """200 only while scoring can answer: a dead or stuck scorer must take the instance out
    of rotation, not leave it saying ok while requests wait. Both queues' state is reported
    (`queues`: predict and explain); a stuck or restarting explanation worker shows there
    with its reason but leaves the status 200, since scoring still answers."""
    version = predictor.current.version
    queues = {"predict": batcher.stats(), "explain": explainer.stats()}
    reason = batcher.health()
    if reason:
      return JSONResponse({"status": "unavailable", "reason": reason, "version": version,
                           "queues": queues}, status_code=503, headers={"Retry-After": "1"})
    return JSONResponse({"status": "ok", "version": version, "queues": queues})

  async def metadata(request: Request) -> JSONResponse:
    if not authorised(request):
      return unauthorised()
    meta = predictor.current.metadata()
    meta["uptime_s"] = round(time.time() - started, 3)
    # Top-level counters are the predict queue's (as before); `queues` has both queues.
    meta["batches"], meta["rows"] = batcher.batches, batcher.rows
    meta["restarts"], meta["timeouts"] = batcher.restarts, batcher.timeouts
    meta["queues"] = {"predict": batcher.stats(), "explain": explainer.stats()}
    return JSONResponse(meta)

  async def openapi(request: Request) -> JSONResponse:
    model = predictor.current
    if openapi_cache.get("version") is not model:
      openapi_cache["version"] = model
      openapi_cache["doc"] = openapi_document(model, limits, input_limits, bool(token))
    return JSONResponse(openapi_cache["doc"])

  async def parsed(request: Request):
    """A request's body -> (model, groups, locs, batch form?, items), or the error response:
    /v1/predict and /v1/explain take the same requests under the same limits and auth."""
    if not authorised(request):
      return unauthorised()
    try:
      async with asyncio.timeout(limits.body_timeout_s):
        body = await _read_body(request, limits.max_body_bytes)
    except Oversized:
      return _error(413, f"request body larger than {limits.max_body_bytes} bytes")
    except TimeoutError:
      return _error(408, f"request body not received within {limits.body_timeout_s:g} s")
    try:
      payload = _parse_json(body)
    except ValueError as e:
      return _error(422, "invalid request", [{"loc": [], "msg": f"invalid JSON: {e}"}])
    model = predictor.current  # pinned: the version that parses also scores and is reported
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
        groups.append(model.parse(sub, loc, input_limits))
      except RequestError as e:
        errors.extend(e.errors)
      if len(errors) > input_limits.max_errors:
        break
    if errors:
      return _error(422, "invalid request", errors[:input_limits.max_errors + 1])
    return model, groups, locs, batch_form, n_items

  async def run(queue: MicroBatcher, what: str, model, groups, n_items: int):
    """The queue's results per sub-request, or the error response."""
    try:
      return await queue.submit(groups, n_items, model)
    except Unavailable as e:
      return _unavailable(e)
    except ModelUnavailable as e:  # the version lacks a file it needs: not the client's fault
      log.error("serve: %s", e)
      return _error(503, str(e))
    except (RequestError, MscenarioError, ValueError) as e:
      errs = getattr(e, "errors", None) or [{"loc": [], "msg": str(e)}]
      return _error(422, "invalid request", errs)
    except Exception:  # noqa: BLE001
      log.exception("%s failed", what)
      return _error(500, f"internal error while {what}")

  async def predict(request: Request) -> JSONResponse:
    got = await parsed(request)
    if isinstance(got, JSONResponse):
      return got
    model, groups, locs, batch_form, n_items = got
    per = await run(batcher, "scoring", model, groups, n_items)
    if isinstance(per, JSONResponse):
      return per
    errors = _non_finite(per, locs, model)
    if errors:
      return _error(422, "invalid request", errors[:input_limits.max_errors + 1])
    if batch_form:
      return JSONResponse({"version": model.version, "model": model.manifest["model"],
                           "results": [{"probabilities": _floats(p)} for p in per]})
    return JSONResponse({"version": model.version, "model": model.manifest["model"],
                         "probabilities": _floats(per[0])})

  async def explain(request: Request) -> JSONResponse:
    got = await parsed(request)
    if isinstance(got, JSONResponse):
      return got
    model, groups, locs, batch_form, n_items = got
    if not model.explain_fns:
      return _error(501, str(model.no_explanation()))
    per = await run(explainer, "explaining", model, groups, n_items)
    if isinstance(per, JSONResponse):
      return per
    errors = _non_finite([p["logit"] for p in per], locs, model)
    errors += _non_finite([p["attributions"] for p in per], locs, model)
    if errors:
      return _error(422, "invalid request", errors[:input_limits.max_errors + 1])
    spec = model.manifest["explain"]
    head = {"version": model.version, "model": model.manifest["model"],
            "method": {k: spec[k] for k in ("method", "target", "steps", "rule", "baseline")},
            "features": spec["features"]}
    if batch_form:
      return JSONResponse({**head, "results": [{"items": _explained(p, spec["features"])}
                                               for p in per]})
    return JSONResponse({**head, "items": _explained(per[0], spec["features"])})

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
    explainer.start()
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
      await explainer.stop()
      reload_pool.shutdown(wait=False)

  app = Starlette(routes=[
      Route("/healthz", healthz, methods=["GET"]),
      Route("/openapi.json", openapi, methods=["GET"]),
      Route("/v1/metadata", metadata, methods=["GET"]),
      Route("/v1/predict", predict, methods=["POST"]),
      Route("/v1/explain", explain, methods=["POST"]),
      Route("/v1/reload", reload, methods=["POST"]),
  ], lifespan=lifespan)
  app.state.predictor = predictor
  app.state.batcher = batcher
  app.state.explainer = explainer
  app.state.limits = limits
  return app


def _non_finite(per: list, locs: list, model) -> list[dict]:
  """422 errors for items whose probability is not finite (never sent as NaN)."""
  numeric = sorted(model.columns.numeric)
  out = []
  for p, loc in zip(per, locs):
    for j in np.flatnonzero(~np.isfinite(np.asarray(p))).tolist():
      out.append({"loc": [*loc, "items", j], "msg": "the model gives no finite probability "
                  f"for this item; are its numeric fields {numeric} far out of range?"})
  return out


def _explained(out: dict, features: list[str]) -> list[dict]:
  """Per item: logit, baseline logit, probability and {feature: contribution to the logit}."""
  attr = np.asarray(out["attributions"], np.float64).tolist()
  logit = np.asarray(out["logit"], np.float64).tolist()
  base = np.asarray(out["baseline_logit"], np.float64).tolist()
  return [{"logit": z, "baseline_logit": z0, "probability": 1.0 / (1.0 + math.exp(-z))
           if z > -700 else 0.0, "contributions": dict(zip(features, a))}
          for z, z0, a in zip(logit, base, attr)]


def _floats(p: np.ndarray) -> list[float]:
  return [float(x) for x in np.asarray(p, np.float64).tolist()]


def openapi_document(model, limits: Limits, input_limits: InputLimits, auth: bool) -> dict:
  """OpenAPI 3 description of /v1/predict and /v1/explain for the loaded version's fields
  (GET /openapi.json): clients and fuzzers generate requests from it."""
  single = model.request_schema(input_limits, limits.max_items)
  batch = {"type": "object", "required": ["requests"], "additionalProperties": False,
           "properties": {"requests": {"type": "array", "minItems": 1,
                                       "maxItems": limits.max_requests,
                                       "items": {"$ref": "#/components/schemas/Request"}}}}
  probs = {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1}}
  error = {"type": "object", "required": ["detail"], "properties": {
      "detail": {"type": "string"},
      "errors": {"type": "array", "items": {"type": "object", "properties": {
          "loc": {"type": "array", "items": {"type": ["string", "integer"]}},
          "msg": {"type": "string"}}}}}}
  response = {"type": "object", "required": ["version", "model"], "properties": {
      "version": {"type": "string", "description": "the model version that scored it"},
      "model": {"type": "string"}, "probabilities": probs,
      "results": {"type": "array", "items": {"type": "object",
                                             "properties": {"probabilities": probs}}}}}
  err = lambda text: {"description": text, "content": {  # noqa: E731
      "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
  op = {
      "summary": "Click probabilities for a user's candidate items in one scenario",
      "operationId": "predict",
      "requestBody": {"required": True, "content": {"application/json": {"schema": {
          "oneOf": [{"$ref": "#/components/schemas/Request"},
                    {"$ref": "#/components/schemas/BatchRequest"}]}}}},
      "responses": {
          "200": {"description": "one probability per item, in item order", "content": {
              "application/json": {"schema": {"$ref": "#/components/schemas/Response"}}}},
          "408": err("the request body was not received in time"),
          "413": err(f"body over {limits.max_body_bytes} bytes or over {limits.max_items} "
                     "items"),
          "422": err("invalid request: one message per bad field, with its location"),
          "503": err("scoring cannot answer now; retry after Retry-After seconds")}}
  body = op["requestBody"]
  features = (model.manifest.get("explain") or {}).get("features", [])
  explained = {"type": "array", "items": {"type": "object", "properties": {
      "logit": {"type": "number"}, "baseline_logit": {"type": "number"},
      "probability": {"type": "number", "minimum": 0, "maximum": 1},
      "contributions": {"type": "object", "description": "feature -> its integrated-"
                        "gradients contribution to the logit; they sum to logit - "
                        "baseline_logit", "properties": {f: {"type": "number"}
                                                         for f in features}}}}}
  explain_response = {"type": "object", "required": ["version", "model", "features"],
                      "properties": {
                          "version": {"type": "string"}, "model": {"type": "string"},
                          "method": {"type": "object"},
                          "features": {"type": "array", "items": {"type": "string"}},
                          "items": explained,
                          "results": {"type": "array", "items": {
                              "type": "object", "properties": {"items": explained}}}}}
  explain_op = {
      "summary": "Why: per-feature contributions to each item's logit (integrated gradients "
                 "from the training rows' mean embedding, in the same scenario)",
      "operationId": "explain", "requestBody": body,
      "responses": {**{k: v for k, v in op["responses"].items() if k != "200"},
                    "200": {"description": "one explanation per item, in item order",
                            "content": {"application/json": {"schema": {
                                "$ref": "#/components/schemas/ExplainResponse"}}}},
                    "501": err("this version was exported without an explanation "
                               "function")}}
  for o in (op, explain_op):
    if auth:
      o["responses"]["401"] = err("missing or invalid bearer token")
      o["security"] = [{"bearer": []}]
  doc = {"openapi": "3.0.3",
         "info": {"title": "mscenario scoring service", "version": model.version,
                  "description": f"{model.manifest['model']} model, version {model.version}"},
         "paths": {"/v1/predict": {"post": op}, "/v1/explain": {"post": explain_op}},
         "components": {"schemas": {"Request": single, "BatchRequest": batch,
                                    "Response": response, "ExplainResponse": explain_response,
                                    "Error": error}}}
  if auth:
    doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
  return doc


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


def uvicorn_config(app, limits: Limits, **kwargs):
  """uvicorn's own limits on connections, idle keep-alive and header size (the tests serve
  with these too)."""
  return uvicorn.Config(app, log_level="warning", access_log=False,
                        limit_concurrency=limits.limit_concurrency,
                        timeout_keep_alive=limits.timeout_keep_alive,
                        h11_max_incomplete_event_size=limits.max_header_bytes,
                        http=limits.http, **kwargs)


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8080, *,
          token_file: str | None = None, max_batch_wait_ms: float = 0.5,
          watch_interval_s: float = 1.0, limits: Limits | None = None) -> None:
  limits = limits or Limits()
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
  uvicorn.Server(uvicorn_config(app, limits, host=host, port=port)).run()

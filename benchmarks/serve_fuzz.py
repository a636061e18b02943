"""Hostile-input fuzz of `mscenario serve`, generated from the service's own /openapi.json.

Starts the server as its own process on a free loopback port (so its RSS is its own), reads
GET /openapi.json and derives Hypothesis strategies from the Request schema
(its own small schema -> strategy translator, `from_schema`) and sends them to every POST
endpoint that takes that request (/v1/predict, /v1/explain): valid requests must get 200 with
one finite probability (or one explanation of finite numbers) per item;
mutated ones (unknown / misspelt fields, huge integers, 1e308, long strings, deep nesting,
wrong types, arbitrary JSON and bytes) must get a 4xx, never a 5xx. Every request must answer
within a timeout. Meanwhile a background load of valid requests runs while MODEL_DIR/CURRENT
swaps between two versions: none of those may fail. A sampler records the server's peak RSS.

  python benchmarks/serve_fuzz.py --cases 5000 --seconds 900     # the long run (BENCHMARKS.md)
  python benchmarks/serve_fuzz.py --model MODEL_DIR ...           # an exported model of yours

Without --model it trains + exports a tiny MovieLens-like model (sparse ids, a numeric `age`
that is also the scenario field, like ML-100K's) from generated rows: no download.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

CONFIG = '''
from ml_collections import ConfigDict
from mscenario.config import base_config


def get_config():
  c = base_config()
  c.data.source = "table"
  c.data.name = "fuzz"
  c.data.table.train = {path!r}
  c.data.features = ConfigDict({{
      "user_id": {{"kind": "sparse", "column": "user_id"}},
      "item_id": {{"kind": "sparse", "column": "item_id"}},
      "gender": {{"kind": "sparse", "column": "gender"}},
      "genre": {{"kind": "sparse", "column": "genre"}},
      "age": {{"kind": "dense", "column": "age", "normalize": "standard"}}}})
  c.data.scenario = ConfigDict({{"field": "age", "descriptions": {{}},
                                 "groups": {{"young": ["1", "18"], "adult": ["25"],
                                            "senior": ["35", "45", "50", "56"]}},
                                 "order": ("young", "adult", "senior")}})
  c.data.label = ConfigDict({{"field": "rating", "rule": "> 3"}})
  c.model.name = "star"
  c.model.star.hidden = (16, 8)
  c.model.star.aux_hidden = (8,)
  c.train.epochs = 1
  c.train.batch_size = 256
  c.train.eval_batch_size = 1024
  return c
'''


def make_model(tmp: str, rows: int = 3000) -> str:
  """Train + export a tiny ML-100K-like model; returns its model dir (with CURRENT)."""
  rng = random.Random(0)
  path = os.path.join(tmp, "ratings.csv")
  with open(path, "w") as f:
    f.write("user_id,item_id,age,gender,genre,rating\n")
    for _ in range(rows):
      u = rng.randrange(80)
      f.write(f"{u},{rng.randrange(60)},{[1, 18, 25, 35, 45, 50, 56][u % 7]},{'MF'[u % 2]},"
              f"{rng.choice(['drama', 'comedy', 'action', 'horror'])},{rng.randint(1, 5)}\n")
  cfg = os.path.join(tmp, "fuzz_config.py")
  with open(cfg, "w") as f:
    f.write(CONFIG.format(path=path))
  env = {**os.environ, "MSCENARIO_CACHE": os.path.join(tmp, "cache"), "JAX_PLATFORMS": "cpu"}
  work, model = os.path.join(tmp, "run"), os.path.join(tmp, "model")
  for args in (["train", "--config", cfg, "--workdir", work],
               ["export", "--workdir", work, "--out", model, "--buckets", "1,8,64,512"]):
    out = subprocess.run([sys.executable, "-m", "mscenario", *args], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    if out.returncode:
      raise RuntimeError(f"mscenario {args[0]} failed:\n{out.stderr[-3000:]}")
  return model


def add_version(model_dir: str, scale: float) -> str:
  """A copy of the current version with scaled weights (same compiled functions)."""
  from safetensors.numpy import load_file, save_file
  from mscenario.serve import predictor as pred_lib
  src = pred_lib.resolve_version_dir(model_dir)
  names = os.listdir(os.path.join(model_dir, pred_lib.VERSIONS_DIR))
  name = f"v{max(int(n[1:]) for n in names if n.startswith('v')) + 1:04d}"
  dst = os.path.join(model_dir, pred_lib.VERSIONS_DIR, name)
  shutil.copytree(src, dst)
  w = load_file(os.path.join(dst, "weights.safetensors"))
  save_file({k: (v * scale).astype(v.dtype) for k, v in w.items()},
            os.path.join(dst, "weights.safetensors"))
  with open(os.path.join(dst, "manifest.json")) as f:
    manifest = json.load(f)
  manifest["version"] = name
  with open(os.path.join(dst, "manifest.json"), "w") as f:
    json.dump(manifest, f)
  return name


def point_current(model_dir: str, name: str) -> None:
  tmp = os.path.join(model_dir, f".CURRENT.{uuid.uuid4().hex}")
  with open(tmp, "w") as f:
    f.write(name)
  os.replace(tmp, os.path.join(model_dir, "CURRENT"))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Server:
  """`mscenario serve` in its own process on a free loopback port."""

  def __init__(self, model_dir: str, *args: str):
    self.port = _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "mscenario", "serve", "--model", model_dir, "--port",
         str(self.port), *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    import httpx
    deadline = time.time() + 180
    while True:
      if self.proc.poll() is not None:
        raise RuntimeError(f"server exited: {self.proc.stderr.read()[-3000:]}")
      try:
        if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
          break
      except httpx.HTTPError:
        pass
      if time.time() > deadline:
        raise RuntimeError("server did not start")
      time.sleep(0.2)

  def close(self) -> str:
    self.proc.terminate()
    try:
      _, err = self.proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      _, err = self.proc.communicate()
    return err or ""


class RssSampler(threading.Thread):
  """Peak resident memory of one process, sampled every 20 ms."""

  def __init__(self, pid: int):
    super().__init__(daemon=True)
    import psutil
    self.proc = psutil.Process(pid)
    self.peak = self.start_rss = self.proc.memory_info().rss
    self._halt = threading.Event()

  def run(self):
    while not self._halt.wait(0.02):
      try:
        self.peak = max(self.peak, self.proc.memory_info().rss)
      except Exception:  # noqa: BLE001 — process gone
        return

  def stop(self) -> int:
    self._halt.set()
    self.join(5)
    return self.peak


# ---------------------------------------------------------------------------- strategies
def _resolve(schema, components):
  """Inline the document's $refs (hypothesis-jsonschema wants a self-contained schema)."""
  if isinstance(schema, dict):
    ref = schema.get("$ref")
    if ref:
      return _resolve(components[ref.rsplit("/", 1)[-1]], components)
    return {k: _resolve(v, components) for k, v in schema.items()}
  if isinstance(schema, list):
    return [_resolve(v, components) for v in schema]
  return schema


def from_schema(schema: dict):
  """A Hypothesis strategy of instances of `schema`: the JSON Schema subset /openapi.json uses
  (type, enum, anyOf/oneOf, properties/required/additionalProperties: false, min/maxItems,
  maxLength, minimum/maximum). Optional properties are sometimes left out."""
  from hypothesis import strategies as st
  if "enum" in schema:
    return st.sampled_from(schema["enum"])
  alts = schema.get("anyOf") or schema.get("oneOf")
  if alts:
    return st.one_of([from_schema(s) for s in alts])
  t = schema.get("type")
  if t == "null":
    return st.none()
  if t == "string":
    return st.text(max_size=min(schema.get("maxLength", 64), 64)) | st.text(
        min_size=schema.get("maxLength", 64), max_size=schema.get("maxLength", 64))
  if t == "integer":
    lo, hi = schema.get("minimum"), schema.get("maximum")
    return st.integers(lo, hi) | st.sampled_from([v for v in (lo, hi, 0) if v is not None])
  if t == "number":
    lo, hi = schema.get("minimum"), schema.get("maximum")
    edges = [v for v in (lo, hi) if v is not None]
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False) | st.sampled_from(
        edges + [0.0])
  if t == "array":
    return st.lists(from_schema(schema.get("items", {})), min_size=schema.get("minItems", 0),
                    max_size=schema.get("maxItems", 8))
  if t == "object":
    props = schema.get("properties", {})
    required = set(schema.get("required", ()))
    return st.fixed_dictionaries(
        {k: from_schema(v) for k, v in props.items() if k in required},
        optional={k: from_schema(v) for k, v in props.items() if k not in required})
  raise ValueError(f"schema construct not supported: {schema}")


def strategies(doc: dict, small_items: int = 8):
  """(valid, hostile) Hypothesis strategies of request bodies, from the OpenAPI document.

  valid: drawn from the Request schema (items capped at `small_items` to keep cases quick).
  hostile: a valid request with one part made wrong, or arbitrary JSON, or raw bytes.
  """
  from hypothesis import strategies as st
  comps = doc["components"]["schemas"]
  request = _resolve(comps["Request"], comps)
  request["properties"]["items"]["maxItems"] = small_items
  fields = sorted(request["properties"]["items"]["items"]["properties"])
  valid = from_schema(request)
  batch = from_schema({"type": "object", "required": ["requests"],
                       "additionalProperties": False,
                       "properties": {"requests": {"type": "array", "minItems": 1,
                                                   "maxItems": 3, "items": request}}})
  max_chars = request["properties"]["items"]["items"]["properties"][fields[0]]
  max_chars = next((s["maxLength"] for s in max_chars.get("anyOf", []) if "maxLength" in s),
                   256)
  deep = st.integers(1, 200_000).map(lambda d: "[" * d + "]" * d)
  props = request["properties"]["items"]["items"]["properties"]
  numeric = [f for f in fields if any(s.get("type") == "number" and "minimum" in s
                                      for s in props[f].get("anyOf", []))]
  out_of_range = st.sampled_from([1e308, -1e308, 1.7976931348623157e308, 1e39, 2 ** 63])
  bad_value = st.one_of(
      st.integers(min_value=2 ** 64, max_value=10 ** 400), st.integers(max_value=-2 ** 64),
      st.text(min_size=max_chars + 1, max_size=max_chars * 4),
      st.just("x" * 200_000),
      st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
      st.lists(st.lists(st.integers(), max_size=3), min_size=1, max_size=3),
      st.booleans())
  json_value = st.recursive(
      st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False,
                                                            allow_infinity=False) | st.text(),
      lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=4), max_leaves=20)

  @st.composite
  def mutated(draw):
    req = draw(valid)
    kind = draw(st.sampled_from(["misspelt", "unknown", "value", "user_value", "items_type",
                                 "scenario", "top_key", "many_items"]))
    item = req["items"][0]
    if kind == "misspelt":
      f = draw(st.sampled_from(fields))
      item[f[:-1] + f[-1].swapcase() if f[-1].isalpha() else f + "_"] = item.pop(f, "1")
    elif kind == "unknown":
      item[draw(st.text(min_size=1, max_size=20).filter(lambda k: k not in fields))] = 1
    elif kind == "value":
      f = draw(st.sampled_from(fields))
      item[f] = draw(bad_value | out_of_range if f in numeric else bad_value)
    elif kind == "user_value":
      f = draw(st.sampled_from(fields))
      req["user"] = {f: draw(bad_value | out_of_range if f in numeric else bad_value)}
    elif kind == "items_type":
      req["items"] = draw(st.one_of(st.just([]), json_value.filter(
          lambda v: not isinstance(v, list))))
    elif kind == "scenario":
      req["scenario"] = draw(json_value.filter(
          lambda v: v not in request["properties"]["scenario"]["enum"]))
    elif kind == "top_key":
      req[draw(st.text(min_size=1, max_size=10).filter(
          lambda k: k not in ("scenario", "user", "items")))] = 1
    else:  # a long shared user field copied to many items (the 3-5 GB report)
      req["user"] = {fields[0]: "u" * draw(st.integers(max_chars + 1, 200_000))}
      req["items"] = [{}] * draw(st.integers(1, 2000))
    return json.dumps(req).encode()

  hostile = st.one_of(
      mutated(),
      deep.map(str.encode),
      st.builds(lambda d, v: json.dumps({"scenario": v, "items": [{}]})[:-3].encode()
                + b"[" * d + b"]" * d + b"}]}", st.integers(1, 100_000),
                st.sampled_from(request["properties"]["scenario"]["enum"])),
      json_value.map(lambda v: json.dumps(v).encode()),
      st.binary(max_size=200),
      st.sampled_from([b"NaN", b"[Infinity]", b'{"scenario": 1e400, "items": [{}]}',
                       b"9" * 5000, b'{"requests": []}', b'{"requests": [{"x": 1}]}']))
  return valid.map(lambda r: ("valid", r)) | batch.map(lambda r: ("batch", r)), hostile


# ---------------------------------------------------------------------------- run
def _probabilities_ok(body: dict, kind: str, req) -> bool:
  import math
  if kind == "valid":
    probs = [body["probabilities"]]
    want = [len(req["items"])]
  else:
    probs = [r["probabilities"] for r in body["results"]]
    want = [len(r["items"]) for r in req["requests"]]
  return [len(p) for p in probs] == want and all(
      isinstance(x, float) and math.isfinite(x) and 0.0 <= x <= 1.0 for p in probs for x in p)


def _explanations_ok(body: dict, kind: str, req) -> bool:
  """One explanation per item: finite logit, baseline logit, probability in [0, 1] and a
  finite contribution for every feature the response names."""
  import math
  if kind == "valid":
    groups, want = [body["items"]], [len(req["items"])]
  else:
    groups = [r["items"] for r in body["results"]]
    want = [len(r["items"]) for r in req["requests"]]
  feats = body["features"]
  finite = lambda x: isinstance(x, float) and math.isfinite(x)  # noqa: E731
  return [len(g) for g in groups] == want and all(
      finite(it["logit"]) and finite(it["baseline_logit"]) and 0.0 <= it["probability"] <= 1.0
      and list(it["contributions"]) == feats and all(finite(v) for v in
                                                     it["contributions"].values())
      for g in groups for it in g)


def request_paths(doc: dict) -> list[str]:
  """The POST endpoints of the document that take the Request schema."""
  return sorted(p for p, ops in doc["paths"].items()
                if "Request" in json.dumps(ops.get("post", {}).get("requestBody", {})))


def fuzz(url: str, doc: dict, *, cases: int, seconds: float, seed: int = 0,
         timeout_s: float = 30.0, log=print) -> dict:
  """Send `cases` generated requests (or until `seconds`), each to one of the endpoints that
  take the Request schema: returns counts (per endpoint too) and failures."""
  import httpx
  from hypothesis import HealthCheck, given, settings, strategies as st
  valid, hostile = strategies(doc)
  paths = request_paths(doc)
  stats = {"cases": 0, "status": collections.Counter(), "kinds": collections.Counter(),
           "paths": collections.Counter(), "failures": [], "max_latency_s": 0.0}
  t_end = time.time() + seconds
  client = httpx.Client(base_url=url, timeout=timeout_s,
                        headers={"content-type": "application/json"})

  def record(kind, status, latency, problem, body, path):
    stats["cases"] += 1
    stats["paths"][path, status] += 1
    stats["status"][status] += 1
    stats["kinds"][kind] += 1
    stats["max_latency_s"] = max(stats["max_latency_s"], latency)
    if problem and len(stats["failures"]) < 20:
      stats["failures"].append({"path": path, "kind": kind, "status": status,
                                "problem": problem,
                                "body": body[:300].decode("utf-8", "replace"),
                                "tail": body[-200:].decode("utf-8", "replace")})
    if stats["cases"] % 500 == 0:
      log(f"  {stats['cases']} cases, status {dict(stats['status'])}, "
          f"max latency {stats['max_latency_s']:.2f} s")

  @settings(max_examples=cases, deadline=None, database=None, derandomize=False,
            suppress_health_check=list(HealthCheck), phases=["generate"])
  @given(st.one_of(valid, hostile.map(lambda b: ("hostile", b))), st.sampled_from(paths),
         st.randoms())
  def case(drawn, path, _rng):
    if time.time() > t_end:
      return
    kind, req = drawn
    body = req if isinstance(req, bytes) else json.dumps(req).encode()
    t = time.perf_counter()
    try:
      r = client.post(path, content=body)
    except httpx.TimeoutException:
      record(kind, "timeout", time.perf_counter() - t, "no answer within timeout", body, path)
      return
    latency = time.perf_counter() - t
    problem = None
    if r.status_code >= 500:
      problem = f"5xx: {r.text[:300]}"
    elif kind == "hostile" and r.status_code < 400:
      problem = "hostile input accepted"
    elif kind != "hostile":
      if r.status_code != 200:
        problem = f"valid request refused: {r.text[:300]}"
      elif path == "/v1/explain" and not _explanations_ok(r.json(), kind, req):
        problem = "wrong number of explanations or a non-finite number in one"
      elif path != "/v1/explain" and not _probabilities_ok(r.json(), kind, req):
        problem = "wrong number of probabilities or a non-finite one"
    if r.status_code == 422 and not r.json().get("errors"):
      problem = "422 without per-field errors"
    record(kind, r.status_code, latency, problem, body, path)

  case()
  client.close()
  return stats


def swap_load(url: str, model_dir: str, versions: list[str], stop: threading.Event,
              request: dict, clients: int = 4, swap_every_s: float = 0.5) -> dict:
  """Valid requests from `clients` threads while CURRENT cycles through `versions`."""
  import httpx
  out = {"sent": 0, "ok": 0, "lost": [], "versions": collections.Counter(), "swaps": 0}
  lock = threading.Lock()

  def client():
    with httpx.Client(base_url=url, timeout=60) as c:
      while not stop.is_set():
        try:
          r = c.post("/v1/predict", json=request)
          ok = r.status_code == 200 and len(r.json()["probabilities"]) == len(request["items"])
          v = r.json().get("version") if ok else None
        except Exception as e:  # noqa: BLE001 — any failure is a lost request
          ok, v, r = False, None, e
        with lock:
          out["sent"] += 1
          if ok:
            out["ok"] += 1
            out["versions"][v] += 1
          elif len(out["lost"]) < 10:
            out["lost"].append(str(getattr(r, "text", r))[:300])

  def swapper():
    k = 0
    while not stop.wait(swap_every_s):
      k += 1
      point_current(model_dir, versions[k % len(versions)])
      out["swaps"] += 1

  threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
  threads.append(threading.Thread(target=swapper, daemon=True))
  for t in threads:
    t.start()
  out["threads"] = threads
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", help="exported model dir (default: train a tiny one)")
  p.add_argument("--cases", type=int, default=5000)
  p.add_argument("--seconds", type=float, default=900)
  p.add_argument("--timeout-s", type=float, default=30.0, help="per request: slower = hang")
  p.add_argument("--rss-bound-mb", type=float, default=1500)
  args = p.parse_args(argv)
  tmp = tempfile.mkdtemp(prefix="serve_fuzz_")
  try:
    t0 = time.time()
    if args.model:
      model_dir = os.path.join(tmp, "model")
      shutil.copytree(args.model, model_dir)
    else:
      model_dir = make_model(tmp)
    from mscenario.serve import predictor as pred_lib
    v1 = pred_lib.current_version_name(model_dir)
    v2 = add_version(model_dir, 0.5)
    point_current(model_dir, v1)
    print(f"model ready in {time.time() - t0:.0f} s: {model_dir} ({v1}, {v2})", flush=True)
    server = Server(model_dir, "--watch-interval-s", "0.1")
    rss = RssSampler(server.proc.pid)
    rss.start()
    import httpx
    doc = httpx.get(f"{server.url}/openapi.json").json()
    scen = doc["components"]["schemas"]["Request"]["properties"]["scenario"]["enum"][0]
    stop = threading.Event()
    load = swap_load(server.url, model_dir, [v1, v2], stop,
                     {"scenario": scen, "user": {}, "items": [{}] * 5})
    t0 = time.time()
    stats = fuzz(server.url, doc, cases=args.cases, seconds=args.seconds,
                 timeout_s=args.timeout_s)
    elapsed = time.time() - t0
    stop.set()
    for t in load.pop("threads"):
      t.join(70)
    peak = rss.stop()
    err = server.close()
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  five = sum(n for s, n in stats["status"].items() if isinstance(s, int) and s >= 500)
  print(f"\ncases tried: {stats['cases']} in {elapsed:.0f} s ({dict(stats['kinds'])})")
  print(f"status codes: {dict(sorted(stats['status'].items(), key=str))}")
  print(f"per endpoint: {dict(sorted(stats['paths'].items(), key=str))}")
  print(f"5xx: {five}; timeouts (> {args.timeout_s:g} s): {stats['status'].get('timeout', 0)}")
  print(f"max latency: {stats['max_latency_s']:.3f} s")
  print(f"server RSS: start {rss.start_rss / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB "
        f"(bound {args.rss_bound_mb:g} MiB)")
  print(f"hot-swap load: {load['sent']} sent, {load['ok']} ok, "
        f"{load['sent'] - load['ok']} lost, {load['swaps']} swaps, "
        f"versions {dict(load['versions'])}")
  for f in stats["failures"]:
    print("FAILURE", json.dumps(f)[:600])
  for lost in load["lost"]:
    print("LOST", lost)
  ok = (not stats["failures"] and load["sent"] == load["ok"]
        and peak / 2**20 < args.rss_bound_mb)
  if not ok and err:
    print("server stderr (tail):", err[-2000:])
  print("PASS" if ok else "FAIL")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())

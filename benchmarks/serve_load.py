"""Load and latency of `mscenario serve` on loopback (bounded in requests and seconds).

Starts the server as its own process (so the load generator does not share its GIL), then
drives it with C concurrent keep-alive connections, each sending its next request when the
previous answer arrives (closed loop), for 1/16/64 clients x 1/100-item requests; plus an
open-loop run at a fixed request rate (latency measured from the *scheduled* send time, so a
slow server cannot hide its queueing). Every response must be HTTP 200 with one probability
per item; failures are counted and reported.

  python benchmarks/serve_load.py --model MODEL_DIR          # an exported model
  python benchmarks/serve_load.py                             # trains + exports a tiny one
  python benchmarks/serve_load.py --endpoint /v1/explain      # explanations (same requests)

The client is a few lines of asyncio over raw keep-alive HTTP/1.1: a full HTTP client library
would cost more CPU than the server on a 2-core machine and measure itself.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def tiny_model(tmp: str) -> str:
  """Train + export the tests' tiny synthetic model (a benchmark needs no download)."""
  from tests.helpers import SYNTHETIC, TINY
  env = {**os.environ, "MSCENARIO_CACHE": os.path.join(tmp, "cache")}
  work, model = os.path.join(tmp, "run"), os.path.join(tmp, "model")
  for args in (["train", "--config", SYNTHETIC, "--workdir", work, *TINY],
               ["export", "--workdir", work, "--out", model]):
    subprocess.run([sys.executable, "-m", "mscenario", *args], check=True, env=env, cwd=REPO,
                   stdout=subprocess.DEVNULL)
  return model


def payloads(model_dir: str, n_items: int, count: int, seed: int = 0) -> list[bytes]:
  """Random valid requests from the model's own vocabularies (some values unseen: OOV)."""
  from mscenario.serve.predictor import resolve_version_dir
  with open(os.path.join(resolve_version_dir(model_dir), "transform.json")) as f:
    state = json.load(f)
  rng = random.Random(seed)
  cols = {}
  for name, spec in state["features"].items():
    voc = state["vocabs"].get(name, {}).get("values")
    if voc:
      cols[spec.get("column", name)] = voc
  user_cols = [c for c in cols if c in (state["user_field"], "gender", "age_bucket", "region",
                                              "occupation", "zip_code")]
  scenarios = state["scenario"]["names"]
  out = []
  for _ in range(count):
    user = {c: rng.choice(cols[c]) for c in user_cols}
    items = [{c: (rng.choice(v) if rng.random() > 0.02 else "unseen") for c, v in cols.items()
              if c not in user_cols} for _ in range(n_items)]
    out.append(json.dumps({"scenario": rng.choice(scenarios), "user": user,
                           "items": items}).encode())
  return out


ENDPOINT = "/v1/predict"  # --endpoint


class Conn:
  def __init__(self, host: str, port: int):
    self.host, self.port = host, port

  async def open(self):
    self.r, self.w = await asyncio.open_connection(self.host, self.port)

  async def post(self, body: bytes) -> tuple[int, bytes]:
    self.w.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % (ENDPOINT.encode(), self.host.encode(),
                                                len(body)) + body)
    head = await self.r.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = next(int(l.split(b":")[1]) for l in lines if l.lower().startswith(
        b"content-length:"))
    return status, await self.r.readexactly(length)

  def close(self):
    self.w.close()


def _check(status: int, body: bytes, n_items: int) -> bool:
  if status != 200:
    return False
  out = json.loads(body)
  return len(out["items"] if ENDPOINT == "/v1/explain" else out["probabilities"]) == n_items


async def closed_loop(host, port, bodies, n_items, clients, max_requests, max_seconds):
  conns = [Conn(host, port) for _ in range(clients)]
  await asyncio.gather(*(c.open() for c in conns))
  lat, failed = [], 0
  sent = 0
  t_end = time.perf_counter() + max_seconds

  async def worker(c, k):
    nonlocal sent, failed
    i = k
    while sent < max_requests and time.perf_counter() < t_end:
      sent += 1
      t = time.perf_counter()
      try:
        status, body = await c.post(bodies[i % len(bodies)])
        ok = _check(status, body, n_items)
      except Exception:  # noqa: BLE001 — counted, not fatal
        ok = False
      lat.append(time.perf_counter() - t)
      failed += not ok
      i += clients

  t0 = time.perf_counter()
  await asyncio.gather(*(worker(c, k) for k, c in enumerate(conns)))
  wall = time.perf_counter() - t0
  for c in conns:
    c.close()
  return _summary(lat, failed, wall, n_items)


async def open_loop(host, port, bodies, n_items, rate, seconds, conns_n=32):
  """Requests at `rate`/s for `seconds`; latency from the scheduled send time."""
  conns = [Conn(host, port) for _ in range(conns_n)]
  await asyncio.gather(*(c.open() for c in conns))
  free = asyncio.Queue()
  for c in conns:
    free.put_nowait(c)
  lat, failed = [], 0
  total = int(rate * seconds)
  t0 = time.perf_counter()

  async def one(i):
    nonlocal failed
    scheduled = t0 + i / rate
    await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
    c = await free.get()
    try:
      status, body = await c.post(bodies[i % len(bodies)])
      ok = _check(status, body, n_items)
    except Exception:  # noqa: BLE001
      ok = False
    free.put_nowait(c)
    lat.append(time.perf_counter() - scheduled)
    failed += not ok

  await asyncio.gather(*(one(i) for i in range(total)))
  wall = time.perf_counter() - t0
  for c in conns:
    c.close()
  return _summary(lat, failed, wall, n_items)


def _summary(lat, failed, wall, n_items) -> dict:
  a = np.asarray(lat) * 1000
  n = len(a)
  return {"requests": n, "failed": int(failed), "seconds": round(wall, 2),
          "req_per_s": round(n / wall, 1), "pred_per_s": round(n * n_items / wall),
          "p50_ms": round(float(np.percentile(a, 50)), 2) if n else None,
          "p99_ms": round(float(np.percentile(a, 99)), 2) if n else None}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", help="exported model dir (default: train + export a tiny one)")
  p.add_argument("--clients", default="1,16,64")
  p.add_argument("--items", default="1,100")
  p.add_argument("--max-requests", type=int, default=3000, help="per cell")
  p.add_argument("--max-seconds", type=float, default=8.0, help="per cell")
  p.add_argument("--rate", type=float, default=500.0, help="open-loop single-item req/s")
  p.add_argument("--rate-seconds", type=float, default=5.0)
  p.add_argument("--max-batch-wait-ms", type=float, default=0.5)
  p.add_argument("--endpoint", default="/v1/predict", choices=["/v1/predict", "/v1/explain"])
  p.add_argument("--out", help="write the results as JSON here")
  args = p.parse_args()
  global ENDPOINT
  ENDPOINT = args.endpoint
  tmp = tempfile.mkdtemp(prefix="serve_load_")
  model = args.model or tiny_model(tmp)
  port = _free_port()
  server = subprocess.Popen([sys.executable, "-m", "mscenario", "serve", "--model", model,
                             "--port", str(port), "--max-batch-wait-ms",
                             str(args.max_batch_wait_ms), "--watch-interval-s", "0"],
                            cwd=REPO, stdout=subprocess.DEVNULL)
  results = {"cells": [], "cpus": os.cpu_count(), "endpoint": args.endpoint}
  try:
    deadline = time.time() + 120
    while True:
      try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
        break
      except OSError:
        if time.time() > deadline or server.poll() is not None:
          raise SystemExit("server did not start")
        time.sleep(0.2)
    for n_items in [int(x) for x in args.items.split(",")]:
      bodies = payloads(model, n_items, 200)
      most = max(int(x) for x in args.clients.split(","))  # warm-up: every batch size
      asyncio.run(closed_loop("127.0.0.1", port, bodies, n_items, most, 4 * most, 60))
      for clients in [int(x) for x in args.clients.split(",")]:
        r = asyncio.run(closed_loop("127.0.0.1", port, bodies, n_items, clients,
                                    args.max_requests, args.max_seconds))
        r.update(mode="closed", clients=clients, items=n_items)
        results["cells"].append(r)
        print(json.dumps(r), flush=True)
    if args.rate > 0:
      bodies = payloads(model, 1, 200)
      r = asyncio.run(open_loop("127.0.0.1", port, bodies, 1, args.rate, args.rate_seconds))
      r.update(mode=f"open {args.rate:g} req/s", clients=32, items=1)
      results["cells"].append(r)
      print(json.dumps(r), flush=True)
  finally:
    server.terminate()
    server.wait(timeout=30)
  print("\n| mode | clients | items/request | requests | failed | p50 ms | p99 ms | req/s | "
        "predictions/s |\n|---|---|---|---|---|---|---|---|---|")
  for r in results["cells"]:
    print(f"| {r['mode']} | {r['clients']} | {r['items']} | {r['requests']} | {r['failed']} | "
          f"{r['p50_ms']} | {r['p99_ms']} | {r['req_per_s']:,} | {r['pred_per_s']:,} |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()

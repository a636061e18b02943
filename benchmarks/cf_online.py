"""What the data.collaborative state costs online: its size, loading it, computing the cf_*
columns of requests (one user x k items, as the server does per request, and large batches,
as `predict` does), and `update`'s refit with new events.

  python benchmarks/cf_online.py --config configs/ml1m_best.py \
      --config.data.root=../shared/data/movielens/ml-1m --config.seed=2022

Reads the prepared data's collaborative.npz (prepares the data first if it is not cached).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from mscenario.config import load_config
from mscenario.data import collaborative as cf
from mscenario.data.prepare import prepare
from mscenario.data.table import RawTable


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", required=True)
  p.add_argument("--requests", type=int, default=500, help="single-user requests to time")
  p.add_argument("--items", type=int, default=10, help="items per request")
  p.add_argument("--batch", type=int, default=100_000, help="rows of the batch timing")
  p.add_argument("--new-events", type=int, default=10_000, help="events the refit adds")
  args, overrides = p.parse_known_args()
  config = load_config(args.config, overrides)
  data = prepare(config, log=lambda *_: None)
  path = os.path.join(data.path, cf.STATE_FILE)
  size = os.path.getsize(path)
  t0 = time.perf_counter()
  model = cf.CFModel.load(path)
  model.pair_index()
  model.user_ids(np.zeros(0, object)), model.item_ids(np.zeros(0, object))
  load_s = time.perf_counter() - t0
  rng = np.random.default_rng(0)
  users, items = model.user_keys, model.item_keys
  s = data.transform.state
  uf, itf = s["user_field"], s["item_field"]

  def table(u, i):
    n = len(u)
    return RawTable({uf: np.asarray(u, object), itf: np.asarray(i, object)},
                    np.zeros(n, np.int32), np.arange(1, n + 1), ["bench"])

  lat = []
  for _ in range(args.requests):
    u = [users[rng.integers(len(users))]] * args.items
    i = [items[k] for k in rng.integers(len(items), size=args.items)]
    t = table(u, i)
    t0 = time.perf_counter()
    cf.add_columns(model, t, uf, itf)
    lat.append(time.perf_counter() - t0)
  lat = np.array(lat) * 1e3
  t = table(users[rng.integers(len(users), size=args.batch)],
            items[rng.integers(len(items), size=args.batch)])
  t0 = time.perf_counter()
  cf.add_columns(model, t, uf, itf)
  batch_s = time.perf_counter() - t0
  n = args.new_events
  new_users = np.array([f"bench-new-{k}" for k in range(n // 20)], object)
  ev_u = np.concatenate([users[rng.integers(len(users), size=n - len(new_users))], new_users])
  ev = table(ev_u, items[rng.integers(len(items), size=n)])
  values = rng.integers(1, 6, n).astype(np.float64)
  t0 = time.perf_counter()
  cf.refit(model, ev, np.ones(n, bool), values, uf, itf, "bench", log=lambda *_: None)
  refit_s = time.perf_counter() - t0
  print(f"| {os.path.basename(data.path)} | {len(model.values):,} interactions, "
        f"{len(model.user_bias):,} x {len(model.item_bias):,} | {size / 2**20:.1f} MiB | "
        f"{load_s:.2f} s | {np.median(lat):.2f} / {np.percentile(lat, 99):.2f} ms | "
        f"{args.batch / batch_s:,.0f} rows/s | {refit_s:.0f} s |")
  print(f"(requests: 1 user x {args.items} items, {args.requests} of them; refit: "
        f"{n:,} new events, {len(new_users):,} new users; load average "
        f"{os.getloadavg()[0]:.1f}; {sys.argv[1:]})")


if __name__ == "__main__":
  main()

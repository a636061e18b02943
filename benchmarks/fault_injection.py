"""Long fault-injection run: kill `mscenario train` at hundreds of random moments.

  python benchmarks/fault_injection.py --kills 200 --terms 50 --out runs/faults.json

Trains a small synthetic config once uninterrupted, then runs trials in fresh work dirs: each
life is killed (SIGKILL, then separately SIGTERM = preemption) after a uniform random delay
within one uninterrupted run's wall time and restarted, up to 4 kills per trial, then left to
finish; every trial's latest and best checkpoints (every array, the loop record) and
results.json are compared bit for bit with the uninterrupted run (tests/faults.py). Prints the
counts recorded in BENCHMARKS.md. The short version runs in CI (tests/test_faults.py).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests import faults  # noqa: E402
from tests.helpers import SYNTHETIC, TINY  # noqa: E402

ARGS = [*TINY, "--config.train.checkpoint_every_steps=10", "--config.train.epochs=2",
        "--config.train.steps_per_call=4"]


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--kills", type=int, default=200, help="SIGKILLs to deliver")
  p.add_argument("--terms", type=int, default=50, help="SIGTERMs (preemptions) to deliver")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--root", default="", help="scratch dir (default: a temp dir)")
  p.add_argument("--out", default="")
  args = p.parse_args()
  root = args.root or tempfile.mkdtemp(prefix="mscenario-faults-")
  cache = os.path.join(root, "jax-cache")
  ref = os.path.join(root, "ref")
  t0 = time.time()
  rc, _, err = faults.run(SYNTHETIC, ref, ARGS, cache)
  assert rc == 0, err[-3000:]
  rc, seconds, err = faults.run(SYNTHETIC, os.path.join(root, "ref2"), ARGS, cache)
  assert rc == 0 and not faults.differences(ref, os.path.join(root, "ref2")), err[-3000:]
  print(f"uninterrupted run: {seconds:.1f}s (warm compilation cache); reference is "
        "reproducible bit for bit", flush=True)
  report = {"config": ARGS, "uninterrupted_seconds": seconds}
  for name, sig, count in (("sigterm", signal.SIGTERM, args.terms),
                           ("sigkill", signal.SIGKILL, args.kills)):
    if count <= 0:
      continue
    report[name] = faults.campaign(SYNTHETIC, os.path.join(root, name), ref, ARGS, cache,
                                   kills=count, window=seconds, seed=args.seed, sig=sig,
                                   log=lambda m: print(f"{name}: {m}", flush=True))
    r = report[name]
    print(f"{name}: {r['kills']} kills over {r['trials']} trials ({r['lives']} process "
          f"lives), phases {r['phases']}, exit codes {r['exit_codes']}, "
          f"{len(r['differences'])} differences", flush=True)
  report["wall_seconds"] = time.time() - t0
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(report, f, indent=2)
  bad = sum(len(report[k]["differences"]) for k in ("sigkill", "sigterm") if k in report)
  sys.exit(1 if bad else 0)


if __name__ == "__main__":
  main()

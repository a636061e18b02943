"""Long fault-injection run: kill `mscenario train` and `mscenario update` at hundreds of
random moments.

  python benchmarks/fault_injection.py --kills 200 --terms 50 \
      --update-kills 100 --update-terms 30 --out runs/faults.json

Trains a small synthetic config once uninterrupted, then runs trials in fresh work dirs: each
life is killed (SIGKILL, then separately SIGTERM = preemption) after a uniform random delay
within one uninterrupted run's wall time and restarted, up to 4 kills per trial, then left to
finish; every trial's latest and best checkpoints (every array, the loop record) and
results.json are compared bit for bit with the uninterrupted run (tests/faults.py).

Then `update`: the finished run is exported (v0001) and updated once uninterrupted (4 epochs on
its last 6,000 rows, some users renamed to new ids, exported as v0002); trials update fresh
copies of the run and its model dir, each life a real `python -m mscenario update` process
killed (SIGKILL, then SIGTERM) after a uniform random delay within one uninterrupted update's
wall time, up to 4 kills per trial, then left to finish; the checkpoints, transform.json,
updates.jsonl and every file of the model dir are compared with the uninterrupted update's.
Prints the counts recorded in BENCHMARKS.md. The short versions run in CI
(tests/test_faults.py).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests import faults  # noqa: E402
from tests.helpers import SYNTHETIC, TINY  # noqa: E402

ARGS = [*TINY, "--config.train.checkpoint_every_steps=10", "--config.train.epochs=2",
        "--config.train.steps_per_call=4", "--config.data.reserve_fraction=0.1"]
UPDATE_ARGS = ["--epochs", "4"]  # as tests/test_faults.py


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--kills", type=int, default=200, help="SIGKILLs to deliver")
  p.add_argument("--terms", type=int, default=50, help="SIGTERMs (preemptions) to deliver")
  p.add_argument("--update-kills", type=int, default=100, help="SIGKILLs during update")
  p.add_argument("--update-terms", type=int, default=30, help="SIGTERMs during update")
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
  if args.update_kills > 0 or args.update_terms > 0:
    report.update(update_campaigns(root, ref, cache, args))
  report["wall_seconds"] = time.time() - t0
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(report, f, indent=2)
  bad = sum(len(report[k]["differences"]) for k in ("sigkill", "sigterm", "update_sigkill",
                                                     "update_sigterm") if k in report)
  sys.exit(1 if bad else 0)


def update_campaigns(root, base, cache, args) -> dict:
  """The update's reference (run twice: reproducible bit for bit), then its campaigns."""
  base_model, events = os.path.join(root, "base-model"), os.path.join(root, "events.csv")
  faults.write_events(SYNTHETIC, ARGS, events, slice(-6000, None))
  done = subprocess.run([sys.executable, "-m", "mscenario", "export", "--workdir", base,
                         "--out", base_model, "--buckets", "8"], cwd=faults.REPO,
                        env=faults.env(cache), capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  refs = []
  for name in ("upd-ref", "upd-ref2"):
    work, model = os.path.join(root, name), os.path.join(root, name + "-model")
    shutil.copytree(base, work)
    shutil.copytree(base_model, model)
    rc, seconds, err = faults.run_update(work, events, model, cache, UPDATE_ARGS)
    assert rc == 0, err[-3000:]
    refs.append((work, model))
  diff = faults.update_differences(*refs[0], *refs[1])
  assert not diff, diff
  print(f"uninterrupted update: {seconds:.1f}s (warm compilation cache); reproducible bit for "
        "bit", flush=True)
  report = {"update_args": UPDATE_ARGS, "update_uninterrupted_seconds": seconds}
  for name, sig, count in (("update_sigterm", signal.SIGTERM, args.update_terms),
                           ("update_sigkill", signal.SIGKILL, args.update_kills)):
    if count <= 0:
      continue
    r = report[name] = faults.update_campaign(
        base, base_model, *refs[0], events, os.path.join(root, name), cache, kills=count,
        window=seconds, seed=args.seed, sig=sig, args=UPDATE_ARGS,
        log=lambda m: print(f"{name}: {m}", flush=True))
    print(f"{name}: {r['kills']} kills over {r['trials']} trials ({r['lives']} process "
          f"lives), phases {r['phases']}, exit codes {r['exit_codes']}, "
          f"{len(r['differences'])} differences", flush=True)
  return report


if __name__ == "__main__":
  main()

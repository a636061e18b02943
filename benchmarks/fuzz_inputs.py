"""The long fuzzing run of every input reader and the --config.x=y override parser (issue 10
§2): the properties of tests/test_fuzz_inputs.py (checked by tests/fuzz_readers.py) for
--cases generated cases per reader (default 10,000). Prints, per reader, the cases tried and
their outcomes: loaded (documented values, checked value by value), skipped (loaded under
data.on_error=skip with every dropped row counted) and user-error (a DataError / ConfigError
naming file, line and field). Any other exception, or a wrong value, fails the run (exit 1)
with Hypothesis' minimal failing case.

  python benchmarks/fuzz_inputs.py [--cases 10000] [--seed 0] [--readers recbole,...]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402

from tests import fuzz_readers  # noqa: E402


def run_reader(name: str, cases: int, rng_seed: int) -> dict:
  strategy, check = fuzz_readers.READERS[name]
  counts = collections.Counter()

  @seed(rng_seed)
  @settings(max_examples=cases, deadline=None, database=None,
            suppress_health_check=list(HealthCheck))
  @given(strategy)
  def run(case):
    counts[check(case)] += 1

  t0 = time.time()
  run()
  # Hypothesis replays a failing case while shrinking; on success every call is one case.
  return {"cases": sum(counts.values()), **dict(sorted(counts.items())),
          "seconds": round(time.time() - t0, 1)}


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--cases", type=int, default=10_000, help="generated cases per reader")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--readers", default=",".join(sorted(fuzz_readers.READERS)))
  p.add_argument("--json", help="also write the counts here")
  args = p.parse_args()
  results, failed = {}, []
  for name in args.readers.split(","):
    try:
      results[name] = run_reader(name, args.cases, args.seed)
    except Exception as e:  # noqa: BLE001 -- report every reader, then fail
      results[name] = {"failed": f"{type(e).__name__}: {e}"[:2000]}
      failed.append(name)
    print(f"{name:18s} {json.dumps(results[name])}", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)
  print("FAILED: " + ", ".join(failed) if failed else "all readers: no traceback, no wrong "
        "value")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())

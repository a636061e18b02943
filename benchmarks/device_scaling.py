"""Examples/s against the number of devices (virtual CPU devices here; real chips elsewhere).

  python benchmarks/device_scaling.py --devices 1,2,4,8 --config configs/ml1m_star.py \
      --root ../shared/data/movielens/ml-1m --steps 40

Each device count runs benchmarks/train_throughput.py in a fresh process with
XLA_FLAGS=--xla_force_host_platform_device_count=N and a data-parallel mesh of N devices
(extra --config.x=y arguments are passed through, e.g. --config.mesh.model=2). On one CPU
the virtual devices share the same cores, so this checks that the sharded program runs and
what its overhead is — not a speed-up.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--devices", default="1,2,4,8")
  p.add_argument("--config", default="configs/ml1m_star.py")
  p.add_argument("--root", default="")
  p.add_argument("--steps", type=int, default=40)
  p.add_argument("overrides", nargs="*")
  args = p.parse_args()
  for n in [int(d) for d in args.devices.split(",")]:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}",
               JAX_PLATFORMS="cpu")
    cmd = [sys.executable, os.path.join(HERE, "train_throughput.py"), "--config", args.config,
           "--steps", str(args.steps), *(["--root", args.root] if args.root else []),
           *args.overrides]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [l for l in done.stdout.splitlines() if "examples/s" in l or l.startswith("model")]
    print(f"--- {n} device(s)")
    print("\n".join(lines) if lines else done.stderr[-1500:], flush=True)


if __name__ == "__main__":
  main()

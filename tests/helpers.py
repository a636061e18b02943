"""Small shared pieces for the training tests."""
from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTHETIC = os.path.join(REPO, "configs", "synthetic.py")

# A tiny but real synthetic run: small model, few rows, fast to compile and train.
TINY = [
    "--config.data.synthetic.num_rows=20000", "--config.data.synthetic.num_users=500",
    "--config.data.synthetic.num_items=300", "--config.model.hidden=(32,16)",
    "--config.model.aux_hidden=(8,)", "--config.model.expert_hidden=(16,)",
    "--config.model.tower_hidden=(8,)", "--config.train.batch_size=512",
    "--config.train.eval_batch_size=4096", "--config.train.epochs=2",
    "--config.train.log_every_steps=5",
]


def run_cli(args, env=None, timeout=600):
  """Run `python -m mscenario ARGS` in a fresh process; returns CompletedProcess."""
  full_env = dict(os.environ)
  full_env.update(env or {})
  return subprocess.run([sys.executable, "-m", "mscenario", *args], capture_output=True,
                        text=True, env=full_env, timeout=timeout, cwd=REPO)

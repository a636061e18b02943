"""Small shared pieces for the training tests."""
from __future__ import annotations

import os
import subprocess
import sys

from mscenario.config import MODEL_DEFAULTS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTHETIC = os.path.join(REPO, "configs", "synthetic.py")

# A tiny but real synthetic run: small model, few rows, fast to compile and train.
_TINY_RUN = [
    "--config.data.synthetic.num_rows=20000", "--config.data.synthetic.num_users=500",
    "--config.data.synthetic.num_items=300", "--config.train.batch_size=512",
    "--config.train.eval_batch_size=4096", "--config.train.epochs=2",
    "--config.train.log_every_steps=5",
]
# Small layers for whichever of these a model has (its subtree c.model.<name>).
_TINY_SIZES = {"hidden": "(32,16)", "aux_hidden": "(8,)", "expert_hidden": "(16,)",
               "tower_hidden": "(8,)"}


def tiny_model(model: str) -> list[str]:
  """Overrides selecting `model` with small layers of its own."""
  return [f"--config.model.name={model}"] + [
      f"--config.model.{model}.{k}={v}" for k, v in _TINY_SIZES.items()
      if k in MODEL_DEFAULTS[model]]


def tiny(model: str = "star") -> list[str]:
  """Overrides for a tiny run of `model`."""
  return [*_TINY_RUN, *tiny_model(model)]


TINY = tiny("star")


def run_cli(args, env=None, timeout=600):
  """Run `python -m mscenario ARGS` in a fresh process; returns CompletedProcess."""
  full_env = dict(os.environ)
  full_env.update(env or {})
  return subprocess.run([sys.executable, "-m", "mscenario", *args], capture_output=True,
                        text=True, env=full_env, timeout=timeout, cwd=REPO)

"""Fault injection for `mscenario train`: kill a run at random moments, restart it until it
finishes, and compare what it leaves with an uninterrupted run's, bit for bit.

Used by tests/test_faults.py (a few kills, in CI) and benchmarks/fault_injection.py (hundreds).
Compared: every array of the latest and the best checkpoint's state (params, optimizer state,
batch statistics, PRNG, step), their recorded loop position, and results.json.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env(cache_dir: str) -> dict:
  """Subprocess environment: one CPU device, a shared persistent compilation cache (restarts
  skip compiling, so more of each life is spent training and checkpointing)."""
  out = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO, JAX_COMPILATION_CACHE_DIR=cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return out


def command(config: str, workdir: str, args) -> list[str]:
  return [sys.executable, "-m", "mscenario", "train", "--config", config, "--workdir",
          str(workdir), *args]


def run(config, workdir, args, cache_dir, timeout=600) -> tuple[int, float, str]:
  t0 = time.perf_counter()
  done = subprocess.run(command(config, workdir, args), cwd=REPO, env=env(cache_dir),
                        capture_output=True, text=True, timeout=timeout)
  return done.returncode, time.perf_counter() - t0, done.stderr


def _phase(workdir) -> str:
  """Roughly where the run was when it was killed (for the record, not the verdict)."""
  if os.path.exists(os.path.join(workdir, "results.json")):
    return "report"
  ckpt = os.path.join(workdir, "ckpt")
  if os.path.isdir(ckpt) and any(d.isdigit() for d in os.listdir(ckpt)):
    return "training (checkpointed)"
  return "start-up / first steps"


def run_with_faults(config, workdir, args, cache_dir, *, kills: int, window: float,
                    rng: np.random.Generator, sig=signal.SIGKILL, timeout=600) -> dict:
  """Start the run, kill it after a uniform random delay in [0, window] s, restart; after
  `kills` kills let it finish. Returns counts: kills delivered, lives, exit codes, phases."""
  delivered, lives, phases, codes = 0, 0, {}, []
  deadline = time.time() + timeout
  while True:
    lives += 1
    proc = subprocess.Popen(command(config, workdir, args), cwd=REPO, env=env(cache_dir),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if delivered < kills:
      delay = float(rng.uniform(0.0, window))
      try:
        proc.wait(timeout=delay)
      except subprocess.TimeoutExpired:
        phase = _phase(workdir)
        proc.send_signal(sig)
        delivered += 1
        phases[phase] = phases.get(phase, 0) + 1
    try:
      _, err = proc.communicate(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
      proc.kill()
      raise AssertionError(f"run did not finish within {timeout}s after {delivered} kills")
    codes.append(proc.returncode)
    if proc.returncode == 0:
      return {"kills": delivered, "lives": lives, "phases": phases, "exit_codes": codes}
    # SIGTERM in the first milliseconds (the interpreter importing the CLI) ends the process
    # the default way; from the train command's start on, it exits 75 (saving if it trained).
    expected = {signal.SIGKILL: (-signal.SIGKILL,), signal.SIGTERM: (75, -signal.SIGTERM)}[sig]
    if proc.returncode not in expected:
      raise AssertionError(f"life {lives} ended with exit code {proc.returncode}, expected "
                           f"{expected}:\n{err[-3000:]}")


def _restore_raw(directory: str):
  steps = [int(d) for d in os.listdir(directory) if d.isdigit()]
  step = max(steps)
  state = ocp.StandardCheckpointer().restore(os.path.join(directory, str(step), "state"))
  with open(os.path.join(directory, str(step), "meta", "metadata")) as f:
    meta = json.load(f)
  return step, state, meta


def differences(ref_dir, other_dir) -> list[str]:
  """What differs between two finished work dirs ([] = bit-identical results)."""
  out = []
  for which in ("ckpt", "best"):
    sa, a, ma = _restore_raw(os.path.join(ref_dir, which))
    sb, b, mb = _restore_raw(os.path.join(other_dir, which))
    if sa != sb:
      out.append(f"{which}: step {sa} vs {sb}")
      continue
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    if [p for p, _ in la] != [p for p, _ in lb]:
      out.append(f"{which}: different state trees")
      continue
    for (path, x), (_, y) in zip(la, lb):
      if not np.array_equal(np.asarray(x), np.asarray(y)):
        out.append(f"{which}{jax.tree_util.keystr(path)} differs")
    if ma != mb:
      out.append(f"{which}: loop records differ")
  ra = json.load(open(os.path.join(ref_dir, "results.json")))
  rb = json.load(open(os.path.join(other_dir, "results.json")))
  if ra != rb:
    out.append("results.json differs")
  return out


def campaign(config, root, ref_dir, args, cache_dir, *, kills: int, window: float, seed: int,
             sig=signal.SIGKILL, per_trial: int = 4, log=lambda *_: None) -> dict:
  """Trials (fresh work dirs) of up to `per_trial` kills each until `kills` were delivered;
  every finished trial is compared with `ref_dir`. Returns totals and any differences."""
  rng = np.random.default_rng(seed)
  total = {"kills": 0, "lives": 0, "trials": 0, "phases": {}, "exit_codes": {},
           "differences": []}
  while total["kills"] < kills:
    workdir = os.path.join(root, f"trial{total['trials']}")
    out = run_with_faults(config, workdir, args, cache_dir,
                          kills=min(per_trial, kills - total["kills"]), window=window,
                          rng=rng, sig=sig)
    total["trials"] += 1
    total["kills"] += out["kills"]
    total["lives"] += out["lives"]
    for k, v in out["phases"].items():
      total["phases"][k] = total["phases"].get(k, 0) + v
    for c in out["exit_codes"]:
      total["exit_codes"][str(c)] = total["exit_codes"].get(str(c), 0) + 1
    diff = differences(ref_dir, workdir)
    total["differences"] += [f"trial {total['trials']}: {d}" for d in diff]
    log(f"trial {total['trials']}: {out['kills']} kills, {out['lives']} lives, "
        f"{'identical' if not diff else diff}; total kills {total['kills']}")
  return total

"""Fault injection for `mscenario train` and `mscenario update`: kill a run at random moments,
restart it until it finishes, and compare what it leaves with an uninterrupted run's, bit for
bit.

Used by tests/test_faults.py (a few kills, in CI) and benchmarks/fault_injection.py (hundreds).
Compared for train: every array of the latest and the best checkpoint's state (params,
optimizer state, batch statistics, PRNG, step), their recorded loop position, and
results.json. For update, also transform.json, updates.jsonl and the exported model directory
(version names, CURRENT, weights, serialized scoring functions, config, transform, manifest);
the only fields left out are wall-clock stamps (an update record's "time", a manifest's
"created") and the manifest's absolute source work dir path.
"""
from __future__ import annotations

import json
import os
import shutil
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
  cmd = command(config, workdir, args)
  return _lives(lambda: _Process(cmd, cache_dir), lambda: _phase(workdir), kills=kills,
                window=window, rng=rng, sig=sig, timeout=timeout)


class _Process:
  """One life as a fresh `python -m mscenario ...` process."""

  def __init__(self, cmd, cache_dir):
    self.proc = subprocess.Popen(cmd, cwd=REPO, env=env(cache_dir), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
    self.stderr = ""

  def wait(self, timeout: float):
    """Exit code, or None if still running after `timeout` s."""
    try:
      _, self.stderr = self.proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      return None
    return self.proc.returncode

  def send_signal(self, sig) -> None:
    self.proc.send_signal(sig)

  def kill(self) -> None:
    self.proc.kill()


_ZYGOTE = r"""
import json, os, sys, traceback
# The heavy imports, once: every life is forked from here (no backend is initialised and
# no thread is running yet, so forking is safe).
import orbax.checkpoint
from mscenario import cli
from mscenario.data import sources
from mscenario.export import writer
from mscenario.train import evaluate, fit, loop, update
for line in sys.stdin:
  req = json.loads(line)
  pid = os.fork()
  if pid == 0:
    code = 1
    try:
      os.dup2(os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
      os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
      code = cli.main(req["argv"])
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else 1
    except BaseException:
      traceback.print_exc()
    finally:
      sys.stderr.flush()
      os._exit(code)
  print(json.dumps({"pid": pid}), flush=True)
  _, status = os.waitpid(pid, 0)
  print(json.dumps({"pid": pid, "rc": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class Zygote:
  """Starts lives of `mscenario ARGS` by forking a process that has already imported the
  training stack, as `python -m mscenario` would run them (cli.main) minus the ~5 s of
  imports before anything is written: the CI version of a campaign can afford more kills.
  The long runs (benchmarks/fault_injection.py) start real processes."""

  def __init__(self, cache_dir: str, scratch: str):
    import queue
    import threading
    self.scratch = scratch
    self.proc = subprocess.Popen([sys.executable, "-c", _ZYGOTE], cwd=REPO, env=env(cache_dir),
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    self.lines = queue.Queue()
    threading.Thread(target=lambda: [self.lines.put(json.loads(x)) for x in self.proc.stdout],
                     daemon=True).start()
    self.n = 0

  def start(self, argv):
    self.n += 1
    return _ZygoteLife(self, argv, os.path.join(self.scratch, f"life{self.n}.err"))

  def close(self) -> None:
    self.proc.stdin.close()
    try:
      self.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
      self.proc.kill()


class _ZygoteLife:
  def __init__(self, zygote: Zygote, argv, err_path: str):
    self.zygote, self.err_path = zygote, err_path
    zygote.proc.stdin.write(json.dumps({"argv": list(argv), "stderr": err_path}) + "\n")
    zygote.proc.stdin.flush()
    self.pid = zygote.lines.get(timeout=60)["pid"]
    self.rc = None

  @property
  def stderr(self) -> str:
    if not os.path.exists(self.err_path):  # the child has not opened it yet
      return ""
    with open(self.err_path, errors="replace") as f:
      return f.read()

  def wait(self, timeout: float):
    import queue
    if self.rc is None:
      try:
        msg = self.zygote.lines.get(timeout=max(timeout, 0.0))
      except queue.Empty:
        return None
      assert msg["pid"] == self.pid, msg
      self.rc = msg["rc"]
    return self.rc

  def send_signal(self, sig) -> None:
    if self.rc is None:
      os.kill(self.pid, sig)

  def kill(self) -> None:
    self.send_signal(signal.SIGKILL)


def _lives(start, phase_of, *, kills, window, rng, sig, timeout) -> dict:
  """Lives from `start()` (a _Process or _ZygoteLife), each but the last killed with `sig`
  after a uniform random delay in [0, window] s, until one exits 0."""
  delivered, lives, phases, codes = 0, 0, {}, []
  deadline = time.time() + timeout
  while True:
    lives += 1
    life = start()
    if delivered < kills and life.wait(float(rng.uniform(0.0, window))) is None:
      phase = phase_of()
      life.send_signal(sig)
      delivered += 1
      phases[phase] = phases.get(phase, 0) + 1
    rc = life.wait(max(1.0, deadline - time.time()))
    if rc is None:
      life.kill()
      raise AssertionError(f"run did not finish within {timeout}s after {delivered} kills")
    codes.append(rc)
    if rc == 0:
      return {"kills": delivered, "lives": lives, "phases": phases, "exit_codes": codes}
    # SIGTERM in the first milliseconds (the interpreter importing the CLI) ends the process
    # the default way; from the command's start on, it exits 75 (train: saving if it trained;
    # update: nothing saved, or, once committing, it finishes and exits 0).
    expected = {signal.SIGKILL: (-signal.SIGKILL,), signal.SIGTERM: (75, -signal.SIGTERM)}[sig]
    if rc not in expected:
      raise AssertionError(f"life {lives} ended with exit code {rc}, expected "
                           f"{expected}:\n{life.stderr[-3000:]}")


def _restore_raw(directory: str):
  if not os.path.isdir(directory) or not any(d.isdigit() for d in os.listdir(directory)):
    return None, None, None
  steps = [int(d) for d in os.listdir(directory) if d.isdigit()]
  step = max(steps)
  state = ocp.StandardCheckpointer().restore(os.path.join(directory, str(step), "state"))
  with open(os.path.join(directory, str(step), "meta", "metadata")) as f:
    meta = json.load(f)
  return step, state, meta


def _strip(obj, keys=("time",)):
  """`obj` without wall-clock fields (an update record's "time"), at any depth."""
  if isinstance(obj, dict):
    return {k: _strip(v, keys) for k, v in obj.items() if k not in keys}
  if isinstance(obj, list):
    return [_strip(v, keys) for v in obj]
  return obj


def differences(ref_dir, other_dir, results: bool = True) -> list[str]:
  """What differs between two finished work dirs ([] = bit-identical results)."""
  out = []
  for which in ("ckpt", "best"):
    sa, a, ma = _restore_raw(os.path.join(ref_dir, which))
    sb, b, mb = _restore_raw(os.path.join(other_dir, which))
    ma, mb = _strip(ma), _strip(mb)
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
  if results:
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


# ---------------------------------------------------------------------------- update
def update_command(workdir, events, model_dir, args=()) -> list[str]:
  return [sys.executable, "-m", "mscenario", "update", "--workdir", str(workdir), "--data",
          str(events), "--out", str(model_dir), "--buckets", "8", *args]


def run_update(workdir, events, model_dir, cache_dir, args=(), timeout=600):
  t0 = time.perf_counter()
  done = subprocess.run(update_command(workdir, events, model_dir, args), cwd=REPO,
                        env=env(cache_dir), capture_output=True, text=True, timeout=timeout)
  return done.returncode, time.perf_counter() - t0, done.stderr


def _update_phase(workdir, model_dir, base_step: int) -> str:
  """Where the update was when it was killed, from what it had written (for the record)."""
  if os.path.isdir(model_dir) and len([d for d in os.listdir(os.path.join(
      model_dir, "versions")) if d.startswith("v")]) > 1:
    return "after the export"
  transform = json.load(open(os.path.join(workdir, "transform.json")))
  if transform.get("updates"):
    return "export"
  ckpt = os.path.join(workdir, "ckpt")
  names = os.listdir(ckpt)
  if any(d.isdigit() and int(d) > base_step for d in names):
    return "commit (best/, updates.jsonl, transform.json)"
  if any(not d.isdigit() and "tmp" in d for d in names):
    return "checkpoint write"
  return "start-up / training"


def write_events(config_path: str, args, path: str, rows: slice, new_users: int = 20) -> None:
  """New events for `update`: rows of the synthetic data set as CSV, the users of the first
  rows renamed to ids never seen in training (so the vocabularies grow)."""
  import csv

  from mscenario.config import load_config
  from mscenario.data import synthetic
  table = synthetic.load_raw(load_config(config_path, list(args)).data)
  cols = sorted(table.columns)
  idx = np.arange(len(table.columns["label"]))[rows]
  users = list(dict.fromkeys(table.columns["user_id"][idx].tolist()))[:new_users]
  renamed = {u: f"new-user-{k}" for k, u in enumerate(users)}
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(cols)
    for i in idx:
      row = {c: table.columns[c][i] for c in cols}
      row["user_id"] = renamed.get(row["user_id"], row["user_id"])
      w.writerow([row[c] for c in cols])


def model_dir_differences(ref, other) -> list[str]:
  """What differs between two exported model dirs (versions, CURRENT, every file)."""
  def listing(d):
    return sorted(d_ for d_ in os.listdir(os.path.join(d, "versions")) if d_.startswith("v"))
  out = []
  la, lb = listing(ref), listing(other)
  if la != lb:
    return [f"model versions {la} vs {lb}"]
  if open(os.path.join(ref, "CURRENT")).read() != open(os.path.join(other, "CURRENT")).read():
    out.append("CURRENT differs")
  for v in la:
    a, b = os.path.join(ref, "versions", v), os.path.join(other, "versions", v)
    files = lambda d: sorted(os.path.relpath(os.path.join(r, f), d)  # noqa: E731
                             for r, _, fs in os.walk(d) for f in fs)
    if files(a) != files(b):
      out.append(f"{v}: files {files(a)} vs {files(b)}")
      continue
    for rel in files(a):
      pa, pb = os.path.join(a, rel), os.path.join(b, rel)
      if rel == "manifest.json":
        ma, mb = json.load(open(pa)), json.load(open(pb))
        for m in (ma, mb):
          m.pop("created", None)
          m.get("source", {}).pop("workdir", None)
        same = ma == mb
      elif rel == "transform.json":
        same = _strip(json.load(open(pa))) == _strip(json.load(open(pb)))
      else:
        same = open(pa, "rb").read() == open(pb, "rb").read()
      if not same:
        out.append(f"{v}/{rel} differs")
  return out


def update_differences(ref_dir, ref_model, other_dir, other_model) -> list[str]:
  """What differs between two work dirs (and model dirs) after the same update."""
  from mscenario.metrics.plots import read_jsonl
  out = differences(ref_dir, other_dir)
  ta = json.load(open(os.path.join(ref_dir, "transform.json")))
  tb = json.load(open(os.path.join(other_dir, "transform.json")))
  if _strip(ta) != _strip(tb):
    out.append("transform.json differs")
  ua = read_jsonl(os.path.join(ref_dir, "updates.jsonl"))
  ub = read_jsonl(os.path.join(other_dir, "updates.jsonl"))
  if _strip(ua) != _strip(ub):
    out.append(f"updates.jsonl differs ({len(ua)} vs {len(ub)} records)")
  return out + model_dir_differences(ref_model, other_model)


def update_campaign(base_dir, base_model, ref_dir, ref_model, events, root, cache_dir, *,
                    kills: int, window: float, seed: int, sig=signal.SIGKILL,
                    per_trial: int = 4, args=(), zygote: Zygote | None = None,
                    log=lambda *_: None) -> dict:
  """Trials of `update` on fresh copies of a trained work dir and its model dir, killed up
  to `per_trial` times each and rerun until it succeeds, until `kills` were delivered; each
  finished trial is compared with the uninterrupted update (`ref_dir`, `ref_model`). Lives
  are real processes, or forks of `zygote`."""
  rng = np.random.default_rng(seed)
  base_step = max(int(d) for d in os.listdir(os.path.join(base_dir, "ckpt")) if d.isdigit())
  total = {"kills": 0, "lives": 0, "trials": 0, "phases": {}, "exit_codes": {},
           "differences": []}
  while total["kills"] < kills:
    trial = os.path.join(root, f"trial{total['trials']}")
    workdir, model = os.path.join(trial, "work"), os.path.join(trial, "model")
    shutil.copytree(base_dir, workdir)
    shutil.copytree(base_model, model)
    cmd = update_command(workdir, events, model, args)
    start = ((lambda: zygote.start(cmd[3:])) if zygote is not None   # after `-m mscenario`
             else (lambda: _Process(cmd, cache_dir)))
    out = _lives(start, lambda: _update_phase(workdir, model, base_step),
                 kills=min(per_trial, kills - total["kills"]), window=window, rng=rng,
                 sig=sig, timeout=600)
    total["trials"] += 1
    total["kills"] += out["kills"]
    total["lives"] += out["lives"]
    for k, v in out["phases"].items():
      total["phases"][k] = total["phases"].get(k, 0) + v
    for c in out["exit_codes"]:
      total["exit_codes"][str(c)] = total["exit_codes"].get(str(c), 0) + 1
    diff = update_differences(ref_dir, ref_model, workdir, model)
    total["differences"] += [f"trial {total['trials']}: {d}" for d in diff]
    log(f"trial {total['trials']}: {out['kills']} kills, {out['lives']} lives, "
        f"{'identical' if not diff else diff}; total kills {total['kills']}")
    if not diff:
      shutil.rmtree(trial, ignore_errors=True)
  return total

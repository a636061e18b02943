"""The files of a run's work dir: what they are called, how they are written, how a run's
state is restored from them.

Every file a later command reads (config.json, transform.json, data.json, results.json, …) is
written to a temporary file in the same directory and renamed over the old one, so a process
killed at any moment leaves the previous or the new file, never a torn one. metrics.jsonl is
append-only and read tolerantly (a torn last line is dropped).

One place opens a work dir and restores its best or latest checkpoint; train, eval, predict,
export and update all go through it.
"""
from __future__ import annotations

import json
import os
import tempfile

from mscenario import config as config_lib
from mscenario.data.transform import Transform
from mscenario.errors import MscenarioError
from mscenario.metrics.plots import read_jsonl
from mscenario.train import checkpoint as ckpt_lib

CONFIG = "config.json"
TRANSFORM = "transform.json"
DATA = "data.json"
VERSIONS = "versions.json"
RESULTS = "results.json"
METRICS = "metrics.jsonl"
UPDATES = "updates.jsonl"


def write_text(path: str, text: str) -> None:
  """Atomic replace of `path` by `text` (temp file in the same dir, fsync, rename)."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_json(path: str, obj, **kwargs) -> None:
  write_text(path, json.dumps(obj, **kwargs))


def append_jsonl(path: str, record: dict) -> None:
  """One line, flushed; a kill mid-line leaves a torn last line that read_jsonl drops."""
  with open(path, "a", encoding="utf-8") as f:
    f.write(json.dumps(record) + "\n")


class WorkDir:
  """A training run's directory: its files and its checkpoints."""

  def __init__(self, path: str):
    self.path = os.path.abspath(path)

  def file(self, name: str) -> str:
    return os.path.join(self.path, name)

  def exists(self, name: str) -> bool:
    return os.path.exists(self.file(name))

  def require(self, *names: str) -> None:
    for name in names:
      if not self.exists(name):
        raise MscenarioError(f"{self.file(name)} is missing: is {self.path} the work dir of a "
                             "training run?")

  def read_json(self, name: str):
    with open(self.file(name), encoding="utf-8") as f:
      return json.load(f)

  def read_config(self, overrides=()):
    """The run's resolved config (config.json), with optional --config.x=y overrides."""
    self.require(CONFIG)
    with open(self.file(CONFIG), encoding="utf-8") as f:
      config = config_lib.from_json(f.read())
    return config_lib.apply_overrides(config, overrides) if overrides else config

  def read_transform(self):
    """The fitted transform (vocabularies, normalisers; grown by `update`)."""
    self.require(TRANSFORM)
    return Transform(self.read_json(TRANSFORM))

  def read_metrics(self) -> list[dict]:
    return read_jsonl(self.file(METRICS)) if self.exists(METRICS) else []

  def has_checkpoint(self) -> bool:
    """Without creating anything (Checkpoints() would make empty ckpt/ and best/ dirs)."""
    ckpt = self.file("ckpt")
    return os.path.isdir(ckpt) and any(d.isdigit() for d in os.listdir(ckpt))

  def checkpoints(self, keep: int) -> ckpt_lib.Checkpoints:
    return ckpt_lib.Checkpoints(self.path, keep)

  def restore(self, abstract_state, which: str = "best", keep: int = 2):
    """(state, meta) of the best checkpoint (falling back to the latest) or of the latest;
    a clear error when the run has none yet. `abstract_state` carries the target shardings."""
    if which not in ("best", "latest"):
      raise ValueError(f"which={which!r}: expected 'best' or 'latest'")
    ckpts = self.checkpoints(keep)
    try:
      restored = ckpts.restore_best(abstract_state) if which == "best" else None
      if restored is None:
        restored = ckpts.restore_latest(abstract_state)
    finally:
      ckpts.close()
    if restored is None:
      raise MscenarioError(f"{self.path} holds no checkpoint yet; train first with "
                           f"`mscenario train --config ... --workdir {self.path}`")
    return restored

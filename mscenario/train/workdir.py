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
from mscenario.data import collaborative
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
COLLABORATIVE = collaborative.STATE_FILE  # data.collaborative: the CF state (update refits it)


def write_text(path: str, text: str) -> None:
  """Atomic replace of `path` by `text`, UTF-8 (see write_bytes)."""
  write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str, data: bytes) -> None:
  """Atomic replace of `path` by `data` (temp file in the same dir, fsync, rename)."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
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

  def read_collaborative(self, transform_state: dict) -> "collaborative.CFModel | None":
    """The run's collaborative-filtering state (None unless data.collaborative is on).

    A run gets it from the prepared data it was trained on (data.json's path, checked by
    fingerprint) the first time it is asked for, copied here atomically: from then on the run
    carries it (`update` refreshes this copy) and no longer needs the data cache.
    """
    if "collaborative" not in transform_state:
      return None
    if not self.exists(COLLABORATIVE):
      self._copy_collaborative()
    model = collaborative.CFModel.load(self.file(COLLABORATIVE))
    if model.user_keys is None:  # state version 1: ids were the transform's vocabularies
      model.set_keys(transform_state["user_vocab"], transform_state["item_vocab"])
    return model

  def _copy_collaborative(self) -> None:
    """Copy the CF state from the prepared-data dir recorded in data.json."""
    self.require(DATA)
    info = self.read_json(DATA)
    src = os.path.join(info.get("path", ""), COLLABORATIVE)
    meta = os.path.join(info.get("path", ""), "meta.json")
    same = False
    if os.path.exists(src) and os.path.exists(meta):
      with open(meta, encoding="utf-8") as f:
        same = json.load(f).get("fingerprint") == info.get("fingerprint")
    if not same:
      raise MscenarioError(
          f"{self.file(COLLABORATIVE)} is missing and the prepared data the run was trained "
          f"on ({info.get('path')}, fingerprint {info.get('fingerprint')}) no longer holds "
          "it: the data.collaborative features of new rows cannot be computed. Prepare the "
          "same data again (`mscenario data prepare` with the run's config and data) and retry")
    with open(src, "rb") as f:
      write_bytes(self.file(COLLABORATIVE), f.read())

  def write_collaborative(self, model: "collaborative.CFModel") -> None:
    write_bytes(self.file(COLLABORATIVE), model.to_bytes())

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

"""Input pipeline: shuffled, fixed-shape, host-sharded batches, prefetched onto devices.

Every process computes the same global order (seeded by (seed, epoch)) and gathers only its
own contiguous slice of each global batch, so hosts never exchange data and resuming at
(epoch, batch) reproduces exactly the batches an uninterrupted run would have seen.

The last partial batch: training drops it (fixed shapes; the epoch's reshuffle puts those rows
in full batches next epoch); evaluation pads it with weight-0 rows so every row is scored once.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator

import jax
import numpy as np

from mscenario.data.prepare import PreparedData
from mscenario.errors import ConfigError

DEVICE_KEYS = ("sparse", "multi", "dense", "scenario", "label", "item", "weight",
               "hist_item", "hist_scenario", "hist_feedback", "hist_gap", "hist_value",
               "hist_count", "hist_item_key",
               "feedback",  # raw label values, when train.aux_rating keeps them (train/aux.py)
               # predict only: text vectors of items new to the model (text/tables.py)
               "item_text", "item_text_mask")


class BatchIterator:
  """Batches of one split, as numpy dicts holding this process's share of each global batch."""

  def __init__(self, data: PreparedData, split: str, global_batch_size: int, *, seed: int,
               shuffle: bool, drop_last: bool, process_index: int = 0,
               process_count: int = 1, keys=DEVICE_KEYS):
    if global_batch_size % process_count:
      raise ConfigError(f"batch size {global_batch_size} must be divisible by the number of "
                        f"processes ({process_count})")
    self.arrays = {k: v for k, v in data.arrays.items() if k in keys}
    self.index = np.asarray(data.splits[split])
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
    self.process_index = process_index
    n = len(self.index)
    if drop_last and n < global_batch_size:
      raise ConfigError(f"split '{split}' has {n} rows, fewer than one batch of "
                        f"{global_batch_size}; lower train.batch_size")
    self.num_batches = n // global_batch_size if drop_last else -(-n // global_batch_size)

  def order(self, epoch: int) -> np.ndarray:
    if not self.shuffle:
      return self.index
    return self.index[np.random.default_rng([self.seed, epoch]).permutation(len(self.index))]

  def batch_rows(self, order: np.ndarray, b: int) -> tuple[np.ndarray, np.ndarray]:
    """(row ids, weights) of this process's share of global batch `b` of an epoch's order."""
    rows = order[b * self.global_batch_size: (b + 1) * self.global_batch_size]
    real = len(rows)
    weight = np.ones(self.global_batch_size, np.float32)
    if real < self.global_batch_size:  # eval: pad with copies of row 0, weight 0
      weight[real:] = 0.0
      rows = np.concatenate([rows, np.full(self.global_batch_size - real, order[0])])
    if self.shuffle:
      # Sorted gathers are cache friendly; row order inside a training batch does not
      # matter (evaluation keeps the split's order so predictions line up with rows).
      # Sort the whole global batch before taking this process's slice, so that the
      # processes' slices concatenate to exactly the single-process batch.
      perm = np.argsort(rows, kind="stable")
      rows, weight = rows[perm], weight[perm]
    lo = self.process_index * self.local_batch_size
    return rows[lo: lo + self.local_batch_size], weight[lo: lo + self.local_batch_size]

  def epoch_rows(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """Every batch of an epoch as (rows, weights) [num_batches, local batch]: the same rows
    `epoch()` gathers, for a device-resident copy of the columns (train/fit.py)."""
    order = self.order(epoch)
    pairs = [self.batch_rows(order, b) for b in range(self.num_batches)]
    return (np.stack([r for r, _ in pairs]).astype(np.int32),
            np.stack([w for _, w in pairs]))

  def epoch(self, epoch: int, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
    order = self.order(epoch)
    for b in range(start, self.num_batches):
      local, weight = self.batch_rows(order, b)
      batch = {k: np.asarray(v[local]) for k, v in self.arrays.items()}
      batch["weight"] = weight
      yield batch


def to_global(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  """Per-process numpy shard -> one global jax.Array per key, split over the 'data' axis."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def prefetch(iterator: Iterator, transfer: Callable, size: int = 2) -> Iterator:
  """Run `transfer(next(iterator))` on a background thread, `size` items ahead."""
  if size <= 0:
    for item in iterator:
      yield transfer(item)
    return
  q: queue.Queue = queue.Queue(maxsize=size)
  done = object()
  stop = threading.Event()

  def work():
    try:
      for item in iterator:
        if stop.is_set():
          return
        q.put(transfer(item))
      q.put(done)
    except BaseException as e:  # surface errors on the consumer side
      q.put(e)

  thread = threading.Thread(target=work, daemon=True)
  thread.start()
  try:
    while True:
      item = q.get()
      if item is done:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
    while thread.is_alive():
      try:
        q.get_nowait()
      except queue.Empty:
        thread.join(timeout=0.05)

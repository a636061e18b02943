"""Input-pipeline throughput on prepared MovieLens-1M (examples/s), and the storage decision.

  (a) BatchIterator over the memory-mapped prepared columns (numpy batches, the trainer's path);
  (b) the same plus `pipeline.to_global` (host -> device transfer), inline and prefetched;
  (c) array_record: the same rows written one record per row (fixed struct, np.tobytes), read
      with random row indices like a shuffled epoch and decoded; and one record per block of
      1024 rows, read as random blocks (block-level shuffle only).

Not a test. Usage:
  python benchmarks/input_pipeline.py --root ../shared/data/movielens/ml-1m \
      [--batch-size 4096] [--steps 200]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from mscenario import config as config_lib  # noqa: E402
from mscenario.data import pipeline  # noqa: E402
from mscenario.data import prepare as prepare_lib  # noqa: E402

BLOCK = 1024


def timed(batches, steps: int, batch_size: int, warmup: int = 3, finish=None) -> float:
  """examples/s over `steps` items of the iterable (after `warmup` untimed ones)."""
  it = iter(batches)
  for _ in range(warmup):
    next(it)
  t0 = time.perf_counter()
  last = None
  for _ in range(steps):
    last = next(it)
  if finish is not None:
    finish(last)
  return steps * batch_size / (time.perf_counter() - t0)


def forever(iterator: pipeline.BatchIterator, start_epoch: int = 0):
  epoch = start_epoch
  while True:
    yield from iterator.epoch(epoch)
    epoch += 1


def row_dtype(arrays: dict[str, np.ndarray]) -> np.dtype:
  """One fixed struct per row: every prepared column's per-row slice."""
  return np.dtype([(k, v.dtype, v.shape[1:]) for k, v in arrays.items()])


def to_struct(arrays: dict[str, np.ndarray], rows: np.ndarray, dtype: np.dtype) -> np.ndarray:
  out = np.empty(len(rows), dtype)
  for k in dtype.names:
    out[k] = arrays[k][rows]
  return out


def decode(records: list[bytes], dtype: np.dtype) -> dict[str, np.ndarray]:
  s = np.frombuffer(b"".join(records), dtype=dtype)
  batch = {k: np.ascontiguousarray(s[k]) for k in dtype.names}
  batch["weight"] = np.ones(len(s), np.float32)
  return batch


def write_array_record(path: str, structs: np.ndarray, rows_per_record: int) -> float:
  from array_record.python import array_record_module as ar
  t0 = time.perf_counter()
  writer = ar.ArrayRecordWriter(path, "group_size:1" if rows_per_record == 1 else "")
  if rows_per_record == 1:
    raw = structs.tobytes()
    size = structs.dtype.itemsize
    for i in range(len(structs)):
      writer.write(raw[i * size: (i + 1) * size])
  else:
    for lo in range(0, len(structs), rows_per_record):
      writer.write(structs[lo: lo + rows_per_record].tobytes())
  writer.close()
  return time.perf_counter() - t0


def array_record_rows(path, index, dtype, batch_size, seed=0):
  """Shuffled epochs of per-row records: `batch_size` random reads + decode per batch."""
  from array_record.python import array_record_module as ar
  reader = ar.ArrayRecordReader(path, "readahead_buffer_size:0")
  epoch = 0
  while True:
    order = index[np.random.default_rng([seed, epoch]).permutation(len(index))]
    for b in range(len(order) // batch_size):
      rows = np.sort(order[b * batch_size: (b + 1) * batch_size])
      yield decode(reader.read(rows.tolist()), dtype)
    epoch += 1


def array_record_blocks(path, dtype, batch_size, seed=0):
  """Shuffled epochs of blocks: batch_size / BLOCK random block reads, decode, in-batch shuffle."""
  from array_record.python import array_record_module as ar
  reader = ar.ArrayRecordReader(path, "readahead_buffer_size:0")
  n_blocks = reader.num_records()
  per_batch = batch_size // BLOCK
  epoch = 0
  while True:
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n_blocks)
    for b in range(n_blocks // per_batch):
      blocks = np.sort(order[b * per_batch: (b + 1) * per_batch])
      batch = decode(reader.read(blocks.tolist()), dtype)
      n = len(batch["label"])
      take = rng.permutation(n)[:batch_size] if n >= batch_size else np.arange(n)
      batch = {k: v[take] for k, v in batch.items() if k != "weight"}
      batch["weight"] = np.ones(len(take), np.float32)
      yield batch
    epoch += 1


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--root", default=os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), "..", "shared", "data", "movielens", "ml-1m"))
  p.add_argument("--batch-size", type=int, default=4096)
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--config", default=os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), "configs", "ml1m_star.py"))
  p.add_argument("--workdir", default="", help="where to write the array_record files "
                 "(default: a temporary directory, removed afterwards)")
  args = p.parse_args(argv)
  bs, steps = args.batch_size, args.steps
  if bs % BLOCK:
    p.error(f"--batch-size must be a multiple of {BLOCK} for the block variant")

  config = config_lib.load_config(args.config, [f"--config.data.root={args.root}"])
  t0 = time.perf_counter()
  data = prepare_lib.prepare(config)
  print(f"prepare (or cache hit): {time.perf_counter() - t0:.1f}s; "
        f"{len(data.splits['train']):,} train rows; jax {jax.__version__} on "
        f"{jax.device_count()} x {jax.devices()[0].platform}; {os.cpu_count()} CPUs")

  results = []
  it = pipeline.BatchIterator(data, "train", bs, seed=0, shuffle=True, drop_last=True)
  results.append(("(a) BatchIterator, numpy (mmap columns)",
                  timed(forever(it), steps, bs)))

  devices = np.array(jax.devices())
  mesh = jax.sharding.Mesh(devices, ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  transfer = lambda b: pipeline.to_global(b, sharding)  # noqa: E731
  ready = lambda batch: jax.block_until_ready(batch)  # noqa: E731

  def inline():
    for b in forever(it, 100):
      yield ready(transfer(b))
  results.append(("(b) + to_global, inline", timed(inline(), steps, bs)))
  results.append(("(b) + to_global, prefetch(2) thread",
                  timed(pipeline.prefetch(forever(it, 200), transfer, 2), steps, bs,
                        finish=ready)))

  # (c) array_record.
  keys = [k for k in pipeline.DEVICE_KEYS if k in data.arrays]
  arrays = {k: np.asarray(data.arrays[k]) for k in keys}
  dtype = row_dtype(arrays)
  train = np.asarray(data.splits["train"])
  structs = to_struct(arrays, np.arange(len(arrays["label"])), dtype)
  workdir = args.workdir or tempfile.mkdtemp(prefix="mscenario-bench-")
  os.makedirs(workdir, exist_ok=True)
  try:
    per_row = os.path.join(workdir, "rows.array_record")
    per_block = os.path.join(workdir, "blocks.array_record")
    # Blocks hold training rows only (block shuffle cannot pick a split's rows out of a block).
    w_row = write_array_record(per_row, structs, 1)
    w_block = write_array_record(per_block, structs[train], BLOCK)
    print(f"array_record: {dtype.itemsize} bytes/row; wrote {len(structs):,} per-row records "
          f"in {w_row:.1f}s ({os.path.getsize(per_row) / 2**20:.0f} MiB), "
          f"{-(-len(train) // BLOCK):,} block records in {w_block:.1f}s "
          f"({os.path.getsize(per_block) / 2**20:.0f} MiB)")
    row_steps = max(5, steps // 10)  # per-row reads are slow; fewer steps keep the run short
    results.append(("(c) array_record, 1 row/record (random rows)",
                    timed(array_record_rows(per_row, train, dtype, bs), row_steps, bs,
                          warmup=1)))
    results.append((f"(c) array_record, {BLOCK} rows/record (random blocks)",
                    timed(array_record_blocks(per_block, dtype, bs), steps, bs)))
  finally:
    if not args.workdir:
      shutil.rmtree(workdir, ignore_errors=True)

  base = results[0][1]
  width = max(len(n) for n, _ in results)
  print(f"\nbatch {bs}, {steps} steps (per-row array_record: {row_steps} steps)")
  print(f"{'pipeline':<{width}}  {'examples/s':>12}  {'vs (a)':>7}")
  for name, rate in results:
    print(f"{name:<{width}}  {rate:>12,.0f}  {rate / base:>7.2f}")


if __name__ == "__main__":
  main()

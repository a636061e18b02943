"""The text tables a text-fused run trains with: encoded once per data fingerprint (process
0; every process waits for it), loaded, and extended with `text.item_vectors`.

The Flax side (how the tables enter the model) is models/fusion.py.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pyarrow.parquet as pq
from jax.experimental import multihost_utils

from mscenario.errors import ConfigError
from mscenario.text.tables import INDEX_FILE, TEXT_DIR, encode_for_config, load_text_tables


def load_item_vectors(path: str, item_vocab: list[str], num_rows: int,
                      id_column: str = "") -> np.ndarray:
  """Per-item vectors [num_rows, d] from a .npy (one row per item vocabulary id) or a
  Parquet file keyed by raw item id (a list column, or numeric columns); missing -> 0."""
  if not os.path.isfile(path):
    raise ConfigError(f"text.item_vectors={path!r}: no such file")
  if path.endswith(".npy"):
    a = np.load(path).astype(np.float32)
    if a.ndim != 2 or a.shape[0] != num_rows:
      raise ConfigError(f"{path}: expected shape [{num_rows}, d] (one row per item "
                        f"vocabulary id, PAD and OOV included), got {list(a.shape)}")
    return a
  t = pq.read_table(path).to_pydict()
  key = id_column if id_column in t else next(iter(t))
  cols = [c for c in t if c != key]
  if len(cols) == 1 and t[cols[0]] and isinstance(t[cols[0]][0], (list, tuple, np.ndarray)):
    vecs = np.asarray(t[cols[0]], np.float32)
  else:
    vecs = np.stack([np.asarray(t[c], np.float32) for c in cols], axis=1)
  out = np.zeros((num_rows, vecs.shape[1]), np.float32)
  vocab = {v: i + 2 for i, v in enumerate(item_vocab)}
  for raw, v in zip(t[key], vecs):
    i = vocab.get(str(raw))
    if i is not None:
      out[i] = v
  return out


def prepare_text_tables(config, workdir: str, data, *, log=print) -> dict:
  """Encode (process 0, when `<workdir>/text` is missing or stale) and load the tables,
  with `text.item_vectors` appended to the item table."""
  index = os.path.join(workdir, TEXT_DIR, INDEX_FILE)
  if jax.process_index() == 0:
    fresh = False
    if os.path.isfile(index):
      with open(index) as f:
        fresh = json.load(f).get("data_fingerprint") == data.fingerprint
    if not fresh:
      encode_for_config(config, workdir, log=log)
    else:
      log(f"text: reusing tables in {os.path.dirname(index)}")
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("mscenario-text")
  return with_item_vectors(config, load_text_tables(workdir), data.transform.state,
                           data.schema.item_vocab_size)


def with_item_vectors(config, tables: dict, transform_state: dict, num_rows: int) -> dict:
  """`tables` with the `text.item_vectors` file's vectors appended to each item's text row
  (the same for training, evaluation and export)."""
  path = config.text.get("item_vectors", "")
  if not path:
    return tables
  vecs = load_item_vectors(path, transform_state.get("item_vocab", []), num_rows,
                           config.data.item_field)
  items = tables.get("items")
  tables = dict(tables)
  tables["items"] = vecs if items is None else np.concatenate(
      [np.asarray(items, np.float32)[:num_rows], vecs], axis=1)
  return tables

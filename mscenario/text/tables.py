"""Text -> frozen embedding tables: one row per item (or user) vocabulary id and per scenario.

Texts come from a template over the raw fields ("{title} ({year}). Genres: {genres}") and
scenario descriptions from the config. Embeddings are cached on disk keyed by (model
fingerprint, text hash): re-running `encode`, or changing only a few items, encodes only the
texts not seen before with that exact model.

Table row i belongs to vocabulary id i, the same ids the 'item' / 'user' batch arrays carry;
the reserved ids (PAD, OOV) and ids without text get all-zero rows.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import tempfile
import time
import uuid
from typing import Mapping, Sequence

import numpy as np

from mscenario.config import default_cache_dir
from mscenario.data.prepare import prepare
from mscenario.data.schema import OOV_ID
from mscenario.data.sources import load_source
from mscenario.data.synthetic import SyntheticWorld
from mscenario.data.template import format_text, template_fields
from mscenario.errors import ConfigError, MscenarioError
from mscenario.text.encoder import load_encoder

SCENARIO_SEEN = "scenario_seen"  # [S] 1 = the scenario had training rows

# Per data source, the item template used when `text.item_template` is empty.
DEFAULT_ITEM_TEMPLATES = {"movielens": "{title} ({year}). Genres: {genres}"}
TEXT_DIR = "text"
INDEX_FILE = "index.json"


# ---------------------------------------------------------------------------- building texts
def build_texts(columns: Mapping[str, Sequence], ids: np.ndarray, num_ids: int,
                template: str, *, first_id: int = 2) -> list[str | None]:
  """One text per vocabulary id from the first row that carries it (None: no text).

  `columns` are raw column arrays aligned with `ids` (the vocabulary id of each row); ids below
  `first_id` are the reserved PAD / OOV ids and stay None.
  """
  fields = template_fields(template)
  missing = [f for f in fields if f not in columns]
  if missing:
    raise ConfigError(f"text template {template!r} names fields {missing} that the data does "
                      f"not have (columns: {sorted(columns)})")
  ids = np.asarray(ids)
  uniq, first = np.unique(ids, return_index=True)
  out: list[str | None] = [None] * num_ids
  for i, row in zip(uniq.tolist(), first.tolist()):
    if first_id <= i < num_ids:
      out[i] = format_text(template, {f: columns[f][row] for f in fields})
  return out


def build_item_texts(columns: Mapping[str, Sequence], item_ids: np.ndarray, num_items: int,
                     template: str) -> list[str | None]:
  """Item texts, e.g. "Toy Story (1995). Genres: Animation, Children's, Comedy"."""
  return build_texts(columns, item_ids, num_items, template)


def build_user_texts(columns: Mapping[str, Sequence], user_ids: np.ndarray, num_users: int,
                     template: str) -> list[str | None]:
  """User profile texts from profile fields, e.g. "{gender} user, age {age}"."""
  return build_texts(columns, user_ids, num_users, template)


def build_scenario_texts(names: Sequence[str], descriptions: Mapping[str, str],
                         log=print) -> list[str]:
  """One description per scenario (in index order); the scenario name when none is given."""
  out = []
  for name in names:
    text = (descriptions or {}).get(name)
    if not text:
      log(f"text: scenario '{name}' has no description in data.scenario.descriptions; "
          "encoding its name instead")
      text = str(name)
    out.append(str(text))
  return out


# ---------------------------------------------------------------------------- cache
def text_key(text: str) -> bytes:
  return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


class EmbeddingCache:
  """Append-only shards of (text hash, vector) under `<root>/<model fingerprint>/`.

  Each call writes at most one new shard, atomically (temp file + rename), so concurrent
  writers never corrupt each other; readers take the union of all shards.
  """

  def __init__(self, root: str, fingerprint: str, dim: int):
    self.dir = os.path.join(root, fingerprint)
    self.dim = dim
    self._index: dict[bytes, tuple[int, int]] = {}
    self._shards: list[np.ndarray] = []
    for path in sorted(glob.glob(os.path.join(self.dir, "shard-*.npz"))):
      try:
        with np.load(path) as z:
          keys, vecs = z["keys"], z["vectors"]
      except (OSError, ValueError, KeyError):
        continue  # a damaged shard is only a cache miss
      if vecs.ndim != 2 or vecs.shape[1] != dim:
        continue
      s = len(self._shards)
      self._shards.append(vecs.astype(np.float32, copy=False))
      for j, k in enumerate(keys):
        self._index[k.tobytes()] = (s, j)

  def __len__(self):
    return len(self._index)

  def get(self, key: bytes) -> np.ndarray | None:
    hit = self._index.get(key)
    return None if hit is None else self._shards[hit[0]][hit[1]]

  def put(self, keys: Sequence[bytes], vectors: np.ndarray) -> None:
    if not len(keys):
      return
    os.makedirs(self.dir, exist_ok=True)
    arr = np.frombuffer(b"".join(keys), np.uint8).reshape(len(keys), 16)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=self.dir)
    with os.fdopen(fd, "wb") as f:
      np.savez(f, keys=arr, vectors=np.asarray(vectors, np.float32))
    os.replace(tmp, os.path.join(self.dir, f"shard-{time.time_ns()}-{uuid.uuid4().hex[:8]}.npz"))
    s = len(self._shards)
    self._shards.append(np.asarray(vectors, np.float32))
    for j, k in enumerate(keys):
      self._index[k] = (s, j)


def default_text_cache_dir() -> str:
  return os.path.join(default_cache_dir(), "text")


def encode_table(encoder, texts: Sequence[str | None], cache_dir: str | None = None, *,
                 batch_size: int = 64, progress: bool = True, log=None) -> np.ndarray:
  """Embeddings float32 [len(texts), dim]; None entries get zero rows.

  Only texts missing from the cache (for this encoder's fingerprint) are encoded; the new
  ones are added to it. `cache_dir=None` uses `<mscenario cache>/text`; "" disables caching.
  """
  if cache_dir is None:
    cache_dir = default_text_cache_dir()
  out = np.zeros((len(texts), encoder.dim), np.float32)
  rows_of: dict[str, list[int]] = {}
  for i, t in enumerate(texts):
    if t is not None:
      rows_of.setdefault(t, []).append(i)
  cache = EmbeddingCache(cache_dir, encoder.fingerprint, encoder.dim) if cache_dir else None
  todo = []
  for t, rows in rows_of.items():
    vec = cache.get(text_key(t)) if cache is not None else None
    if vec is None:
      todo.append(t)
    else:
      out[rows] = vec
  if todo:
    vecs = encoder.encode(todo, batch_size=batch_size, progress=progress)
    for t, v in zip(todo, vecs):
      out[rows_of[t]] = v
    if cache is not None:
      cache.put([text_key(t) for t in todo], vecs)
  if log:
    log(f"text: {len(rows_of):,} distinct texts, {len(rows_of) - len(todo):,} from cache, "
        f"{len(todo):,} encoded")
  return out


# ---------------------------------------------------------------------------- config -> tables
def _text_cfg(config, key, default):
  text = config.get("text", None)
  return default if text is None else text.get(key, default)


def item_template(config) -> str:
  """`text.item_template`, else the source's default, else the text features joined."""
  t = _text_cfg(config, "item_template", "") or DEFAULT_ITEM_TEMPLATES.get(config.data.source, "")
  if t:
    return t
  cols = [spec.get("column", name) for name, spec in config.data.features.items()
          if spec.get("kind") == "text"]
  if not cols:
    raise ConfigError("no item text: set text.item_template (e.g. '{title}. {genres}') or "
                      "declare a feature with kind 'text'")
  return ". ".join("{" + c + "}" for c in cols)


def _raw_columns(data, config, fields: Sequence[str], id_field: str, vocab: list[str]):
  """(columns, ids) for `fields`; from the prepared texts.json when it has them all."""
  text_cols = {spec.get("column", name): name for name, spec in config.data.features.items()
               if spec.get("kind") == "text"}
  if id_field == config.data.item_field and all(f in text_cols for f in fields):
    with open(os.path.join(data.path, "texts.json"), encoding="utf-8") as f:
      texts = json.load(f)
    ids = sorted({int(i) for f in fields for i in texts.get(text_cols[f], {})})
    cols = {f: [texts[text_cols[f]].get(str(i)) for i in ids] for f in fields}
    return cols, np.asarray(ids, np.int64)
  table = load_source(config.data)
  if id_field not in table.columns:
    raise ConfigError(f"text: the id field '{id_field}' is not a column of the data")
  ids = data.transform._lookup_ids(vocab, table, id_field)
  return {f: table.columns[f] for f in fields if f in table.columns}, ids


def encode_for_config(config, workdir: str, *, encoder=None, log=print,
                      progress: bool = True) -> dict:
  """Build and encode item, scenario (and optional user) texts; write `<workdir>/text/`.

  Returns the index written to `<workdir>/text/index.json` (paths, shapes, model, counts).
  """
  t0 = time.time()
  data = prepare(config, log=log)
  state = data.transform.state
  if encoder is None:
    encoder = load_encoder(_text_cfg(config, "model_path", "") or None)
  log(f"text: model {encoder.model_dir} (dim {encoder.dim}, fingerprint {encoder.fingerprint})")
  cache_dir = _text_cfg(config, "cache_dir", "") or default_text_cache_dir()
  batch_size = int(_text_cfg(config, "batch_size", 64))
  kw = dict(batch_size=batch_size, progress=progress, log=log)

  tables, texts = {}, {}
  template = item_template(config)
  cols, ids = _raw_columns(data, config, template_fields(template), config.data.item_field,
                           state["item_vocab"])
  texts["items"] = build_item_texts(cols, ids, data.schema.item_vocab_size, template)
  tables["items"] = encode_table(encoder, texts["items"], cache_dir, **kw)

  descriptions = config.data.scenario.get("descriptions", {}) or {}
  if hasattr(descriptions, "to_dict"):
    descriptions = descriptions.to_dict()
  if not descriptions and config.data.source == "synthetic":
    descriptions = SyntheticWorld(config.data.synthetic).scenario_descriptions()
  texts["scenarios"] = build_scenario_texts(data.schema.scenario_names, descriptions, log=log)
  tables["scenarios"] = encode_table(encoder, texts["scenarios"], cache_dir, **kw)
  # Which scenarios have training rows: one never trained on is routed to its nearest
  # trained neighbour by description (models/fusion.py, text.unseen_scenario).
  train_scen = np.asarray(data.arrays["scenario"])[data.splits["train"]]
  seen = np.bincount(train_scen, minlength=data.schema.num_scenarios) > 0
  tables[SCENARIO_SEEN] = seen.astype(np.float32)
  texts[SCENARIO_SEEN] = [str(bool(v)) for v in seen]

  user_template = _text_cfg(config, "user_template", "")
  if user_template:
    cols, ids = _raw_columns(data, config, template_fields(user_template),
                             config.data.user_field, state["user_vocab"])
    texts["users"] = build_user_texts(cols, ids, data.schema.user_vocab_size, user_template)
    tables["users"] = encode_table(encoder, texts["users"], cache_dir, **kw)

  out_dir = os.path.join(workdir, TEXT_DIR)
  os.makedirs(out_dir, exist_ok=True)
  index = {"model_dir": encoder.model_dir, "fingerprint": encoder.fingerprint,
           "dim": encoder.dim, "data_fingerprint": data.fingerprint,
           "item_template": template, "user_template": user_template or None,
           "scenario_names": list(data.schema.scenario_names), "tables": {}}
  for name, table in tables.items():
    np.save(os.path.join(out_dir, f"{name}.npy"), table)
    index["tables"][name] = {"file": f"{name}.npy", "shape": list(table.shape),
                             "with_text": sum(t is not None for t in texts[name])}
  with open(os.path.join(out_dir, "texts.json"), "w", encoding="utf-8") as f:
    json.dump(texts, f, ensure_ascii=False)
  with open(os.path.join(out_dir, INDEX_FILE), "w") as f:  # last: marks completeness
    json.dump(index, f, indent=2)
  index["seconds"] = round(time.time() - t0, 2)
  return index


def read_text_index(workdir: str) -> dict:
  """`<workdir>/text/index.json`, the record `encode` writes last (model, template, tables)."""
  path = os.path.join(workdir, TEXT_DIR, INDEX_FILE)
  if not os.path.isfile(path):
    raise MscenarioError(f"{path} does not exist: run `mscenario encode --config ... "
                         f"--workdir {workdir}` first")
  with open(path) as f:
    return json.load(f)


def load_matching_encoder(model_path: str | None, fingerprint: str, trained_by: str):
  """The text encoder at `model_path` (None = packaged), refused unless it is the model the
  tables were made with: vectors from another model would be silently meaningless."""
  encoder = load_encoder(model_path or None)
  if encoder.fingerprint != fingerprint:
    raise MscenarioError(f"text model {encoder.model_dir} is not the one {trained_by} was "
                         f"trained with (fingerprint {encoder.fingerprint} != {fingerprint}); "
                         "set --config.text.model_path")
  return encoder


def new_item_text_vectors(config, workdir: str, columns: Mapping[str, Sequence],
                          item_ids: np.ndarray, rows: np.ndarray, *,
                          log=print) -> tuple[np.ndarray, np.ndarray] | None:
  """Per-row text vectors for rows whose item is unknown to the trained model (OOV).

  A brand-new item has no row in the trained text table, but its raw fields are in the
  input: fill the run's item template (<workdir>/text/index.json) and encode it with the
  same model, so it is scored from its text instead of a zero row. Output row i reads raw
  row rows[i] of `columns`. Returns (vectors [N, dim] float32, mask [N] bool), or None when
  no row needs it.
  """
  index = read_text_index(workdir)
  template = index["item_template"]
  new = np.asarray(item_ids) == OOV_ID
  present = [f for f in template_fields(template) if f in columns]
  if not new.any() or not present:
    return None
  texts = [None] * len(new)
  for i in np.flatnonzero(new).tolist():  # format only the new items' rows
    texts[i] = format_text(template, {f: columns[f][rows[i]] for f in present})
  encoder = load_matching_encoder(_text_cfg(config, "model_path", ""), index["fingerprint"],
                                  workdir)
  cache_dir = _text_cfg(config, "cache_dir", "") or default_text_cache_dir()
  vecs = encode_table(encoder, texts, cache_dir, progress=False, log=None)
  log(f"text: encoded {int(new.sum()):,} rows of items unknown to the model from their "
      f"text ({', '.join(present)})")
  return vecs, new


def load_text_tables(workdir: str, fingerprint: str | None = None) -> dict[str, np.ndarray]:
  """The tables `encode` wrote ('items', 'scenarios', maybe 'users'), as float32 arrays."""
  index = read_text_index(workdir)
  if fingerprint is not None and index["fingerprint"] != fingerprint:
    raise MscenarioError(f"text tables in {workdir} were made with another model "
                         f"({index['fingerprint']}, not {fingerprint}): run `encode` again")
  return {name: np.load(os.path.join(workdir, TEXT_DIR, t["file"]))
          for name, t in index["tables"].items()}

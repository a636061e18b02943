"""The exported predictor's files and manifest: what the writer writes and the server reads.

A leaf module (numpy-free, no JAX, no training code), so the serving side can depend on it
without depending on the writer.

Model directory layout:
  MODEL_DIR/CURRENT                 name of the version to serve (replaced atomically)
  MODEL_DIR/versions/<v>/manifest.json, config.json, transform.json, weights.safetensors,
                         functions/score_b<B>.jax, functions/explain_b<B>.jax (the
                         manifest's "explain" entry; absent in older exports), text/*.npy (frozen text tables, if any),
                         text/encoder/ (the language model, for text-fused models)
                         collaborative.npz (data.collaborative models: the CF state the
                         server computes the cf_* features from; manifest "collaborative")
A version directory itself is also accepted as MODEL_DIR.
"""
from __future__ import annotations

import argparse
import json
import os

from mscenario.errors import MscenarioError

FORMAT = "mscenario-predictor"
FORMAT_VERSION = 1
CURRENT_FILE = "CURRENT"
VERSIONS_DIR = "versions"
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
CONFIG = "config.json"
TRANSFORM = "transform.json"
COLLABORATIVE = "collaborative.npz"  # = data.collaborative.STATE_FILE (not imported: a leaf)
TEXT_DIR = "text"
# The language model a text-fused version encodes new items' text with (a copy of the files
# the encoder reads: weights, tokenizer, configs), so the version is served without the
# training machine's model path or package.
ENCODER_DIR = "text/encoder"
DEFAULT_BUCKETS = (1, 8, 64, 512, 2048)
# The explanation function (POST /v1/explain; integrated gradients, many model evaluations
# per row) is exported for the buckets up to this size only: larger requests run in chunks.
EXPLAIN_MAX_BUCKET = 64
# Batch arrays the scoring function takes (labels / weights are not needed to score).
INPUT_KEYS = ("sparse", "multi", "dense", "scenario", "user", "item")


def parse_buckets(text: str) -> tuple[int, ...]:
  """'1,8,64' -> (1, 8, 64): the --buckets option of `export` and `update`."""
  try:
    out = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated sizes, got {text!r}") from None
  if not out or out[0] < 1:
    raise argparse.ArgumentTypeError("bucket sizes must be >= 1")
  return out


def input_spec(manifest: dict, batch: int) -> dict[str, tuple[tuple[int, ...], str]]:
  """Shapes/dtypes of the scoring function's batch argument at one bucket size.

  Text-fused models also take the text vectors of items new to the model ('item_text',
  'item_text_mask'): the server encodes those from the request's raw item fields.
  """
  s, (m, l), d = manifest["inputs"]["sparse"], manifest["inputs"]["multi"], \
      manifest["inputs"]["dense"]
  spec = {"sparse": ((batch, s), "int32"), "multi": ((batch, m, l), "int32"),
          "dense": ((batch, d), "float32"), "scenario": ((batch,), "int32"),
          "user": ((batch,), "int32"), "item": ((batch,), "int32")}
  text = manifest.get("item_text")
  if text:
    spec["item_text"] = ((batch, int(text["dim"])), "float32")
    spec["item_text_mask"] = ((batch,), "bool")
  return spec


def resolve_version_dir(model_dir: str) -> str:
  """MODEL_DIR (with CURRENT) or a version dir -> the version dir to load."""
  if os.path.exists(os.path.join(model_dir, MANIFEST)):
    return model_dir
  current = os.path.join(model_dir, CURRENT_FILE)
  if not os.path.exists(current):
    raise MscenarioError(f"{model_dir} is not an exported model (no {CURRENT_FILE} or "
                         f"{MANIFEST}); create one with `mscenario export --workdir DIR "
                         f"--out {model_dir}`")
  with open(current) as f:
    name = f.read().strip()
  path = os.path.join(model_dir, VERSIONS_DIR, name)
  if not os.path.exists(os.path.join(path, MANIFEST)):
    raise MscenarioError(f"{current} names version {name!r}, but {path} holds no {MANIFEST}")
  return path


def current_version_name(model_dir: str) -> str | None:
  """The version MODEL_DIR/CURRENT names (None for a plain version dir)."""
  try:
    with open(os.path.join(model_dir, CURRENT_FILE)) as f:
      return f.read().strip()
  except FileNotFoundError:
    return None


def read_manifest(version_dir: str) -> dict:
  """A version's manifest.json, refused unless this code can read its format."""
  with open(os.path.join(version_dir, MANIFEST)) as f:
    manifest = json.load(f)
  if manifest.get("format") != FORMAT:
    raise MscenarioError(f"{version_dir}/{MANIFEST} is not an {FORMAT} manifest")
  if manifest.get("format_version", 0) > FORMAT_VERSION:
    raise MscenarioError(f"{version_dir} was exported by a newer mscenario (format "
                         f"{manifest['format_version']} > {FORMAT_VERSION})")
  return manifest

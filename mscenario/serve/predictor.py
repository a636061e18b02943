"""Load an exported predictor and score raw requests — no training code paths.

Only jax, numpy, safetensors, the artefact format (mscenario.export.format) and the data
helpers (Transform, RawTable, schema, text template) are imported: a serving host needs
neither the model classes nor the training data, just the directory that `mscenario export`
wrote (layout: mscenario/export/format.py). Weights are *arguments* of the serialised scoring
functions, so a new version with the same shapes reuses the already compiled functions (a hot
swap is a pointer swap, not a recompile).

A text-fused version also carries its language model (text/encoder/): the text of an item new
to the model is encoded with that copy, loaded on the first such item. If the copy is missing
or damaged, those requests get ModelUnavailable (HTTP 503); other requests are still scored.

Length: one loaded artefact (ModelVersion) parses, encodes, scores and explains; request
validation is in request.py, batching in batcher.py.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from typing import Any, Sequence

import jax
import numpy as np
from safetensors.numpy import load_file

from mscenario.data import collaborative as cf_lib
from mscenario.data import schema as schema_lib
from mscenario.data.table import RawTable
from mscenario.data.template import format_text, template_fields
from mscenario.data.transform import MISSING, Transform
from mscenario.errors import MscenarioError
from mscenario.export.format import (CONFIG, CURRENT_FILE, FORMAT, FORMAT_VERSION,  # noqa: F401
                                     INPUT_KEYS, MANIFEST, TRANSFORM, VERSIONS_DIR,
                                     current_version_name, input_spec, read_manifest,
                                     resolve_version_dir)
from mscenario.serve.request import (INT64_MAX, INT64_MIN, MAX_NORMALISED, Columns,
                                     FieldCheck, InputLimits, Parsed, RequestError, capped,
                                     column_values, fast_float, fast_str, json_type,
                                     number_key, short)


class NoExplanation(MscenarioError):
  """The version was exported without an explanation function (HTTP 501)."""


class ModelUnavailable(MscenarioError):
  """The version lacks something it needs to answer (e.g. its language model's files): not
  the client's fault, so HTTP 503, not 422."""


# ---------------------------------------------------------------------------- compiled functions
_FN_CACHE: dict[str, Any] = {}
_FN_LOCK = threading.Lock()


def _load_function(data: bytes):
  """Deserialise + jit once per distinct function (keyed by content hash): versions that only
  change weights share the compiled executables."""
  key = hashlib.sha256(data).hexdigest()
  with _FN_LOCK:
    fn = _FN_CACHE.get(key)
    if fn is None:
      exported = jax.export.deserialize(bytearray(data))
      fn = jax.jit(exported.call)
      _FN_CACHE[key] = fn
  return fn


# ---------------------------------------------------------------------------- one version
class ModelVersion:
  """One loaded export. Immutable once built: the server swaps whole versions."""

  def __init__(self, path: str, *, warm_up: bool = True):
    self.path = os.path.abspath(path)
    self.manifest = read_manifest(path)
    self.version = self.manifest["version"]
    with open(os.path.join(path, TRANSFORM)) as f:
      self.transform = Transform(json.load(f))
    with open(os.path.join(path, CONFIG)) as f:
      self.config = json.load(f)
    self.schema = self.transform.schema
    self.columns = Columns.of(self.transform)
    host = load_file(os.path.join(path, self.manifest["weights"]))
    self.weights = {k: jax.device_put(v) for k, v in host.items()}
    self.buckets = tuple(sorted(int(b) for b in self.manifest["functions"]))
    self.fns = {}
    for b in self.buckets:
      with open(os.path.join(path, self.manifest["functions"][str(b)]), "rb") as f:
        self.fns[b] = _load_function(f.read())
    self.text_tables = {}
    for name, rel in self.manifest.get("text_tables", {}).items():
      self.text_tables[name] = np.load(os.path.join(path, rel), allow_pickle=False)
    self.item_text = self.manifest.get("item_text") or None
    self.cf = self._load_collaborative()
    self.explain_fns = self._load_explain_functions()
    self.input_keys = tuple(input_spec(self.manifest, 1))
    self._encoder = None
    self._text_vectors: dict[str, np.ndarray] = {}
    self._scenario_lookup = self._build_scenario_lookup()
    self.fields = self._field_kinds()
    self._bounds = self._numeric_bounds()
    if warm_up:
      for b in self.buckets:  # compile now, not on the first request after a swap
        self.score_arrays(self.empty_batch(b))

  # -- metadata ------------------------------------------------------------------------
  def metadata(self) -> dict:
    s = self.transform.state
    feats = [{"name": k, "kind": v.get("kind"), "column": v.get("column", k)}
             for k, v in s["features"].items()]
    return {"model": self.manifest["model"], "version": self.version,
            "created": self.manifest.get("created"), "source": self.manifest.get("source"),
            "buckets": list(self.buckets), "features": feats,
            "fields": {"categorical": list(self.columns.categorical),
                       "numeric": [n for n in self.columns.numeric if n in self.fields],
                       "multi": list(self.columns.multi)},
            "user_field": s["user_field"], "item_field": s["item_field"],
            "scenario_field": s["scenario"]["field"],
            "scenarios": list(self.schema.scenario_names),
            "scenario_values": {k: list(v) for k, v in s["scenario"]["groups"].items()}}

  # -- collaborative-filtering features -------------------------------------------------
  def _load_collaborative(self):
    """The version's CF state (data.collaborative models) or None. With it the server
    computes the cf_* columns from the request's user and item ids exactly as `predict`
    does (new users / items: data/collaborative.py's fallback), so requests may not send
    them."""
    entry = self.manifest.get("collaborative")
    if not entry:
      return None
    model = cf_lib.CFModel.load(os.path.join(self.path, entry["file"]))
    if model.user_keys is None:  # a state written before it carried its id keys
      model.set_keys(self.transform.state["user_vocab"], self.transform.state["item_vocab"])
    model.pair_index()  # lookups built at load, not on the first request
    model.user_ids(np.zeros(0, object)), model.item_ids(np.zeros(0, object))
    return model

  def _add_cf_columns(self, table: RawTable) -> None:
    if self.cf is not None:
      s = self.transform.state
      cf_lib.add_columns(self.cf, table, s["user_field"], s["item_field"])

  def _build_scenario_lookup(self) -> dict[str, tuple[int, str]]:
    """Request 'scenario' (a scenario name or a raw field value) -> (index, raw value)."""
    names = self.transform.state["scenario"]["names"]
    groups = self.transform.state["scenario"]["groups"]
    out = {}
    for i, name in enumerate(names):
      raw = groups[name][0] if groups.get(name) else name
      out[str(name)] = (i, raw)
      for v in groups.get(name, ()):
        out[str(v)] = (i, str(v))
    return out

  # -- encoding --------------------------------------------------------------------------
  def _field_kinds(self) -> dict[str, str]:
    """Every raw field a request may carry -> 'categorical' | 'numeric' | 'multi' | 'text'."""
    c = self.columns
    kinds = {n: "categorical" for n in c.categorical}
    kinds.update({n: "numeric" for n in c.numeric})
    if self.cf is not None:  # computed from the user and item ids, never sent
      for name in cf_lib.FEATURES:
        kinds.pop(name, None)
    kinds.update({n: "multi" for n in c.multi})
    if self.item_text:
      for f in template_fields(self.item_text["template"]):
        kinds.setdefault(f, "text")
    return kinds

  def _numeric_bounds(self) -> dict[str, tuple[float, float]]:
    """Per numeric field, the values within MAX_NORMALISED training spreads of every dense
    feature that reads it (and within int64, so the schema and the checks agree)."""
    out = {}
    for d in self.transform.state["dense"].values():
      shift, scale = float(d["shift"]), abs(float(d["scale"])) or 1.0
      lo, hi = out.get(d["column"], (float(INT64_MIN), float(INT64_MAX)))
      out[d["column"]] = (max(lo, shift - MAX_NORMALISED * scale),
                          min(hi, shift + MAX_NORMALISED * scale))
    return out

  def parse(self, request: Any, loc: Sequence = (),
            limits: InputLimits | None = None) -> "Parsed":
    """Validate one {'scenario', 'user', 'items'} request into columns of raw values.

    Raises RequestError listing every bad field (at most limits.max_errors, then a count); the
    server answers it with HTTP 422. Unknown fields are errors, never ignored: a misspelt
    'item_Id' would otherwise be scored as an unknown item. Values come out as the training
    data would have held them (strings, MISSING, floats, tuples), so `encode` of many requests
    at once is a concatenation plus one transform call.
    """
    limits = limits or InputLimits()
    errors: list[dict] = []
    check = FieldCheck(limits, errors)
    loc = list(loc)
    if not isinstance(request, dict):
      raise RequestError([{"loc": loc, "msg": "expected a JSON object with scenario, user, "
                                              f"items; got {json_type(request)}"}])
    scenario = request.get("scenario")
    hit = None
    if scenario is None:
      errors.append({"loc": [*loc, "scenario"], "msg": "field required"})
    elif isinstance(scenario, bool) or not isinstance(scenario, (str, int)):
      errors.append({"loc": [*loc, "scenario"], "msg": "expected a string"})
    else:
      hit = self._scenario_lookup.get(str(scenario)) if len(str(scenario)) <= 256 else None
      if hit is None:
        errors.append({"loc": [*loc, "scenario"],
                       "msg": f"unknown scenario {short(scenario)} (expected one of "
                              f"{sorted(self._scenario_lookup)})"})
    user = request.get("user", {})
    if user is None:
      user = {}
    if not isinstance(user, dict):
      errors.append({"loc": [*loc, "user"], "msg": "expected an object of raw user fields"})
      user = {}
    items = request.get("items")
    if items is None:
      errors.append({"loc": [*loc, "items"], "msg": "field required"})
      items = []
    elif not isinstance(items, list):
      errors.append({"loc": [*loc, "items"], "msg": "expected a list of objects"})
      items = []
    elif not items:
      errors.append({"loc": [*loc, "items"], "msg": "expected at least one item"})
    unknown = set(request) - {"scenario", "user", "items"}
    if unknown:
      errors.append({"loc": loc, "msg": f"unknown keys {sorted(short(k) for k in unknown)} "
                                        "(expected scenario, user, items)"})
    known = self.fields
    for k in user:
      if k not in known:
        errors.append({"loc": [*loc, "user", short(k, 60)],
                       "msg": f"unknown field; this model reads {sorted(known)}"})
    for j, item in enumerate(items):
      if not isinstance(item, dict):
        errors.append({"loc": [*loc, "items", j], "msg": "expected an object of raw item "
                                                         "fields"})
      elif not item.keys() <= known.keys():
        for k in item.keys() - known.keys():
          errors.append({"loc": [*loc, "items", j, short(k, 60)],
                         "msg": f"unknown field; this model reads {sorted(known)}"})
      if len(errors) > limits.max_errors:
        break
    if errors:
      raise RequestError(capped(errors, limits.max_errors))
    c = self.columns
    cols: dict[str, list] = {}
    as_str = fast_str(limits.max_string_chars)
    for name in c.categorical:
      cols[name] = column_values(name, user, items, loc, check.categorical, MISSING, as_str)
    for name in c.numeric:
      b = self._bounds[name]
      cols[name] = column_values(name, user, items, loc,
                                 lambda v, l, b=b: check.numeric(v, l, b), math.nan,
                                 fast_float(*b))
    for name in c.multi:
      cols[name] = column_values(name, user, items, loc, check.multi, (), None)
    for name, kind in self.fields.items():
      if kind == "text":
        column_values(name, user, items, loc, check.text, None, as_str)
    if errors:
      raise RequestError(capped(errors, limits.max_errors))
    return Parsed(len(items), cols, hit[0], hit[1], user, items)

  def request_schema(self, limits: InputLimits | None = None,
                     max_items: int | None = None) -> dict:
    """JSON Schema of one {'scenario', 'user', 'items'} request for this version: exactly
    what `parse` accepts (published as the server's /openapi.json)."""
    limits = limits or InputLimits()
    string = {"type": "string", "maxLength": limits.max_string_chars}
    scalar = [string, {"type": "integer", "minimum": INT64_MIN, "maximum": INT64_MAX},
              {"type": "number"}]
    props = {}
    for name, kind in self.fields.items():
      if kind == "numeric":
        lo, hi = self._bounds[name]
        s = {"anyOf": [{"type": "number", "minimum": lo, "maximum": hi}, {"type": "null"}],
             "description": "numeric (null = missing)"}
      elif kind == "categorical":
        s = {"anyOf": [*scalar, {"type": "null"}], "description": "categorical value"}
      else:
        lst = {"type": "array", "maxItems": limits.max_list_len, "items": {"anyOf": scalar}}
        s = {"anyOf": [lst, {"type": "null"}] + ([*scalar] if kind == "text" else []),
             "description": "list of values" if kind == "multi" else "item text field"}
      props[name] = s
    fields = {"type": "object", "properties": props, "additionalProperties": False}
    items = {"type": "array", "minItems": 1, "items": fields}
    if max_items:
      items["maxItems"] = max_items
    return {"type": "object", "required": ["scenario", "items"], "additionalProperties": False,
            "properties": {
                "scenario": {"enum": sorted(self._scenario_lookup),
                             "description": "scenario name or raw scenario value"},
                "user": {"anyOf": [fields, {"type": "null"}],
                         "description": "user fields, shared by every item"},
                "items": items}}

  def encode(self, groups: Sequence["Parsed"]) -> dict[str, np.ndarray]:
    """Parsed requests -> one batch of model inputs (rows in request, then item order)."""
    c = self.columns
    sfield = self.transform.state["scenario"]["field"]
    n = sum(g.n for g in groups)
    cols = {}
    # Object arrays of references: a user value shared by every item is one string, not n
    # fixed-width copies as wide as the longest string in the batch.
    for name in c.categorical + c.multi:
      cols[name] = np.fromiter((v for g in groups for v in g.columns[name]), object, n)
    for name in c.numeric:
      cols[name] = np.fromiter((v for g in groups for v in g.columns[name]), np.float64, n)
    # The scenario field must map to a known scenario for the transform; the request's
    # scenario decides the index either way (a row's own value still feeds its features).
    if sfield in c.categorical or sfield in c.numeric:
      col = cols[sfield]
      lookup = self._scenario_lookup
      key = (lambda v: v) if sfield in c.categorical else number_key  # noqa: E731
      rows = [i for i, v in enumerate(col.tolist()) if key(v) not in lookup]
      if rows:
        raw_s = [g.raw_scenario for g in groups for _ in range(g.n)]
        fix = [raw_s[i] for i in rows]
        col[rows] = fix if sfield in c.categorical else np.array(fix, np.float64)
    table = RawTable(columns=cols, row_file=np.zeros(n, np.int32),
                     row_line=np.arange(1, n + 1, dtype=np.int64), files=["<request>"])
    self._add_cf_columns(table)
    arrays, _, _ = self.transform.apply(table, on_error="raise", require_label=False)
    arrays["scenario"] = np.array([g.scenario for g in groups for _ in range(g.n)], np.int32)
    out = {k: arrays[k] for k in INPUT_KEYS}
    if self.item_text:
      out["item_text"], out["item_text_mask"] = self._new_item_text(out["item"], groups)
    return out

  def _item_texts(self, items: np.ndarray, groups: Sequence["Parsed"]) -> list:
    """The template text of every row whose item the model does not know (else None)."""
    template = self.item_text["template"]
    fields = template_fields(template)
    raw = [(g.user or {}, item) for g in groups for item in (g.items or [{}] * g.n)]
    texts = [None] * len(raw)
    for i in np.flatnonzero(np.asarray(items) == schema_lib.OOV_ID).tolist():
      user, item = raw[i]
      values = {f: item.get(f, user.get(f)) for f in fields}
      if any(v not in (None, "") for v in values.values()):
        texts[i] = format_text(template, values)
    return texts

  def _new_item_text(self, items: np.ndarray,
                     groups: Sequence["Parsed"]) -> tuple[np.ndarray, np.ndarray]:
    """Text vectors for items unknown to the model (OOV) that came with text fields."""
    texts = self._item_texts(items, groups)
    mask = np.array([t is not None for t in texts], bool)
    vecs = np.zeros((len(texts), int(self.item_text["dim"])), np.float32)
    if mask.any():
      todo = sorted({texts[i] for i in np.flatnonzero(mask)} - set(self._text_vectors))
      if todo:
        if self._encoder is None:  # loaded on the first new item, not at start-up
          self._encoder = self._load_encoder()
        if len(self._text_vectors) > 100_000:  # bounded memo of encoded texts
          self._text_vectors.clear()
        for t, v in zip(todo, self._encoder.encode(todo, progress=False)):
          self._text_vectors[t] = np.asarray(v, np.float32)
      for i in np.flatnonzero(mask):
        vecs[i] = self._text_vectors[texts[i]]
    return vecs, mask

  def _load_encoder(self):
    """The language model the version's text tables were made with: the copy inside the
    version (text/encoder/), or, for versions exported before it travelled along, the model
    path recorded at export. Anything missing or different is ModelUnavailable (503)."""
    # Imported here, not at the top: the encoder pulls in Flax, which serving a model
    # without text never needs.
    from mscenario.text.encoder import load_encoder
    spec = self.item_text
    rel = spec.get("encoder")
    if rel:
      model_dir = os.path.join(self.path, rel)
      missing = [f for f in spec.get("encoder_files", ())
                 if not os.path.isfile(os.path.join(model_dir, f))]
      if missing:
        raise ModelUnavailable(
            f"version {self.version} cannot encode the text of items new to the model: "
            f"{model_dir} lacks {', '.join(missing)} (the language model exported with it); "
            "re-export the model with `mscenario export`")
    else:
      model_dir = spec.get("model_path") or None
    try:
      encoder = load_encoder(model_dir)
    except MscenarioError as e:
      raise ModelUnavailable(f"version {self.version} cannot encode the text of items new "
                             f"to the model: {e}") from None
    if encoder.fingerprint != spec["fingerprint"]:
      raise ModelUnavailable(
          f"version {self.version} cannot encode the text of items new to the model: the "
          f"language model at {encoder.model_dir} is not the one it was trained with "
          f"(fingerprint {encoder.fingerprint} != {spec['fingerprint']}); re-export it")
    return encoder

  # -- scoring -----------------------------------------------------------------------------
  def empty_batch(self, n: int) -> dict[str, np.ndarray]:
    return {k: np.zeros(shape, dtype) for k, (shape, dtype) in
            input_spec(self.manifest, n).items()}

  def score_arrays(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Probabilities [N] for model-input arrays, padded into the compiled bucket sizes."""
    n = len(arrays["scenario"])
    missing = [k for k in self.input_keys if k not in arrays]
    if missing:  # e.g. prepared arrays without new-item text: no row is new
      spec = input_spec(self.manifest, n)
      arrays = {**arrays, **{k: np.zeros(spec[k][0], spec[k][1]) for k in missing}}
    out = []
    start = 0
    largest = self.buckets[-1]
    while start < n:
      left = n - start
      b = next((b for b in self.buckets if b >= left), largest)
      take = min(left, b)
      chunk = {}
      for k in self.input_keys:
        a = np.asarray(arrays[k][start:start + take])
        if take < b:
          pad = np.zeros((b - take,) + a.shape[1:], a.dtype)
          a = np.concatenate([a, pad])
        chunk[k] = a
      out.append(np.asarray(self.fns[b](self.weights, chunk))[:take])
      start += take
    return np.concatenate(out) if out else np.zeros(0, np.float32)

  def predict(self, request: dict) -> np.ndarray:
    """One {'scenario', 'user', 'items'} request -> probabilities in item order."""
    return self.score_arrays(self.encode([self.parse(request)]))

  # -- explanations (POST /v1/explain) -------------------------------------------------------
  def _load_explain_functions(self) -> dict:
    """{bucket: fn} of the exported integrated-gradients function ({} for versions exported
    without one). Compiled on first use, not at load: a hot swap stays as fast as before."""
    fns = {}
    for b, rel in (self.manifest.get("explain") or {}).get("functions", {}).items():
      with open(os.path.join(self.path, rel), "rb") as f:
        fns[int(b)] = _load_function(f.read())
    return fns

  def no_explanation(self) -> NoExplanation:
    return NoExplanation(
        f"version {self.version} was exported without an explanation function (exported "
        "before /v1/explain existed, or without its training data at hand); re-export it "
        "with `mscenario export` where the run's data is available")

  def explain_arrays(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{'attributions' [N, G], 'logit' [N], 'baseline_logit' [N]} for model-input arrays
    (features: manifest['explain']['features']), padded into the exported explain buckets."""
    if not self.explain_fns:
      raise self.no_explanation()
    n = len(arrays["scenario"])
    spec = input_spec(self.manifest, n)
    arrays = {**{k: np.zeros(spec[k][0], spec[k][1]) for k in self.input_keys
                 if k not in arrays}, **arrays}
    buckets = sorted(self.explain_fns)
    parts = []
    for start in range(0, n, buckets[-1]):
      take = min(n - start, buckets[-1])
      b = next(b for b in buckets if b >= take)
      chunk = {k: np.asarray(arrays[k][start:start + take]) for k in self.input_keys}
      if take < b:
        chunk = {k: np.concatenate([a, np.zeros((b - take,) + a.shape[1:], a.dtype)])
                 for k, a in chunk.items()}
      out = self.explain_fns[b](self.weights, chunk)
      parts.append({k: np.asarray(v)[:take] for k, v in out.items()})
    if not parts:
      g = len(self.manifest["explain"]["features"])
      return {"attributions": np.zeros((0, g), np.float32),
              "logit": np.zeros(0, np.float32), "baseline_logit": np.zeros(0, np.float32)}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# ---------------------------------------------------------------------------- swappable holder
class Predictor:
  """The version being served, swapped atomically when MODEL_DIR/CURRENT changes.

  Readers take `predictor.current` once and use that object for a whole batch, so a swap
  never mixes two versions inside one response.
  """

  def __init__(self, model_dir: str):
    self.model_dir = os.path.abspath(model_dir)
    self._lock = threading.Lock()
    self._loaded_name = current_version_name(self.model_dir)
    self.current = ModelVersion(resolve_version_dir(self.model_dir))

  def maybe_reload(self) -> bool:
    """Load the version CURRENT names if it is not the one being served; True if swapped."""
    with self._lock:
      name = current_version_name(self.model_dir)
      if name is None or name == self._loaded_name:
        return False
      new = ModelVersion(resolve_version_dir(self.model_dir))  # fully loaded + warmed up
      self.current, self._loaded_name = new, name  # one reference assignment: atomic
      return True


def load(model_dir: str) -> ModelVersion:
  """The version a model dir currently names (for scripts and tests)."""
  return ModelVersion(resolve_version_dir(model_dir))

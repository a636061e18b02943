"""Fusing frozen text (or any per-item vector) tables into every model's features.

The language model's item and scenario embeddings reach the models through the same
`embed_batch` / `model_input` every model already calls, so no model needs to know about
text. A `TextSchema` (a FeatureSchema carrying a `TextSpec`) switches fusion on:

  concat     item slot kept; a learned projection of the item's text is an extra feature
             slot 'text:item'
  gate       item slot = g * id_emb + (1 - g) * proj(text), g = sigmoid(w·[id_emb, proj]+b)
             per row, so rare ids (near-init embeddings) can lean on text
  text_only  item slot = proj(text); the item id embedding is not used (cold start)
  none       no item text (scenario context only)
  scenario_context=True adds a slot 'text:scenario' = proj(scenario description
             embedding), so a scenario never seen in training is scored from its text.

Extra slots are declared as zero-row "virtual" sparse features of the TextSchema, so models
that pick features by name (seed's user/item sides) see them like any other feature. The
tables live in the non-trainable 'text' collection, row-sharded like the id table
(logical axes ('vocab', 'embed')), and are padded to TABLE_ROW_ALIGN rows so they split
evenly over the mesh. Making and loading the tables is text/prepare.py's job.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mscenario.data.schema import TABLE_ROW_ALIGN, FeatureSchema, SparseFeature
from mscenario.errors import ConfigError, MscenarioError
# Re-exported for train/loop.py, which still imports it from here (to move to text.prepare).
from mscenario.text.prepare import prepare_text_tables  # noqa: F401

FUSIONS = ("concat", "gate", "text_only", "none")
TEXT_COLLECTION = "text"
TEXT_AXES = ("vocab", "embed")
ITEM_SLOT = "text:item"
SCENARIO_SLOT = "text:scenario"


@dataclasses.dataclass(frozen=True)
class TextSpec:
  """Static description of the fused tables (hashable: it is a module field)."""
  fusion: str = "concat"
  item_dim: int = 0            # width of the item table (text dim + item_vectors dim)
  item_rows: int = 0           # padded rows of the item table (>= item_vocab_size)
  scenario_context: bool = False
  scenario_dim: int = 0
  scenario_rows: int = 0
  item_slot: int = -1          # index of the item id feature among the base sparse features
  proj_hidden: tuple = ()      # hidden widths of the text -> embedding projection (MLP)
  # Scenario index each scenario is scored as: an unseen one (no training rows) -> the
  # trained scenario whose description embedding is nearest (cosine); () = identity.
  scenario_route: tuple = ()
  # Content affinity: the candidate's projected text attends over the projected texts of the
  # user's history items (needs data.history) -> label / value the user gave similar items.
  history_affinity: bool = False

  @property
  def uses_items(self) -> bool:
    return self.fusion != "none"


@dataclasses.dataclass(frozen=True)
class TextSchema(FeatureSchema):
  """A FeatureSchema whose `sparse` also lists the virtual text slots (vocab_size 0).

  The id table's layout (offsets, rows) stays the base schema's: virtual slots own no rows.
  """
  base: FeatureSchema | None = None
  text: TextSpec | None = None

  @property
  def embedding_offsets(self) -> tuple[int, ...]:
    return self.base.embedding_offsets

  @property
  def total_embedding_rows(self) -> int:
    return self.base.total_embedding_rows

  @property
  def table_rows(self) -> int:
    return self.base.table_rows


def padded_rows(n: int) -> int:
  return max(1, -(-n // TABLE_ROW_ALIGN)) * TABLE_ROW_ALIGN


def item_feature_index(schema: FeatureSchema, config) -> int:
  """Index of the sparse feature holding the item id (column == data.item_field), or -1."""
  field = config.data.item_field
  by_column = {spec.get("column", name): name for name, spec in config.data.features.items()
               if spec.get("kind") == "sparse"}
  name = by_column.get(field, field)
  names = [f.name for f in schema.sparse]
  return names.index(name) if name in names else -1


def text_schema(config, schema: FeatureSchema, tables: dict) -> TextSchema:
  """The model schema for `config.text` given the loaded tables ('items', 'scenarios')."""
  tc = config.text
  fusion = tc.get("fusion", "concat")
  if fusion not in FUSIONS:
    raise ConfigError(f"text.fusion={fusion!r}: expected one of {', '.join(FUSIONS)}")
  scenario_context = bool(tc.get("scenario_context", False))
  item_slot = item_feature_index(schema, config)
  if fusion in ("gate", "text_only") and item_slot < 0:
    raise ConfigError(f"text.fusion={fusion!r} replaces the item id feature, but no sparse "
                      f"feature reads the item field '{config.data.item_field}'")
  items, scen = tables.get("items"), tables.get("scenarios")
  if fusion != "none" and items is None:
    raise MscenarioError("text fusion needs an 'items' table")
  if scenario_context and scen is None:
    raise MscenarioError("text.scenario_context needs a 'scenarios' table")
  if items is not None and items.shape[0] < schema.item_vocab_size:
    raise MscenarioError(f"the item table has {items.shape[0]} rows but the item vocabulary "
                         f"has {schema.item_vocab_size}: re-run `mscenario encode`")
  if scen is not None and scenario_context and scen.shape[0] != schema.num_scenarios:
    raise MscenarioError(f"the scenario table has {scen.shape[0]} rows for "
                         f"{schema.num_scenarios} scenarios: re-run `mscenario encode`")
  route = ()
  unseen = tc.get("unseen_scenario", "nearest")
  if unseen not in ("nearest", "none"):
    raise ConfigError(f"text.unseen_scenario={unseen!r}: expected nearest or none")
  if unseen == "nearest" and scen is not None and tables.get("scenario_seen") is not None:
    route = scenario_route(scen, tables["scenario_seen"])
  spec = TextSpec(
      fusion=fusion,
      item_dim=int(items.shape[1]) if fusion != "none" else 0,
      item_rows=padded_rows(items.shape[0]) if fusion != "none" else 0,
      scenario_context=scenario_context,
      scenario_dim=int(scen.shape[1]) if scenario_context else 0,
      scenario_rows=padded_rows(scen.shape[0]) if scenario_context else 0,
      item_slot=item_slot,
      proj_hidden=tuple(int(w) for w in tc.get("proj_hidden", ())),
      scenario_route=route,
      history_affinity=bool(tc.get("history_affinity", True)) and fusion != "none"
      and bool(schema.history_length))
  return make_text_schema(schema, spec)


def scenario_route(descriptions: np.ndarray, seen: np.ndarray) -> tuple[int, ...]:
  """For each scenario, itself if it had training rows, else the trained scenario whose
  description embedding is most similar (cosine). () when every scenario was trained on
  (nothing to route) or none was (nothing to route to)."""
  seen = np.asarray(seen) > 0
  if seen.all() or not seen.any():
    return ()
  d = np.asarray(descriptions, np.float64)
  d = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
  sim = d @ d[seen].T
  nearest = np.flatnonzero(seen)[np.argmax(sim, axis=1)]
  return tuple(int(s) if seen[s] else int(nearest[s]) for s in range(len(seen)))


def route_scenarios(model, batch: dict) -> dict:
  """Apply the model's scenario route (if any) to batch['scenario'], before every model
  reads it: an unseen scenario is then scored by its nearest trained one's parameters."""
  spec = getattr(getattr(model, "schema", None), "text", None)
  route = getattr(spec, "scenario_route", ()) if spec is not None else ()
  if not route:
    return batch
  table = jnp.asarray(route, jnp.int32)
  return {**batch, "scenario": table[batch["scenario"].astype(jnp.int32)]}


def make_text_schema(schema: FeatureSchema, spec: TextSpec) -> TextSchema:
  extra = []
  if spec.fusion == "concat":
    extra.append(SparseFeature(ITEM_SLOT, 0))
  if spec.scenario_context:
    extra.append(SparseFeature(SCENARIO_SLOT, 0))
  return TextSchema(sparse=tuple(schema.sparse) + tuple(extra), multi=schema.multi,
                    dense=schema.dense, scenario_names=schema.scenario_names,
                    user_vocab_size=schema.user_vocab_size,
                    item_vocab_size=schema.item_vocab_size, base=schema, text=spec)


def table_values(spec: TextSpec, tables: dict) -> dict:
  """Tables padded to the spec's rows: the values of the 'text' collection (float32)."""
  out = {}
  if spec.uses_items:
    out["items"] = _pad(tables["items"], spec.item_rows)
  if spec.scenario_context:
    out["scenarios"] = _pad(tables["scenarios"], spec.scenario_rows)
  return out


def _pad(a: np.ndarray, rows: int) -> np.ndarray:
  a = np.asarray(a, np.float32)
  out = np.zeros((rows, a.shape[1]), np.float32)
  out[: a.shape[0]] = a
  return out


# ---------------------------------------------------------------------------- module
def _zeros(shape):
  return jnp.zeros(shape, jnp.float32)


AFFINITY_FEATURES = 4


def history_affinity(cand: jax.Array, hist: jax.Array, feedback: jax.Array,
                     value: jax.Array, temperature: jax.Array) -> jax.Array:
  """[B, 4]: what the user gave items whose text resembles the candidate's.

  cand [B, E] and hist [B, K, E] projected texts; feedback [B, K] (label + 1, 0 = padding),
  value [B, K] raw feedback. Cosine similarities, softmax-weighted (learned temperature)
  means of label and value, plus the max and mean similarity. A brand-new item has no id
  embedding, but a user who loved every similar film is still visible here.
  """
  mask = feedback > 0
  # sqrt(|x|^2 + eps), not linalg.norm: the norm's gradient at a zero vector (padding rows
  # project to 0 while biases are 0) is NaN, and jnp.where does not stop a NaN gradient.
  unit = lambda x: x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)
  sim = jnp.einsum("be,bke->bk", unit(cand), unit(hist))
  weights = jax.nn.softmax(jnp.where(mask, sim * temperature, -1e9), axis=-1)
  weights = weights * mask.any(axis=1, keepdims=True)
  label = jnp.maximum(feedback - 1, 0).astype(jnp.float32)
  n = jnp.maximum(mask.sum(axis=1), 1)
  return jnp.stack([(weights * label).sum(1), (weights * value * mask).sum(1),
                    jnp.where(mask, sim, -1.0).max(1), (sim * mask).sum(1) / n], axis=1)


class TextFusion(nn.Module):
  """emb [B, S + M, E] (base sparse slots, then pooled multi) -> (fused embeddings, extra
  dense columns [B, D'] from the history affinity, D' = 0 without it)."""
  spec: TextSpec
  embed_dim: int
  n_sparse: int

  @nn.compact
  def __call__(self, emb: jax.Array, batch: dict) -> tuple[jax.Array, jax.Array]:
    spec = self.spec
    init = nn.with_logical_partitioning(_zeros, TEXT_AXES)
    sparse, multi = emb[:, : self.n_sparse], emb[:, self.n_sparse:]
    extra = []
    dense = jnp.zeros((emb.shape[0], 0), jnp.float32)
    hidden = [nn.Dense(w, name=f"item_proj_hidden_{i}") for i, w in enumerate(spec.proj_hidden)]
    out_layer = nn.Dense(self.embed_dim, name="item_proj")

    def project(t):  # optional MLP (genre x year interactions), then to the embedding width
      for layer in hidden:
        t = nn.relu(layer(t))
      return out_layer(t)

    if spec.uses_items:
      if "item" not in batch:
        raise MscenarioError("text fusion needs batch['item'] (item vocabulary ids)")
      items = self.variable(TEXT_COLLECTION, "items", init, (spec.item_rows, spec.item_dim))
      text = jnp.take(items.value, batch["item"].astype(jnp.int32), axis=0)
      if "item_text" in batch:  # items new at predict time, encoded from their raw text
        fresh = batch["item_text"].astype(text.dtype)
        fresh = jnp.pad(fresh, ((0, 0), (0, text.shape[1] - fresh.shape[1])))
        text = jnp.where(batch["item_text_mask"][:, None], fresh, text)
      proj = project(text).astype(emb.dtype)
      if spec.history_affinity and "hist_item_key" in batch:
        keys = batch["hist_item_key"].astype(jnp.int32)
        if spec.item_rows <= keys.size:  # project the table once, then gather (cheaper)
          hist_proj = jnp.take(project(items.value), keys, axis=0)
        else:                             # huge catalogue: project only what is read
          hist_proj = project(jnp.take(items.value, keys, axis=0))
        temperature = self.param("affinity_temperature", nn.initializers.constant(5.0), ())
        dense = history_affinity(proj.astype(jnp.float32), hist_proj.astype(jnp.float32),
                                 batch["hist_feedback"], batch["hist_value"], temperature)
      if spec.fusion == "concat":
        extra.append(proj)
      else:
        k = spec.item_slot
        if spec.fusion == "gate":
          ids = sparse[:, k]
          g = nn.sigmoid(nn.Dense(1, name="gate")(jnp.concatenate([ids, proj], axis=1)))
          self.sow("intermediates", "gate_value", g[:, 0])
          fused = g * ids + (1.0 - g) * proj
        else:  # text_only: the id embedding is dropped
          fused = proj
        sparse = sparse.at[:, k].set(fused)
    if spec.scenario_context:
      scen = self.variable(TEXT_COLLECTION, "scenarios", init,
                           (spec.scenario_rows, spec.scenario_dim))
      text = jnp.take(scen.value, batch["scenario"].astype(jnp.int32), axis=0)
      extra.append(nn.Dense(self.embed_dim, name="scenario_proj")(text).astype(emb.dtype))
    return jnp.concatenate([sparse, *(e[:, None] for e in extra), multi], axis=1), dense

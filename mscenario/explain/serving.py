"""The explanation function an exported version carries (the service's POST /v1/explain).

The same integrated gradients as `mscenario explain` (integrated.make_ig, same steps, same
midpoint rule, same baseline from baseline.compute_baseline over the run's training rows),
as one function of the version's flat weights and a request batch:

  explain(weights, batch) -> {'attributions' [B, G], 'logit' [B], 'baseline_logit' [B]}

The baseline is baked in as constants: it belongs to the weights it was computed from, so a
version cannot be served with another version's baseline. The serving side loads the
serialised function only (no model classes, no training code).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from mscenario.explain import attribute
from mscenario.explain.baseline import compute_baseline, context_paths
from mscenario.explain.groups import make_groups
from mscenario.explain.integrated import DEFAULT_STEPS, make_ig
from mscenario.flat import unflatten
from mscenario.models.embedding import batch_ids

BASELINE_TEXT = ("frequency-weighted mean embedding of each feature over the training rows; "
                 "dense: training mean; scenario context: traffic-weighted mean over "
                 "scenarios; same scenario")


@dataclasses.dataclass
class ServingExplanation:
  """What write_version serialises: the function and the manifest's 'explain' entry."""
  fn: Callable            # (weights, batch) -> {'attributions', 'logit', 'baseline_logit'}
  features: tuple[str, ...]
  steps: int

  def manifest_entry(self) -> dict:
    return {"method": "integrated gradients", "target": "logit", "steps": self.steps,
            "rule": "midpoint", "baseline": BASELINE_TEXT, "features": list(self.features),
            "completeness_tolerance": {"atol": attribute.COMPLETENESS_ATOL,
                                       "rtol": attribute.COMPLETENESS_RTOL}}


def split_weights(weights: dict, sparse_mode: bool):
  """Flat export weights -> (params as the model takes them, model_state, table)."""
  tree = unflatten(weights)
  params = dict(tree["params"])
  table = params["embedding"]["table"]
  if sparse_mode:  # the model was built without a table param (rows come gathered)
    emb = dict(params.pop("embedding"))
    emb.pop("table")
    if emb:
      params["embedding"] = emb
  return params, tree.get("model_state", {}), table


def build(setup, state, arrays: dict, train_idx: np.ndarray, sparse_mode: bool,
          steps: int = DEFAULT_STEPS) -> ServingExplanation:
  """The explanation function of a restored run: `state` its weights (for the baseline),
  `arrays`/`train_idx` its prepared data and training rows (as `mscenario explain` reads)."""
  model = setup.model
  schema = model.schema
  params = state.params
  paths = context_paths(params, schema.num_scenarios)
  groups = make_groups(schema, bool(paths))
  table = attribute.table_of(state)
  b = compute_baseline(schema, groups, np.asarray(table), arrays, np.asarray(train_idx),
                       params, schema.num_scenarios)
  ig = make_ig(model, groups.onehot, paths, steps)
  base_rows, base_dense = jnp.asarray(b.rows), jnp.asarray(b.dense)
  base_ctx = {p: jnp.asarray(v) for p, v in b.context.items()}

  def explain(weights, batch):
    params, model_state, table = split_weights(weights, sparse_mode)
    rows = table.at[batch_ids(schema, batch)].get(mode="fill", fill_value=0)
    attr, logit, base_logit = ig(params, model_state, batch, rows, base_rows, base_dense,
                                 base_ctx)
    return {"attributions": attr, "logit": logit, "baseline_logit": base_logit}

  return ServingExplanation(explain, groups.names, steps)

"""explain.json, attributions.csv and the PNGs for one explained run."""
from __future__ import annotations

import csv
import os

import jax
import jax.numpy as jnp
import numpy as np

from mscenario.explain import attribute, internals, neighbours, plots, summary
from mscenario.explain.attribute import _batch
from mscenario.explain.baseline import context_paths, get_path
from mscenario.explain.integrated import make_logits_fn
from mscenario.metrics import auc
from mscenario.train.workdir import write_json


def _clean(x):
  """JSON-safe nested lists (NaN -> None)."""
  a = np.asarray(x, np.float64)
  return [_clean(v) for v in a] if a.ndim else (None if not np.isfinite(a) else float(a))


def _batches(explainer, arrays, idx, batch_size: int):
  """(batch with its embedding rows, real row count) per fixed-size batch of rows `idx`; the
  last batch is padded with copies of its first row (one compiled shape)."""
  for lo in range(0, len(idx), batch_size):
    part = idx[lo: lo + batch_size]
    real = len(part)
    if real < batch_size:
      part = np.concatenate([part, np.full(batch_size - real, part[0])])
    batch = {k: jnp.asarray(v) for k, v in _batch(arrays, part).items()}
    batch["embedding_rows"] = explainer.gather(batch)
    yield batch, real


def _gates(run, explainer, arrays, idx, batch_size: int):
  """{gate name: [S, E] mean gate of each scenario's rows}, from the explained rows."""
  fn = internals.make_gate_fn(run.setup.model)
  s = run.setup.model.schema.num_scenarios
  sums, counts = {}, np.zeros(s)
  for batch, real in _batches(explainer, arrays, idx, batch_size):
    gates = fn(run.state.params, run.state.model_state, batch)
    onehot = np.eye(s)[np.asarray(batch["scenario"][:real]).astype(np.int64)]  # [B, S]
    for name, g in gates.items():
      g = np.asarray(g)[:real]                      # [B, S, E]: row b's gate of scenario s
      own = np.einsum("bs,bse->se", onehot, g)      # each row's own scenario's gate
      sums[name] = sums.get(name, 0) + own
    counts += onehot.sum(axis=0)
  return {k: v / np.maximum(counts, 1)[:, None] for k, v in sums.items()}


def _captured(run, explainer, arrays, idx, batch_size: int):
  """Per-row gates -> ({name: [S, W] mean per scenario}, {name: [S, W] fraction exactly 0});
  per-scenario outputs (M2M's generated weights, scenario representations) -> {name: value}
  as computed once from the params."""
  fn = internals.make_capture_fn(run.setup.model)
  s = run.setup.model.schema.num_scenarios
  sums, zeros, counts, fixed = {}, {}, np.zeros(s), {}
  for batch, real in _batches(explainer, arrays, idx, batch_size):
    out = fn(run.state.params, run.state.model_state, batch)
    if not out:
      return {}, {}, {}
    onehot = np.eye(s)[np.asarray(batch["scenario"][:real]).astype(np.int64)]  # [B, S]
    for name, v in out.items():
      last = name.rsplit("/", 1)[-1]
      if last.startswith(internals.META_UNITS) or last in internals.SCENARIO_REPS:
        fixed.setdefault(name, jax.tree.map(np.asarray, v))
        continue
      g = np.asarray(v, np.float64)[:real]                                         # [B, W]
      sums[name] = sums.get(name, 0) + onehot.T @ g
      zeros[name] = zeros.get(name, 0) + onehot.T @ (g == 0).astype(np.float64)
    counts += onehot.sum(axis=0)
  c = np.maximum(counts, 1)[:, None]
  return ({k: v / c for k, v in sums.items()}, {k: v / c for k, v in zeros.items()}, fixed)


def _gate_sections(run, out: str, names: list, means: dict, zeros: dict, fixed: dict,
                   result: dict, sims: list) -> None:
  """explain.json sections + PNGs of the captured gates and M2M's scenario parameters."""
  model = run.setup.model
  neutral = internals.neutral_gate(model)
  profiles = []
  for name, m in means.items():
    last = name.rsplit("/", 1)[-1]
    if last in internals.INPUT_GATES:
      cols = internals.input_columns(model, m.shape[1])
      if cols is None:
        continue
      feats, table = internals.per_feature(m, cols)
      file = f"input_gate_{name.replace('/', '_')}.png"
      plots.heatmap(table, names, feats, os.path.join(out, file),
                    f"mean {last} gate per feature and scenario ({neutral:g} = unchanged)",
                    cmap="coolwarm", vmin=min(table.min(), 2 * neutral - table.max()),
                    vmax=max(table.max(), 2 * neutral - table.min()))
      result.setdefault("input_gates", {})[name] = {
          "features": feats, "mean_gate": _clean(table), "neutral": neutral, "png": file}
      profiles.append(m - neutral)  # amplified (+) / damped (-) per column
    else:
      result.setdefault("layer_gates", {})[name] = {
          "units": int(m.shape[1]), "mean_gate": _clean(m.mean(axis=1)),
          "fraction_zero": _clean(zeros[name].mean(axis=1)), "neutral": neutral}
  if profiles:
    sim = summary.cosine_similarity(np.concatenate(profiles, axis=1))
    result["similarity"]["input_gates"] = _clean(sim)
    sims.append(("input gates", sim))
  units = {k: v for k, v in fixed.items()
           if k.rsplit("/", 1)[-1].startswith(internals.META_UNITS)}
  if units:
    params = {}
    for name, (kernel, bias) in sorted(units.items()):
      k2 = kernel.reshape(kernel.shape[0], -1).astype(np.float64)
      params[name] = {
          "kernel_norm": _clean(np.linalg.norm(k2, axis=1)),
          "kernel_specific_norm": _clean(np.linalg.norm(k2 - k2.mean(axis=0), axis=1)),
          "bias_norm": _clean(np.linalg.norm(bias.astype(np.float64), axis=1))}
    table = np.asarray([params[n]["kernel_specific_norm"] for n in params]).T     # [S, U]
    plots.heatmap(table, names, list(params), os.path.join(out, "scenario_parameters.png"),
                  "norm of each scenario's generated weights minus the scenarios' mean")
    result["scenario_parameters"] = {"units": params, "png": "scenario_parameters.png"}
    flat = np.concatenate([units[n][0].reshape(len(names), -1) for n in sorted(units)], 1)
    sim = summary.cosine_similarity(flat - flat.mean(axis=0))
    result["similarity"]["generated_weights"] = _clean(sim)
    sims.append(("generated weights", sim))


def _embedding_similarity(run, result: dict, sims: list) -> None:
  """Cosine of the learned scenario embedding rows (every model with such a param)."""
  params = run.state.params
  for path in context_paths(params, run.setup.model.schema.num_scenarios):
    sim = summary.cosine_similarity(np.asarray(get_path(params, path), np.float64))
    key = "/".join(map(str, path))
    result["similarity"].setdefault("scenario_embedding", {})[key] = _clean(sim)
    sims.append((path[-1], sim))


def _star(run, explainer, arrays, idx, batch_size: int):
  """Shared network alone vs full logits per scenario (None: no scenario factors)."""
  shared_params = internals.identity_params(run.state.params, explainer.baseline.context)
  if shared_params is None:
    return None
  fn = jax.jit(make_logits_fn(run.setup.model))
  full, shared = [], []
  for batch, real in _batches(explainer, arrays, idx, batch_size):
    full.append(np.asarray(fn(run.state.params, run.state.model_state, batch))[:real])
    shared.append(np.asarray(fn(shared_params, run.state.model_state, batch))[:real])
  full, shared = np.concatenate(full), np.concatenate(shared)
  scen = np.asarray(arrays["scenario"][idx]).astype(np.int64)
  labels = np.asarray(arrays["label"][idx])
  out = {}
  for s, name in enumerate(run.setup.model.schema.scenario_names):
    m = scen == s
    if not m.any():
      continue
    spec = np.abs(full[m] - shared[m]).mean()
    spread = np.abs(shared[m] - shared[m].mean()).mean()
    entry = {"rows": int(m.sum()), "mean_logit_full": float(full[m].mean()),
             "mean_logit_shared": float(shared[m].mean()),
             "mean_abs_specific": float(spec), "mean_abs_shared_spread": float(spread),
             "specific_share": float(spec / max(spec + spread, 1e-12)),
             "corr_full_shared": float(np.corrcoef(full[m], shared[m])[0, 1])
             if m.sum() > 1 else None}
    if len(np.unique(labels[m])) == 2:
      entry["auc_full"] = float(auc(labels[m], full[m]))
      entry["auc_shared"] = float(auc(labels[m], shared[m]))
    out[name] = entry
  return out


def write(out: str, run, explainer, a: attribute.Attributions, arrays, lines, source: str,
          batch_size: int, cold_items=()) -> dict:
  schema = run.setup.model.schema
  names = list(schema.scenario_names)
  s = len(names)
  feats = list(a.groups.names)
  table = summary.per_scenario_mean_abs(a.attr, a.scenario, s)
  signed = summary.per_scenario_mean(a.attr, a.scenario, s)
  counts = np.bincount(a.scenario, minlength=s)
  res = a.residual
  gap = np.abs(a.logit - a.base_logit)
  result = {
      "source": source, "rows": int(len(a.index)), "model": run.config.model.name,
      "method": {"name": "integrated gradients", "steps": a.steps, "rule": "midpoint",
                 "baseline": "frequency-weighted mean embedding of each feature over the "
                             "training rows; dense: training mean; scenario context: "
                             "traffic-weighted mean over scenarios; same scenario",
                 "target": "logit"},
      "completeness": {
          "max_abs_residual": float(np.abs(res).max()),
          "mean_abs_residual": float(np.abs(res).mean()),
          "max_residual_over_1_plus_gap": float((np.abs(res) / (1 + gap)).max()),
          "tolerance": f"|sum(attr) - (logit - baseline_logit)| <= "
                       f"{attribute.COMPLETENESS_ATOL} + {attribute.COMPLETENESS_RTOL} * "
                       f"|logit - baseline_logit|",
          "fraction_within": float(a.within_tolerance().mean())},
      "features": feats, "scenarios": names,
      "rows_per_scenario": {n: int(c) for n, c in zip(names, counts)},
      "mean_abs_attribution": {n: dict(zip(feats, _clean(table[i]))) for i, n in
                               enumerate(names)},
      "mean_attribution": {n: dict(zip(feats, _clean(signed[i]))) for i, n in
                           enumerate(names)},
      "mean_logit": {n: _clean(summary.per_scenario_mean(a.logit, a.scenario, s)[i])
                     for i, n in enumerate(names)},
      "mean_baseline_logit": {n: _clean(summary.per_scenario_mean(a.base_logit, a.scenario,
                                                                  s)[i])
                              for i, n in enumerate(names)},
      "similarity": {"attribution": _clean(summary.cosine_similarity(table))},
      "files": {"rows_csv": "attributions.csv", "heatmap": "attribution_heatmap.png",
                "similarity": "scenario_similarity.png"},
  }
  plots.heatmap(table, names, feats, os.path.join(out, "attribution_heatmap.png"),
                f"mean |IG attribution| of the logit ({run.config.model.name})")
  gates = _gates(run, explainer, arrays, a.index, batch_size)
  if gates:
    result["gates"] = {}
    profiles = []
    for name, g in gates.items():
      labels = internals.expert_labels(run.setup.model, g.shape[1])
      file = f"gates_{name.replace('/', '_')}.png"
      plots.heatmap(g, names, labels, os.path.join(out, file),
                    f"mean gate weight per scenario ({name})", vmin=0.0, vmax=1.0)
      result["gates"][name] = {"experts": labels, "mean_gate": _clean(g), "png": file}
      profiles.append(g - 1.0 / g.shape[1])  # preference over uniform use: cosine then
      # says which scenarios lean on the same experts (raw gates are all near-uniform-positive)
    result["similarity"]["gates"] = _clean(summary.cosine_similarity(
        np.concatenate(profiles, axis=1)))
  star = _star(run, explainer, arrays, a.index, batch_size)
  if star is not None:
    result["shared_vs_specific"] = star
  sims = [("attribution", summary.cosine_similarity(table))]
  if gates:
    sims.append(("gates", np.asarray(result["similarity"]["gates"], np.float64)))
  means, zeros, fixed = _captured(run, explainer, arrays, a.index, batch_size)
  _gate_sections(run, out, names, means, zeros, fixed, result, sims)
  _embedding_similarity(run, result, sims)
  sim_rows = [f"{n} ({k})" for k, _ in sims for n in names]
  plots.heatmap(np.concatenate([m for _, m in sims]), sim_rows, names,
                os.path.join(out, "scenario_similarity.png"),
                "scenario similarity (cosine of per-scenario profiles)", vmin=-1.0, vmax=1.0,
                cmap="coolwarm")
  if cold_items:
    _cold_items(out, cold_items, a, lines, result)
  _write_csv(os.path.join(out, "attributions.csv"), a, lines, names, feats)
  write_json(os.path.join(out, "explain.json"), result, indent=2)
  return result


def _cold_items(out: str, cold: list, a, lines, result: dict) -> None:
  """explain.json 'cold_items' (the first neighbours.MAX_COLD_ROWS) and
  cold_item_neighbours.csv (all): each cold row's input line, logit and nearest training
  items in the text space."""
  pos = {int(r): i for i, r in enumerate(a.index)}
  entries = []
  for c in cold:
    i = pos[c["row"]]
    entries.append({"line": int(lines[i]), "scenario": c["scenario"],
                    "logit": float(a.logit[i]), "neighbours": c["neighbours"]})
  result["cold_items"] = {
      "method": "cosine similarity of the row's text vector to the item text table's rows of "
                "items in the training rows", "rows": len(entries),
      "items": entries[:neighbours.MAX_COLD_ROWS], "csv": "cold_item_neighbours.csv"}
  result["files"]["cold_items_csv"] = "cold_item_neighbours.csv"
  with open(os.path.join(out, "cold_item_neighbours.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["line", "scenario", "logit", "rank", "item", "cosine",
                "train_rows_in_scenario", "train_click_rate_in_scenario"])
    for e in entries:
      for k, n in enumerate(e["neighbours"], 1):
        rate = n["train_click_rate_in_scenario"]
        w.writerow([e["line"], e["scenario"], f"{e['logit']:.6f}", k, n["item"],
                    f"{n['cosine']:.6f}", n["train_rows_in_scenario"],
                    "" if rate is None else f"{rate:.4f}"])


def _write_csv(path: str, a, lines, names, feats) -> None:
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["line", "scenario", "logit", "baseline_logit", "residual", *feats])
    for i in range(len(a.index)):
      w.writerow([int(lines[i]), names[a.scenario[i]], f"{a.logit[i]:.6f}",
                  f"{a.base_logit[i]:.6f}", f"{a.residual[i]:.2e}",
                  *(f"{v:.6f}" for v in a.attr[i])])


def summary_text(result: dict, out: str) -> str:
  c = result["completeness"]
  lines = [f"explain: {result['rows']:,} rows of {result['source']} ({result['model']}), "
           f"{result['method']['steps']} IG steps; completeness: max |residual| "
           f"{c['max_abs_residual']:.2e}, {c['fraction_within']:.1%} within {c['tolerance']}",
           "mean |attribution| per scenario:"]
  feats = result["features"]
  width = max(len(f) for f in feats)
  lines.append(" " * (width + 2) + "".join(f"{n:>10}" for n in result["scenarios"]))
  for f in feats:
    vals = [result["mean_abs_attribution"][n][f] for n in result["scenarios"]]
    lines.append(f"  {f:<{width}}" + "".join(f"{v:10.4f}" if v is not None else f"{'-':>10}"
                                             for v in vals))
  for name, g in result.get("input_gates", {}).items():
    table = np.asarray(g["mean_gate"], np.float64)
    top = [g["features"][np.nanargmax(row)] for row in table]
    lines.append(f"{name}: most amplified feature per scenario: "
                 + ", ".join(f"{n} {f}" for n, f in zip(result["scenarios"], top)))
  for name, g in result.get("layer_gates", {}).items():
    if any(v for v in g["fraction_zero"] if v):
      lines.append(f"{name}: fraction of units cut per scenario: "
                   + ", ".join(f"{n} {v:.2f}" for n, v in zip(result["scenarios"],
                                                              g["fraction_zero"])))
  lines.append("scenario similarity from: " + ", ".join(result["similarity"]))
  for c in result.get("cold_items", {}).get("items", [])[:3]:
    near = ", ".join(f"{n['item']} ({n['cosine']:.2f})" for n in c["neighbours"][:3])
    lines.append(f"cold item on line {c['line']} ({c['scenario']}): nearest training items "
                 f"in the text space: {near}")
  lines.append(f"wrote {os.path.join(out, 'explain.json')}, attributions.csv and PNGs")
  return "\n".join(lines)

"""Run by tests/test_sharding.py in a fresh process with 8 virtual CPU devices.

Trains the same config for a few steps on several mesh shapes and prints, as JSON, each mesh's
losses, its largest parameter difference from the single-device run, and the table's shard
shapes. Usage: python tests/sharding_worker.py MESHES_JSON [--config.x=y ...]
"""
from __future__ import annotations

import itertools
import json
import os
import sys

import jax
import numpy as np
from ml_collections import ConfigDict

from mscenario.config import load_config
from mscenario.data import pipeline
from mscenario.data.prepare import prepare
from mscenario.parallel import mesh as mesh_lib
from mscenario.train import loop
from tests.helpers import SYNTHETIC, TINY

STEPS = 6


def run(config, data, shape):
  d, m = shape
  mesh = mesh_lib.make_mesh(ConfigDict({"data": d, "model": m}), jax.devices()[: d * m])
  setup = loop.build(config, data, mesh)
  state = setup.create_state()
  it = pipeline.BatchIterator(data, "train", config.train.batch_size, seed=config.seed,
                              shuffle=True, drop_last=True)
  losses = []
  for batch in itertools.islice(it.epoch(0), STEPS):
    state, metrics = setup.train_step(state, pipeline.to_global(
        batch, mesh_lib.batch_sharding(mesh)))
    losses.append(float(metrics["loss"]))
  table = loop.embedding_table(state)
  shards = sorted({tuple(s.data.shape) for s in table.addressable_shards})
  params = jax.tree_util.tree_map(np.asarray, loop.all_params(state))
  probs = loop.predict(setup, state, "valid")
  return losses, params, shards, tuple(table.shape), probs


def restore_across_meshes(config, data, workdir):
  """Train on 8 devices, checkpoint, then continue (a) on the same mesh and (b) restored onto
  a 4-device mesh; both continuations must give the same parameters."""
  from mscenario.train import checkpoint as ckpt_lib

  def setup_for(n):
    mesh = mesh_lib.make_mesh(ConfigDict({"data": n, "model": 1}), jax.devices()[:n])
    return loop.build(config, data, mesh), mesh

  def steps(setup, mesh, state, batches):
    for batch in batches:
      state, _ = setup.train_step(state, pipeline.to_global(batch, mesh_lib.batch_sharding(mesh)))
    return state

  it = pipeline.BatchIterator(data, "train", config.train.batch_size, seed=config.seed,
                              shuffle=True, drop_last=True)
  batches = list(itertools.islice(it.epoch(0), 2 * STEPS))
  setup8, mesh8 = setup_for(8)
  state = steps(setup8, mesh8, setup8.create_state(), batches[:STEPS])
  ckpts = ckpt_lib.Checkpoints(workdir, 2)
  ckpts.save_latest(STEPS, state, {"epoch": 0})
  ckpts.wait()
  on8 = jax.tree_util.tree_map(np.asarray, loop.all_params(
      steps(setup8, mesh8, state, batches[STEPS:])))
  setup4, mesh4 = setup_for(4)
  restored, _ = ckpts.restore_latest(setup4.abstract_state)
  ckpts.close()
  shards = sorted({tuple(s.data.shape) for s in loop.embedding_table(restored).addressable_shards})
  on4 = jax.tree_util.tree_map(np.asarray, loop.all_params(
      steps(setup4, mesh4, restored, batches[STEPS:])))
  diffs = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
      lambda a, b: float(np.max(np.abs(a - b))) if a.size else 0.0, on8, on4))
  return {"max_param_diff": max(diffs), "devices": len(restored.step.sharding.device_set),
          "restored_shards": shards}


def fit_paths(config, data, shape, workdir, steps_per_call=4):
  """Train one epoch from the host pipeline and from device-resident columns (scanned
  calls); returns the largest parameter difference (0.0 = bit-identical) and each path's
  losses as logged."""
  from mscenario.train import fit as fit_lib
  from mscenario.train.workdir import WorkDir
  d, m = shape
  mesh = mesh_lib.make_mesh(ConfigDict({"data": d, "model": m}), jax.devices()[: d * m])
  setup = loop.build(config, data, mesh)
  out = {}
  for name in ("host", "device"):
    it = pipeline.BatchIterator(data, "train", config.train.batch_size, seed=config.seed,
                                shuffle=True, drop_last=True)
    source = (fit_lib.HostBatches(setup, it, 2) if name == "host"
              else fit_lib.DeviceBatches(setup, it, steps_per_call))
    wd = WorkDir(f"{workdir}/{name}-{d}x{m}")
    os.makedirs(wd.path, exist_ok=True)
    logger = fit_lib.Logger(wd, 0)
    state, _ = fit_lib.fit(setup, setup.create_state(), {"epoch": 0, "batch": 0}, source,
                           epochs=1, ckpts=None, logger=logger, meta=dict, log_every=3)
    logger.close()
    out[name] = (jax.tree_util.tree_map(np.asarray, {"p": loop.all_params(state),
                                                     "ms": state.model_state}),
                 [r["loss"] for r in wd.read_metrics()], int(state.step))
    if name == "device":  # evaluation: streamed vs gathered on the devices
      probs = {}
      for mode in ("never", "always"):
        config.data.on_device = mode
        probs[mode] = loop.predict(setup, state, "valid")
      config.data.on_device = "auto"
      eval_diff = float(np.max(np.abs(probs["never"] - probs["always"])))
  diffs = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
      lambda a, b: float(np.max(np.abs(a - b))) if a.size else 0.0, out["host"][0],
      out["device"][0]))
  return {"max_param_diff": max(diffs), "host_losses": out["host"][1],
          "device_losses": out["device"][1], "steps": [out["host"][2], out["device"][2]],
          "eval_diff": eval_diff}


def main(argv):
  if argv[0] == "--fit-paths":
    config = load_config(SYNTHETIC, [*TINY, *argv[3:]])
    data = prepare(config, log=lambda *_: None)
    shapes = [tuple(m) for m in json.loads(argv[2])]
    print("RESULT " + json.dumps({f"{d}x{m}": fit_paths(config, data, (d, m), argv[1])
                                  for d, m in shapes}))
    return
  if argv[0] == "--restore":
    config = load_config(SYNTHETIC, [*TINY, *argv[2:]])
    data = prepare(config, log=lambda *_: None)
    print("RESULT " + json.dumps(restore_across_meshes(config, data, argv[1])))
    return
  meshes = [tuple(m) for m in json.loads(argv[0])]
  config = load_config(SYNTHETIC, [*TINY, *argv[1:]])
  data = prepare(config, log=lambda *_: None)
  ref_losses, ref_params, _, _, ref_probs = run(config, data, (1, 1))
  out = {"reference_losses": ref_losses, "meshes": {}}
  for shape in meshes:
    losses, params, shards, table_shape, probs = run(config, data, shape)
    diff_tree = jax.tree_util.tree_map(
        lambda a, b: float(np.max(np.abs(a - b))) if a.size else 0.0, params, ref_params)
    paths = jax.tree_util.tree_leaves_with_path(diff_tree)
    worst = max(paths, key=lambda kv: kv[1]) if paths else ("", 0.0)
    diffs = [v for _, v in paths]
    out["meshes"][f"{shape[0]}x{shape[1]}"] = {
        "losses": losses, "max_param_diff": max(diffs),
        "worst_param": jax.tree_util.keystr(worst[0]),
        "max_prob_diff": float(np.max(np.abs(probs - ref_probs))),
        "table_shape": table_shape, "shard_shapes": shards}
  print("RESULT " + json.dumps(out))


if __name__ == "__main__":
  main(sys.argv[1:])

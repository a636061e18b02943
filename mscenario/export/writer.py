"""`mscenario export`: a training work dir -> a self-contained, versioned predictor directory.

The training side of the export (it rebuilds the model from the work dir); the files it
writes are described in format.py, which is all the serving side reads.

The scoring function is serialised with `jax.export` once per batch-size bucket, with the
weights as *arguments* (not baked-in constants): the file stays small, and a later version
with the same shapes is served by the executables already compiled for the previous one.
Nothing is pickled: weights go to safetensors under flat 'a/b/c' names, everything else JSON.

Length: one version's files (weights, functions, explanation, text, CF state) are written into
one temporary directory and published by one rename; the helpers that fill it share that
directory and its manifest.
"""
from __future__ import annotations

import datetime
import filecmp
import glob
import json
import os
import re
import shutil
import uuid

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from mscenario.data import collaborative as cf_lib
from mscenario.data.prepare import PreparedData
from mscenario.data.transform import Transform
from mscenario.errors import MscenarioError
from mscenario.explain import serving as explain_serving
from mscenario.export import format as fmt
from mscenario.export.format import DEFAULT_BUCKETS
from mscenario.flat import flatten, unflatten
from mscenario.parallel import mesh as mesh_lib
from mscenario.text.encoder import model_files
from mscenario.text.tables import load_matching_encoder, read_text_index
from mscenario.train import loop
from mscenario.train.evaluate import _text_tables
from mscenario.train.steps import make_eval_step
from mscenario.train.workdir import COLLABORATIVE, CONFIG, TRANSFORM, WorkDir, write_text


def _dummy_arrays(schema, n: int) -> dict[str, np.ndarray]:
  """Placeholder rows: building the model needs example shapes, not the training data."""
  max_len = max([f.max_len for f in schema.multi] or [0])
  return {"sparse": np.zeros((n, len(schema.sparse)), np.int32),
          "multi": np.zeros((n, len(schema.multi), max_len), np.int32),
          "dense": np.zeros((n, schema.num_dense), np.float32),
          "scenario": np.zeros(n, np.int32), "label": np.zeros(n, np.float32),
          "user": np.zeros(n, np.int32), "item": np.zeros(n, np.int32)}


def restore(workdir: str, checkpoint: str = "best"):
  """(config, transform, setup, state, step) of a work dir's best (or latest) checkpoint."""
  wd = WorkDir(workdir)
  wd.require(CONFIG, TRANSFORM)
  config = wd.read_config()
  if int(config.data.get("history", {}).get("length", 0) or 0) > 0:
    raise MscenarioError(
        f"{workdir} was trained with behaviour histories (data.history.length="
        f"{config.data.history.length}); export cannot serve those yet: a request would have "
        "to carry the user's recent events. Use `mscenario predict` for such models.")
  transform = wd.read_transform()
  config.mesh.data, config.mesh.model = 1, 1  # export runs on one device
  data = PreparedData(path="", arrays=_dummy_arrays(transform.schema, 8),
                      splits={"predict": np.arange(8)}, transform=transform,
                      meta={"fingerprint": ""})
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
  text_tables = None
  if config.text.get("enabled", False):  # the frozen tables the run trained with
    text_tables = _text_tables(config, workdir, data)
  setup = loop.build(config, data, mesh, text_tables)
  restored = wd.restore(setup.abstract_state, checkpoint, config.train.keep_checkpoints)
  state = restored[0]
  return config, transform, setup, state, int(state.step)


def scoring_function(setup, sparse_mode: bool):
  """score(weights, batch) with weights = flat {'params/...', 'model_state/...'} arrays."""
  eval_step = make_eval_step(setup.model, setup.data.schema)

  def score(weights, batch):
    tree = unflatten(weights)
    params = tree["params"]
    embed = {}
    if sparse_mode:  # the eval step gathers rows itself from state.embed['table']
      params = dict(params)
      emb = dict(params.pop("embedding"))
      embed = {"table": emb.pop("table")}
      if emb:
        params["embedding"] = emb
    return eval_step(params, tree.get("model_state", {}), embed, batch)

  return score


def _platforms() -> tuple[str, ...]:
  """Lower for this backend plus CUDA where that lowering works, so one export serves both."""
  here = jax.default_backend()
  return (here,) if here != "cpu" else ("cpu", "cuda")


def _next_version(out_dir: str) -> str:
  vdir = os.path.join(out_dir, fmt.VERSIONS_DIR)
  nums = [int(m.group(1)) for d in (os.listdir(vdir) if os.path.isdir(vdir) else [])
          if (m := re.fullmatch(r"v(\d+)", d))]
  return f"v{max(nums, default=0) + 1:04d}"


def write_version(out_dir: str, *, weights: dict[str, np.ndarray], score, config_json: str,
                  collaborative: bytes | None = None,
                  transform_state: dict, model_name: str, source: dict,
                  buckets=DEFAULT_BUCKETS, text_dir: str | None = None, keep: int = 5,
                  item_text: dict | None = None, encoder_dir: str | None = None,
                  explain=None, log=print) -> str:
  """Write one version (temp dir + rename), then point CURRENT at it (atomic replace).

  `encoder_dir`: the language model of a text-fused model; its files are copied into the
  version (format.ENCODER_DIR), so the version is served without the training machine's
  model path or package. `explain`: an explain.serving.ServingExplanation (POST /v1/explain),
  or None for a version without explanations.
  """
  out_dir = os.path.abspath(out_dir)
  os.makedirs(os.path.join(out_dir, fmt.VERSIONS_DIR), exist_ok=True)
  version = _next_version(out_dir)
  tmp = os.path.join(out_dir, fmt.VERSIONS_DIR, f".tmp-{uuid.uuid4().hex}")
  os.makedirs(os.path.join(tmp, "functions"))
  try:
    weights = {k: np.ascontiguousarray(np.asarray(v)) for k, v in weights.items()}
    save_file(weights, os.path.join(tmp, fmt.WEIGHTS))
    os.chmod(os.path.join(tmp, fmt.WEIGHTS), 0o644)
    schema = Transform(transform_state).schema
    manifest = {
        "format": fmt.FORMAT, "format_version": fmt.FORMAT_VERSION,
        "version": version, "model": model_name,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": source, "jax": jax.__version__,
        "inputs": {"sparse": len(schema.sparse),
                   "multi": [len(schema.multi), max([f.max_len for f in schema.multi] or [0])],
                   "dense": schema.num_dense},
        "weights": fmt.WEIGHTS, "functions": {}, "text_tables": {}}
    if item_text:  # new items are encoded from their text at request time (predictor.py)
      manifest["item_text"] = dict(item_text)
      if encoder_dir:
        files = model_files(encoder_dir)
        for rel in files:
          dest = os.path.join(tmp, fmt.ENCODER_DIR, rel)
          os.makedirs(os.path.dirname(dest), exist_ok=True)
          _link_or_copy(os.path.join(encoder_dir, rel), dest, out_dir,
                        os.path.join(fmt.ENCODER_DIR, rel))
        manifest["item_text"].update(encoder=fmt.ENCODER_DIR, encoder_files=files)
    w_spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in weights.items()}
    platforms = _platforms()
    for b in sorted(set(int(b) for b in buckets)):
      b_spec = {k: jax.ShapeDtypeStruct(shape, jnp.dtype(dt))
                for k, (shape, dt) in fmt.input_spec(manifest, b).items()}
      try:
        exported = jax.export.export(jax.jit(score), platforms=platforms)(w_spec, b_spec)
      except Exception:  # noqa: BLE001 — an extra platform is a bonus, not a requirement
        platforms = (jax.default_backend(),)
        exported = jax.export.export(jax.jit(score), platforms=platforms)(w_spec, b_spec)
      rel = f"functions/score_b{b}.jax"
      with open(os.path.join(tmp, rel), "wb") as f:
        f.write(exported.serialize())
      manifest["functions"][str(b)] = rel
    manifest["platforms"] = list(platforms)
    if explain is not None:
      _write_explain(tmp, manifest, explain, w_spec, platforms)
    if text_dir and os.path.isdir(text_dir):
      files = sorted(glob.glob(os.path.join(text_dir, "*.npy")))
      if files:
        os.makedirs(os.path.join(tmp, fmt.TEXT_DIR), exist_ok=True)
      for p in files:
        name = os.path.basename(p)
        _link_or_copy(p, os.path.join(tmp, "text", name), out_dir, os.path.join("text", name))
        manifest["text_tables"][name[:-4]] = f"text/{name}"
      if os.path.exists(os.path.join(text_dir, "index.json")):
        shutil.copy2(os.path.join(text_dir, "index.json"), os.path.join(tmp, "text"))
    with open(os.path.join(tmp, "config.json"), "w") as f:
      f.write(config_json)
    with open(os.path.join(tmp, "transform.json"), "w") as f:
      json.dump(transform_state, f)
    if collaborative is not None:
      _write_collaborative(tmp, manifest, collaborative)
    with open(os.path.join(tmp, fmt.MANIFEST), "w") as f:
      json.dump(manifest, f, indent=2)
    final = os.path.join(out_dir, fmt.VERSIONS_DIR, version)
    os.rename(tmp, final)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  cur_tmp = os.path.join(out_dir, f".{fmt.CURRENT_FILE}.{uuid.uuid4().hex}")
  with open(cur_tmp, "w") as f:
    f.write(version + "\n")
  os.replace(cur_tmp, os.path.join(out_dir, fmt.CURRENT_FILE))
  _prune(out_dir, keep, version)
  log(f"export: wrote {final} ({len(manifest['functions'])} buckets "
      f"{sorted(int(b) for b in manifest['functions'])}, platforms {list(platforms)}); "
      f"{os.path.join(out_dir, fmt.CURRENT_FILE)} -> {version}")
  return final


def _link_or_copy(src: str, dest: str, out_dir: str, rel: str) -> None:
  """Copy `src` to `dest`, or hard-link the same file of an earlier version when its bytes
  are identical: versions are immutable once written, and each version of a text-fused model
  would otherwise carry its own copy of the language model (~90 MB for MiniLM). Falls back
  to a copy where links are not possible (another file system, no permission)."""
  vdir = os.path.join(out_dir, fmt.VERSIONS_DIR)
  names = sorted((d for d in (os.listdir(vdir) if os.path.isdir(vdir) else [])
                  if re.fullmatch(r"v\d+", d)), key=lambda d: -int(d[1:]))
  size = os.path.getsize(src)
  for name in names:
    earlier = os.path.join(vdir, name, rel)
    try:
      if os.path.getsize(earlier) == size and filecmp.cmp(src, earlier, shallow=False):
        os.link(earlier, dest)
        return
    except OSError:
      continue
  shutil.copy2(src, dest)


def _write_explain(tmp: str, manifest: dict, explain, w_spec: dict, platforms) -> None:
  """functions/explain_b<B>.jax for the score buckets up to EXPLAIN_MAX_BUCKET, and the
  manifest's 'explain' entry (method, steps, baseline, feature names, tolerance)."""
  buckets = sorted(int(b) for b in manifest["functions"])
  small = [b for b in buckets if b <= fmt.EXPLAIN_MAX_BUCKET] or buckets[:1]
  entry = {**explain.manifest_entry(), "functions": {}}
  for b in small:
    b_spec = {k: jax.ShapeDtypeStruct(shape, jnp.dtype(dt))
              for k, (shape, dt) in fmt.input_spec(manifest, b).items()}
    exported = jax.export.export(jax.jit(explain.fn), platforms=platforms)(w_spec, b_spec)
    rel = f"functions/explain_b{b}.jax"
    with open(os.path.join(tmp, rel), "wb") as f:
      f.write(exported.serialize())
    entry["functions"][str(b)] = rel
  manifest["explain"] = entry


def explanation(config, setup, state, sparse_mode: bool, log=print):
  """The version's explanation function: its baseline is the run's training rows' mean
  embedding, so the prepared data must be at hand; without it the version is exported
  without one (its /v1/explain answers 501), said in the log."""
  try:
    data = loop.load_data(config, log=lambda *_: None)
  except (MscenarioError, OSError) as e:
    log(f"export: no explanation function (/v1/explain will answer 501): the baseline needs "
        f"the run's prepared training data, which could not be loaded: {e}")
    return None
  train_idx = np.asarray(data.splits.get("train", ()))
  if len(train_idx) == 0:
    log("export: no explanation function (/v1/explain will answer 501): the data has no "
        "training rows for the baseline")
    return None
  return explain_serving.build(setup, state, data.arrays, train_idx, sparse_mode)


def collaborative_state(workdir: str, transform) -> bytes | None:
  """The run's CF state file (data.collaborative runs; refreshed by `update`), carried into
  the version so that the server computes the cf_* features of a request itself."""
  wd = WorkDir(workdir)
  if wd.read_collaborative(transform.state) is None:  # (copies it into the work dir if needed)
    return None
  with open(wd.file(COLLABORATIVE), "rb") as f:
    return f.read()


def _write_collaborative(tmp: str, manifest: dict, blob: bytes) -> None:
  with open(os.path.join(tmp, fmt.COLLABORATIVE), "wb") as f:
    f.write(blob)
  manifest["collaborative"] = {"file": fmt.COLLABORATIVE, "features": list(cf_lib.FEATURES)}


def _prune(out_dir: str, keep: int, current: str) -> None:
  """Keep the newest `keep` versions (a server holds the one it serves in memory)."""
  if keep <= 0:
    return
  vdir = os.path.join(out_dir, fmt.VERSIONS_DIR)
  names = sorted((d for d in os.listdir(vdir) if re.fullmatch(r"v\d+", d)),
                 key=lambda d: int(d[1:]))
  for d in names[:-keep]:
    if d != current:
      shutil.rmtree(os.path.join(vdir, d), ignore_errors=True)


def state_weights(state) -> dict[str, np.ndarray]:
  """Flat host arrays: all trainable params (table included, whichever mode) + model state."""
  tree = {"params": jax.device_get(loop.all_params(state))}
  model_state = jax.device_get(state.model_state)
  if model_state:
    tree["model_state"] = model_state
  return flatten(tree)


def item_text_spec(config, workdir: str) -> dict | None:
  """What the server needs to encode a new item's text like training did, or None."""
  text = config.get("text", None)
  if text is None or not text.get("enabled", False) or text.get("fusion", "concat") == "none":
    return None
  index = read_text_index(workdir)  # a text run always has one (train encodes first)
  return {"dim": int(index["dim"]), "template": index["item_template"],
          "fingerprint": index["fingerprint"], "model_path": text.get("model_path", "")}


def encoder_dir(config, workdir: str, item_text: dict | None) -> str | None:
  """The directory of the language model the run's text tables were made with (checked by
  fingerprint: `text.model_path`, else the packaged default), or None without item text."""
  if not item_text:
    return None
  encoder = load_matching_encoder(config.text.get("model_path", ""), item_text["fingerprint"],
                                  workdir)
  return encoder.model_dir


def export(workdir: str, out_dir: str, *, buckets=DEFAULT_BUCKETS,
           checkpoint: str = "best", keep: int = 5, log=print) -> str:
  """Export a work dir's best checkpoint as a new version of `out_dir`; returns its path."""
  workdir = os.path.abspath(workdir)
  config, transform, setup, state, step = restore(workdir, checkpoint)
  sparse_mode = config.train.embed_update != "dense"
  item_text = item_text_spec(config, workdir)
  explain = explanation(config, setup, state, sparse_mode, log)
  return write_version(
      out_dir, collaborative=collaborative_state(workdir, transform),
      weights=state_weights(state), score=scoring_function(setup, sparse_mode),
      config_json=open(os.path.join(workdir, "config.json")).read(), transform_state=transform.state,
      model_name=config.model.name,
      source={"workdir": workdir, "step": step, "checkpoint": checkpoint},
      buckets=buckets, text_dir=os.path.join(workdir, "text"), keep=keep,
      item_text=item_text, encoder_dir=encoder_dir(config, workdir, item_text),
      explain=explain, log=log)


def export_once(workdir: str, out_dir: str, *, step: int, buckets=None, keep: int = 5,
                log=print) -> str:
  """Export the work dir's latest checkpoint (at `step`, e.g. an update's) as a new version
  of `out_dir`, unless an earlier attempt already did: a version exported from this work dir
  at this step is reused, and CURRENT is pointed at it if a kill came before CURRENT moved.
  So a rerun after a kill anywhere completes the export exactly once (`mscenario update
  --out`)."""
  out_dir = os.path.abspath(out_dir)
  vdir = os.path.join(out_dir, fmt.VERSIONS_DIR)
  names = sorted((d for d in (os.listdir(vdir) if os.path.isdir(vdir) else [])
                  if re.fullmatch(r"v\d+", d)), key=lambda d: int(d[1:]))
  want = {"workdir": workdir, "step": step, "checkpoint": "latest"}
  for name in reversed(names):
    try:
      with open(os.path.join(vdir, name, fmt.MANIFEST), encoding="utf-8") as f:
        if json.load(f).get("source") != want:
          continue
    except (OSError, ValueError):
      continue
    current_file = os.path.join(out_dir, fmt.CURRENT_FILE)
    current = ""
    if os.path.exists(current_file):
      with open(current_file, encoding="utf-8") as f:
        current = f.read().strip()
    if not re.fullmatch(r"v\d+", current) or int(current[1:]) < int(name[1:]):
      write_text(current_file, name + "\n")
    log(f"export: {os.path.join(vdir, name)} already holds this step's export")
    return os.path.join(vdir, name)
  return export(workdir, out_dir, buckets=buckets or DEFAULT_BUCKETS, checkpoint="latest",
                keep=keep, log=log)


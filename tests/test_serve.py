"""Export + online scoring: exact predictions after export, 422/413, auth, hot swap under load.

One tiny synthetic run is trained and exported per module; servers are real uvicorn instances
on free loopback ports (the hot-swap test needs true concurrency).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid

import httpx
import numpy as np
import pytest

from mscenario import cli
from mscenario.serve import predictor as pred_lib
from mscenario.serve import server as server_lib
from tests.helpers import REPO, SYNTHETIC, TINY

BUCKETS = "1,8,64,512"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """(workdir, model_dir, config, results) of a trained + exported tiny run."""
  base = tmp_path_factory.getbasetemp()
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("MSCENARIO_CACHE", str(base / "cache"))
    mp.setenv("MSCENARIO_DATA", str(base / "data"))
    workdir = tmp_path_factory.mktemp("serve_run")
    model_dir = tmp_path_factory.mktemp("serve_model")
    assert cli.main(["train", "--config", SYNTHETIC, "--workdir", str(workdir), *TINY]) == 0
    assert cli.main(["export", "--workdir", str(workdir), "--out", str(model_dir),
                     "--buckets", BUCKETS]) == 0
    with open(workdir / "results.json") as f:
      results = json.load(f)
    yield workdir, model_dir, results


@pytest.fixture(scope="module")
def reference(exported):
  """The training code's own test predictions (best checkpoint) and the raw test rows."""
  from mscenario.data.sources import load_source
  from mscenario.parallel import mesh as mesh_lib
  from mscenario.export import writer as export
  from mscenario.train import loop
  workdir, _, _ = exported
  with pytest.MonkeyPatch.context() as mp:
    base = os.path.dirname(os.path.dirname(workdir))
    mp.setenv("MSCENARIO_CACHE", os.path.join(base, "cache"))
    mp.setenv("MSCENARIO_DATA", os.path.join(base, "data"))
    config, _, _, state, _ = export.restore(str(workdir))
    data = loop.load_data(config, log=lambda *_: None)
    import jax
    setup = loop.build(config, data, mesh_lib.make_mesh(config.mesh, jax.devices()[:1]))
    probs = loop.predict(setup, state, "test")
    table = load_source(config.data)
  idx = data.splits["test"]
  arrays = {k: np.asarray(v[idx]) for k, v in data.arrays.items()}
  return {"probs": probs, "arrays": arrays, "table": table.take(idx)}


# Raw columns of the synthetic data that the exported model does not read (the server
# rejects fields it would ignore).
UNREAD = ("label", "truth", "scenario", "item_text", "timestamp")


def _requests(table, n, start=0):
  """Raw test rows as single-item predict requests (every field the model reads, on the
  item)."""
  out = []
  for i in range(start, start + n):
    row = {k: v[i].item() if hasattr(v[i], "item") else v[i]
           for k, v in table.columns.items() if k not in UNREAD}
    out.append({"scenario": table.columns["scenario"][i], "user": {}, "items": [row]})
  return out


# ---------------------------------------------------------------------------- export
def test_export_layout_has_no_pickle(exported):
  _, model_dir, _ = exported
  vdir = pred_lib.resolve_version_dir(str(model_dir))
  assert os.path.basename(vdir) == "v0001"
  names = {os.path.relpath(os.path.join(d, f), vdir) for d, _, fs in os.walk(vdir) for f in fs}
  assert {"manifest.json", "config.json", "transform.json", "weights.safetensors"} <= names
  assert {f"functions/score_b{b}.jax" for b in BUCKETS.split(",")} <= names
  assert not any(n.endswith((".pkl", ".pickle", ".msgpack")) for n in names)
  manifest = json.load(open(os.path.join(vdir, "manifest.json")))
  assert manifest["model"] == "star" and manifest["source"]["checkpoint"] == "best"


def test_loaded_predictor_matches_training_predictions(exported, reference):
  _, model_dir, results = exported
  model = pred_lib.load(str(model_dir))
  probs = model.score_arrays(reference["arrays"])
  np.testing.assert_allclose(probs, reference["probs"], atol=1e-6, rtol=0)
  from mscenario.metrics import auc
  assert abs(auc(reference["arrays"]["label"], probs) - results["overall"]["auc"]) < 1e-6
  # Raw rows through the saved transform give the same numbers as the prepared arrays.
  reqs = _requests(reference["table"], 40)
  raw = np.concatenate([model.predict(r) for r in reqs])
  np.testing.assert_allclose(raw, reference["probs"][:40], atol=1e-6, rtol=0)


def test_predictor_loads_without_training_code(exported, reference):
  """A fresh process: load + score, then check no training/model module was imported."""
  _, model_dir, _ = exported
  req = _requests(reference["table"], 1)[0]
  code = (
      "import json, sys\n"
      "from mscenario.serve import predictor\n"
      f"m = predictor.load({str(model_dir)!r})\n"
      f"print(json.dumps(m.predict(json.loads({json.dumps(json.dumps(req))})).tolist()))\n"
      "bad = [k for k in sys.modules if k.startswith(('mscenario.train', 'mscenario.models',"
      " 'flax', 'optax', 'orbax', 'tensorflow'))]\n"
      "assert not bad, bad\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  got = json.loads(out.stdout.strip().splitlines()[-1])
  np.testing.assert_allclose(got, reference["probs"][:1], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------- server helpers
@contextlib.contextmanager
def running(app):
  """A real uvicorn server on a free loopback port, in a thread."""
  import uvicorn
  sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  sock.bind(("127.0.0.1", 0))
  port = sock.getsockname()[1]
  limits = getattr(app.state, "limits", None) or server_lib.Limits()
  server = uvicorn.Server(server_lib.uvicorn_config(app, limits))  # production settings
  thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
  thread.start()
  deadline = time.time() + 60
  while not server.started:
    assert time.time() < deadline and thread.is_alive(), "server did not start"
    time.sleep(0.02)
  try:
    yield f"http://127.0.0.1:{port}"
  finally:
    server.should_exit = True
    thread.join(timeout=30)
    sock.close()


def _new_version(model_dir, scale: float) -> str:
  """Copy the current version with every weight scaled: same functions, new numbers."""
  from safetensors.numpy import load_file, save_file
  src = pred_lib.resolve_version_dir(str(model_dir))
  names = os.listdir(os.path.join(model_dir, pred_lib.VERSIONS_DIR))
  name = f"v{max(int(n[1:]) for n in names if n.startswith('v')) + 1:04d}"
  dst = os.path.join(model_dir, pred_lib.VERSIONS_DIR, name)
  shutil.copytree(src, dst)
  w = load_file(os.path.join(dst, "weights.safetensors"))
  save_file({k: (v * scale).astype(v.dtype) for k, v in w.items()},
            os.path.join(dst, "weights.safetensors"))
  manifest = json.load(open(os.path.join(dst, "manifest.json")))
  manifest["version"] = name
  json.dump(manifest, open(os.path.join(dst, "manifest.json"), "w"))
  return name


def _point_current(model_dir, name: str) -> None:
  tmp = os.path.join(model_dir, f".CURRENT.{uuid.uuid4().hex}")
  with open(tmp, "w") as f:
    f.write(name)
  os.replace(tmp, os.path.join(model_dir, "CURRENT"))


@pytest.fixture
def model_copy(exported, tmp_path):
  _, model_dir, _ = exported
  dst = tmp_path / "model"
  shutil.copytree(model_dir, dst)
  return dst


# ---------------------------------------------------------------------------- server
def test_predict_metadata_health_and_bad_input(model_copy, reference):
  limits = server_lib.Limits(max_body_bytes=64 << 10, max_items=300)
  app = server_lib.create_app(str(model_copy), limits=limits, watch_interval_s=0)
  reqs = _requests(reference["table"], 20)
  with running(app) as url, httpx.Client(base_url=url, timeout=30) as c:
    health = c.get("/healthz").json()
    assert (health["status"], health["version"]) == ("ok", "v0001")
    assert set(health["queues"]) == {"predict", "explain"}
    meta = c.get("/v1/metadata").json()
    assert meta["model"] == "star" and meta["version"] == "v0001"
    assert set(meta["queues"]) == {"predict", "explain"}
    assert meta["queues"]["predict"]["batches"] == meta["batches"]
    assert meta["scenarios"] == ["s0", "s1", "s2"]
    assert "item_id" in [f["name"] for f in meta["features"]]
    # single and batch forms give the training run's numbers, in item order
    r = c.post("/v1/predict", json=reqs[0])
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["probabilities"], reference["probs"][:1], atol=1e-6)
    r = c.post("/v1/predict", json={"requests": reqs})
    assert r.status_code == 200, r.text
    got = [p for res in r.json()["results"] for p in res["probabilities"]]
    np.testing.assert_allclose(got, reference["probs"][:20], atol=1e-6)
    same = [i for i, q in enumerate(reqs) if q["scenario"] == reqs[0]["scenario"]][::-1]
    several = {"scenario": reqs[0]["scenario"], "user": {},
               "items": [reqs[i]["items"][0] for i in same]}
    r = c.post("/v1/predict", json=several)
    np.testing.assert_allclose(r.json()["probabilities"], reference["probs"][same], atol=1e-6)
    # unknown ids -> OOV rows, still a probability
    odd = {"scenario": "s1", "user": {"user_id": "never-seen", "gender": "X"},
           "items": [{"item_id": 10 ** 9, "category": "unheard-of"}, {}]}
    r = c.post("/v1/predict", json=odd)
    assert r.status_code == 200, r.text
    assert all(0 < p < 1 for p in r.json()["probabilities"])
    # 422 with per-field locations
    bad = [
        ({"scenario": "nope", "items": [{}]}, ["scenario"]),
        ({"scenario": "s0"}, ["items"]),
        ({"scenario": "s0", "items": []}, ["items"]),
        ({"scenario": "s0", "items": "x"}, ["items"]),
        ({"scenario": "s0", "items": [{"category": {"a": 1}}]}, ["items", 0, "category"]),
        ({"scenario": "s0", "user": {"gender": [1]}, "items": [{}]}, ["user", "gender"]),
        ({"scenario": "s0", "user": 5, "items": [{}]}, ["user"]),
        ({"scenario": "s0", "items": [{}, 3]}, ["items", 1]),
        ({"requests": [reqs[0], {"scenario": 7, "items": [{}]}]}, ["requests", 1, "scenario"]),
        ([1, 2], []),
    ]
    for body, loc in bad:
      r = c.post("/v1/predict", json=body)
      assert r.status_code == 422, (body, r.text)
      assert loc in [e["loc"] for e in r.json()["errors"]], (body, r.json())
    for raw in (b"{not json", b"\xff\xfe", b"", b"NaN"):
      r = c.post("/v1/predict", content=raw, headers={"content-type": "application/json"})
      assert r.status_code == 422, raw
    # 413: too many bytes, too many items
    r = c.post("/v1/predict", json={"scenario": "s0", "items": [{"x": "y" * 100}] * 1000})
    assert r.status_code == 413
    r = c.post("/v1/predict", json={"scenario": "s0", "items": [{}] * 301})
    assert r.status_code == 413
    assert c.get("/v1/predict").status_code == 405
    # still serving after all that
    r = c.post("/v1/predict", json=reqs[1])
    np.testing.assert_allclose(r.json()["probabilities"], reference["probs"][1:2], atol=1e-6)


def test_bearer_token(model_copy, reference, tmp_path):
  token_file = tmp_path / "token"
  token_file.write_text("s3cret-token\n")
  app = server_lib.create_app(str(model_copy), token=server_lib.read_token(str(token_file)),
                              watch_interval_s=0)
  req = _requests(reference["table"], 1)[0]
  with running(app) as url, httpx.Client(base_url=url, timeout=30) as c:
    assert c.get("/healthz").status_code == 200  # liveness stays open
    assert c.post("/v1/predict", json=req).status_code == 401
    assert c.post("/v1/predict", json=req,
                  headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/v1/metadata").status_code == 401
    assert c.post("/v1/reload").status_code == 401
    ok = {"Authorization": "Bearer s3cret-token"}
    assert c.post("/v1/predict", json=req, headers=ok).status_code == 200
    assert c.get("/v1/metadata", headers=ok).status_code == 200
    assert c.post("/v1/reload", headers=ok).json() == {"changed": False, "version": "v0001"}
    _point_current(model_copy, _new_version(model_copy, 0.5))  # no watcher: reload swaps
    assert c.post("/v1/reload", headers=ok).json() == {"changed": True, "version": "v0002"}
    r = c.post("/v1/predict", json=req, headers=ok)
    assert r.json()["version"] == "v0002"
    assert abs(r.json()["probabilities"][0] - reference["probs"][0]) > 1e-4


def test_hot_swap_under_load(model_copy, reference):
  """Clients hammer the server while CURRENT moves v1 -> v2 (watched) -> v3 (POST reload):
  every response succeeds and matches exactly one version's predictions."""
  reqs = [{"scenario": "s0", "user": {}, "items": [q["items"][0] for q in
                                                   _requests(reference["table"], 12)]}]
  reqs += _requests(reference["table"], 3, start=12)
  v2 = _new_version(model_copy, 0.5)
  v3 = _new_version(model_copy, 1.5)
  expected = {}
  for v in ("v0001", v2, v3):
    m = pred_lib.ModelVersion(os.path.join(model_copy, "versions", v), warm_up=False)
    expected[v] = [m.predict(r) for r in reqs]
  assert not np.allclose(expected["v0001"][0], expected[v2][0], atol=1e-4)
  app = server_lib.create_app(str(model_copy), watch_interval_s=0.1, max_batch_wait_ms=1)
  stop = threading.Event()
  seen = []

  def client(k: int):
    out = []
    with httpx.Client(base_url=url, timeout=60) as c:
      for i in range(5000):  # bounded; normally ends when the swaps are done
        if stop.is_set() and i >= 10:
          break
        j = (k + i) % len(reqs)
        r = c.post("/v1/predict", json=reqs[j])
        out.append((j, r.status_code, r.json()))
    return out

  with running(app) as url:
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
      futures = [pool.submit(client, k) for k in range(8)]
      try:
        time.sleep(1.0)
        _point_current(model_copy, v2)  # picked up by the watcher
        deadline = time.time() + 30
        while httpx.get(f"{url}/healthz").json()["version"] != v2:
          assert time.time() < deadline, "watcher did not swap"
          time.sleep(0.05)
        time.sleep(0.5)
        _point_current(model_copy, v3)
        r = httpx.post(f"{url}/v1/reload", timeout=60)  # the watcher may get there first
        assert r.status_code == 200 and r.json()["version"] == v3
        time.sleep(0.5)
      finally:
        stop.set()
      for f in futures:
        seen.extend(f.result())
  versions = set()
  for j, status, body in seen:
    assert status == 200, body
    versions.add(body["version"])
    np.testing.assert_allclose(body["probabilities"], expected[body["version"]][j], atol=1e-6,
                               rtol=0)
  assert versions == {"v0001", v2, v3}, versions
  assert len(seen) >= 8 * 10


# ---------------------------------------------------------------------------- text models
def test_text_model_export_is_self_contained(tmp_path, monkeypatch):
  """A text-fused export carries its language model: with the training machine's model
  directory gone, the server still scores a brand-new item from its text; with a file of the
  exported copy removed, those requests get 503 (the version is broken, not the request)."""
  from mscenario.data import synthetic
  from mscenario.config import load_config
  from tests.test_text import _write_tiny_model
  monkeypatch.setenv("MSCENARIO_CACHE", str(tmp_path / "cache"))
  bert_dir = str(tmp_path / "bert")
  _write_tiny_model(bert_dir)
  workdir, model_dir = str(tmp_path / "run"), str(tmp_path / "model")
  args = [*TINY, "--config.data.synthetic.num_rows=2000", "--config.train.epochs=1",
          "--config.text.enabled=true", "--config.text.fusion=gate",
          f"--config.text.model_path={bert_dir}"]
  assert cli.main(["train", "--config", SYNTHETIC, "--workdir", workdir, *args]) == 0
  assert cli.main(["export", "--workdir", workdir, "--out", model_dir, "--buckets", "8"]) == 0
  first = pred_lib.resolve_version_dir(model_dir)
  assert cli.main(["export", "--workdir", workdir, "--out", model_dir, "--buckets", "8"]) == 0
  shutil.rmtree(bert_dir)  # another machine: the training path (and any package) is gone
  vdir = pred_lib.resolve_version_dir(model_dir)
  # The second version shares the first's language-model files (hard links, not copies).
  assert vdir != first and os.path.samefile(
      os.path.join(vdir, "text", "encoder", "model.safetensors"),
      os.path.join(first, "text", "encoder", "model.safetensors"))
  manifest = json.load(open(os.path.join(vdir, "manifest.json")))
  assert manifest["item_text"]["encoder"] == "text/encoder"
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(
      manifest["item_text"]["encoder_files"])

  table = synthetic.load_raw(load_config(SYNTHETIC, args).data)
  row = {k: table.columns[k][0] for k in ("user_id", "gender", "region", "category",
                                          "age_bucket")}
  row = {k: v.item() if hasattr(v, "item") else v for k, v in row.items()}
  scenario = str(table.columns["scenario"][0])

  def request(*items):
    return {"scenario": scenario, "user": row,
            "items": [{"item_id": i, "item_text": t} for i, t in items]}

  known = str(table.columns["item_id"][0])
  with running(server_lib.create_app(model_dir, watch_interval_s=0)) as url, \
      httpx.Client(base_url=url, timeout=60) as c:
    r = c.post("/v1/predict", json=request(("new-1", "space opera with robots"),
                                           ("new-2", "a quiet cooking documentary"),
                                           ("new-3", "space opera with robots")))
    assert r.status_code == 200, r.text
    p = r.json()["probabilities"]
    assert p[0] == pytest.approx(p[2], abs=1e-7) and abs(p[0] - p[1]) > 1e-6  # text is read

  os.remove(os.path.join(vdir, "text", "encoder", "tokenizer.json"))
  with running(server_lib.create_app(model_dir, watch_interval_s=0)) as url, \
      httpx.Client(base_url=url, timeout=60) as c:
    r = c.post("/v1/predict", json=request(("new-1", "space opera with robots")))
    assert r.status_code == 503, r.text
    assert "tokenizer.json" in r.json()["detail"] and "re-export" in r.json()["detail"]
    # Requests that need no encoding are still answered.
    assert c.post("/v1/predict", json=request((known, "anything"))).status_code == 200
    assert c.get("/healthz").status_code == 200

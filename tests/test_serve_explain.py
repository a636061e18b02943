"""POST /v1/explain: per-feature contributions to each item's logit from the exported artefact.

One tiny STAR run (it has a scenario-context param, so the forward-mode term is exported too)
is trained + exported per module. The service's contributions must equal `mscenario explain`'s
(the training-side Explainer on the restored run) for the same rows, and sum to
logit - baseline logit within the offline test's tolerance. A version exported without the
function answers 501; the endpoint shares /v1/predict's limits, 422s and auth.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import threading
import time

import numpy as np
import pytest
from starlette.testclient import TestClient

from mscenario import cli
from mscenario.explain import attribute
from mscenario.explain.attribute import Explainer
from mscenario.explain.run import load_run
from mscenario.serve import predictor as pred_lib
from mscenario.serve import server as server_lib
from tests.helpers import SYNTHETIC, TINY
from tests.test_serve import UNREAD

ROWS = 24


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """(workdir, model_dir, offline explanations of the first test rows, raw test rows)."""
  base = tmp_path_factory.getbasetemp()
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("MSCENARIO_CACHE", str(base / "cache"))
    mp.setenv("MSCENARIO_DATA", str(base / "data"))
    workdir = tmp_path_factory.mktemp("explain_run")
    model_dir = tmp_path_factory.mktemp("explain_model")
    assert cli.main(["train", "--config", SYNTHETIC, "--workdir", str(workdir), *TINY]) == 0
    assert cli.main(["export", "--workdir", str(workdir), "--out", str(model_dir),
                     "--buckets", "1,8,64,512"]) == 0
    run = load_run(str(workdir), log=lambda *a: None)
    ex = Explainer(run.setup.model, run.setup.model.schema, run.state, run.data.arrays,
                   run.data.splits["train"])
    idx = np.asarray(run.data.splits["test"][:ROWS])
    offline = ex.explain(run.data.arrays, idx, batch_size=ROWS, progress=False)
    from mscenario.data.sources import load_source
    table = load_source(run.config.data).take(idx)
  yield workdir, model_dir, offline, table


def _requests(table, n):
  out = []
  for i in range(n):
    row = {k: v[i].item() if hasattr(v[i], "item") else v[i]
           for k, v in table.columns.items() if k not in UNREAD}
    out.append({"scenario": table.columns["scenario"][i], "items": [row]})
  return out


@pytest.fixture
def client(exported):
  _, model_dir, _, _ = exported
  app = server_lib.create_app(str(model_dir), token="s3cret", watch_interval_s=0)
  with TestClient(app) as c:
    c.headers["Authorization"] = "Bearer s3cret"
    yield c


def test_manifest_lists_the_explain_function(exported):
  _, model_dir, offline, _ = exported
  vdir = pred_lib.resolve_version_dir(str(model_dir))
  with open(os.path.join(vdir, "manifest.json")) as f:
    manifest = json.load(f)
  spec = manifest["explain"]
  assert sorted(int(b) for b in spec["functions"]) == [1, 8, 64]  # <= EXPLAIN_MAX_BUCKET
  for rel in spec["functions"].values():
    assert os.path.getsize(os.path.join(vdir, rel)) > 0
  assert spec["features"] == list(offline.groups.names)
  assert spec["features"][-1] == "scenario_context" and spec["steps"] == offline.steps


def test_service_equals_explain_command_and_is_complete(exported, client):
  """Raw requests -> HTTP -> the exported function: the same numbers as the offline
  Explainer on the same (prepared) rows; one request of many items and the batch form too."""
  _, _, offline, table = exported
  reqs = _requests(table, ROWS)
  items = []
  for r in reqs[:4]:  # single-item requests (bucket 1)
    resp = client.post("/v1/explain", json=r)
    assert resp.status_code == 200, resp.text
    items += resp.json()["items"]
  resp = client.post("/v1/explain", json={"requests": reqs[4:]})  # batch form, 20 rows
  assert resp.status_code == 200, resp.text
  body = resp.json()
  items += [it for res in body["results"] for it in res["items"]]
  feats = body["features"]
  assert feats == list(offline.groups.names)
  attr = np.array([[it["contributions"][f] for f in feats] for it in items])
  logit = np.array([it["logit"] for it in items])
  base = np.array([it["baseline_logit"] for it in items])
  np.testing.assert_allclose(logit, offline.logit, atol=2e-5)
  np.testing.assert_allclose(base, offline.base_logit, atol=2e-5)
  np.testing.assert_allclose(attr, offline.attr, atol=2e-4)
  assert np.abs(attr).max() > 0.05  # real contributions, not zeros that match zeros
  gap = np.abs(logit - base)
  assert gap.mean() > 0.1
  resid = attr.sum(axis=1) - (logit - base)
  assert (np.abs(resid) <= attribute.COMPLETENESS_ATOL
          + attribute.COMPLETENESS_RTOL * gap).all(), np.abs(resid).max()
  # The explanation's logit is the scoring function's: /v1/predict's probability.
  pred = client.post("/v1/predict", json=reqs[0]).json()["probabilities"][0]
  assert abs(pred - 1 / (1 + np.exp(-logit[0]))) < 1e-5
  assert abs(items[0]["probability"] - pred) < 1e-5
  # /v1/metadata counts the explanation queue's work apart from scoring's.
  queues = client.get("/v1/metadata").json()["queues"]
  assert queues["explain"]["rows"] >= len(reqs) and queues["predict"]["rows"] >= 1


def test_many_items_run_in_chunks(exported, client):
  """100 items of one request: chunks of the largest explain bucket (64) + a padded 36."""
  _, _, offline, table = exported
  row = _requests(table, 1)[0]
  many = {"scenario": row["scenario"], "items": row["items"] * 100}
  resp = client.post("/v1/explain", json=many)
  assert resp.status_code == 200, resp.text
  got = resp.json()["items"]
  assert len(got) == 100
  first = offline.attr[0]
  for it in (got[0], got[63], got[64], got[99]):
    np.testing.assert_allclose(list(it["contributions"].values()), first, atol=2e-4)


def test_same_limits_errors_and_auth_as_predict(exported, client):
  _, _, _, table = exported
  req = _requests(table, 1)[0]
  bad = {**req, "items": [{**req["items"][0], "no_such_field": 1}]}
  for path in ("/v1/predict", "/v1/explain"):
    r = client.post(path, json=bad)
    assert r.status_code == 422 and "no_such_field" in r.json()["errors"][0]["loc"][-1]
    r = client.post(path, json=req, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    r = client.post(path, content=b"{not json")
    assert r.status_code == 422
    r = client.post(path, json={**req, "items": req["items"] * 10_001})
    assert r.status_code == 413
  doc = client.get("/openapi.json").json()
  assert "/v1/explain" in doc["paths"]
  assert doc["paths"]["/v1/explain"]["post"]["security"] == [{"bearer": []}]


def test_older_export_without_the_function_answers_501(exported, tmp_path):
  _, model_dir, _, table = exported
  vdir = pred_lib.resolve_version_dir(str(model_dir))
  old = tmp_path / "old"
  shutil.copytree(vdir, old)
  manifest = json.loads((old / "manifest.json").read_text())
  for rel in manifest.pop("explain")["functions"].values():
    os.remove(old / rel)
  (old / "manifest.json").write_text(json.dumps(manifest))
  app = server_lib.create_app(str(old), watch_interval_s=0)
  req = _requests(table, 1)[0]
  with TestClient(app) as c:
    r = c.post("/v1/explain", json=req)
    assert r.status_code == 501
    assert "exported without an explanation function" in r.json()["detail"]
    assert c.post("/v1/predict", json=req).status_code == 200


def test_healthz_reports_the_explanation_queue(exported, monkeypatch):
  """/healthz shows what the explanation worker runs and what waits behind it, apart from the
  scoring queue; a stuck explanation shows there with its reason while scoring stays 200."""
  _, model_dir, _, table = exported
  limits = server_lib.Limits(request_timeout_s=1.0)
  app = server_lib.create_app(str(model_dir), watch_interval_s=0, limits=limits)
  model = app.state.predictor.current
  release = threading.Event()

  def held(arrays):  # a stuck explanation; once released it fails (nobody waits for it)
    release.wait(30)
    raise RuntimeError("released")

  monkeypatch.setattr(model, "explain_arrays", held)
  reqs = _requests(table, 2)
  two = {"scenario": reqs[1]["scenario"], "items": reqs[1]["items"] * 2}

  def until(c, check):
    deadline = time.time() + 10
    while not check(h := c.get("/healthz")):
      assert time.time() < deadline, h.text
      time.sleep(0.02)
    return h

  with TestClient(app) as c, concurrent.futures.ThreadPoolExecutor(2) as pool:
    idle = c.get("/healthz").json()
    assert idle["queues"]["explain"]["queued_requests"] == 0
    assert idle["queues"]["explain"]["max_queued_rows"] == limits.max_queued_rows
    first = pool.submit(c.post, "/v1/explain", json=reqs[0])
    until(c, lambda h: h.json()["queues"]["explain"]["in_flight_requests"] == 1)
    second = pool.submit(c.post, "/v1/explain", json=two)
    h = until(c, lambda h: h.json()["queues"]["explain"]["queued_requests"] == 1).json()
    ex, pr = h["queues"]["explain"], h["queues"]["predict"]
    assert (ex["in_flight_rows"], ex["queued_rows"], ex["status"]) == (1, 2, "ok"), ex
    assert pr["queued_requests"] == pr["in_flight_requests"] == 0 and pr["status"] == "ok"
    assert c.post("/v1/predict", json=reqs[0]).status_code == 200  # scoring is not held up
    h = until(c, lambda h: h.json()["queues"]["explain"]["status"] == "unavailable")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    assert "scoring for" in h.json()["queues"]["explain"]["reason"]
    assert first.result().status_code == 503 and second.result().status_code == 503
    release.set()
    h = until(c, lambda h: h.json()["queues"]["explain"]["queued_requests"]
              + h.json()["queues"]["explain"]["in_flight_requests"] == 0).json()
    ex = h["queues"]["explain"]
    # the queued request timed out before its turn: skipped, not computed
    assert (ex["status"], ex["timeouts"], ex["batches"], ex["rows"]) == ("ok", 2, 1, 1), ex
    assert h["queues"]["predict"]["batches"] == 1

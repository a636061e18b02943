"""`mscenario explain --input` on a text-fused model: items new to the model are explained with
their own text vector (as `predict` scores them), and each cold row lists the training items
nearest in the text space; the exported version's /v1/explain function, encoding new items'
text at request time, gives the same contributions."""
import csv
import json

import numpy as np
import pytest

from mscenario import cli
from mscenario.config import load_config
from mscenario.data import synthetic
from mscenario.explain.run import explain_workdir
from mscenario.serve import predictor as pred_lib
from tests.helpers import SYNTHETIC, TINY
from tests.test_text import _write_tiny_model

COLS = ["user_id", "item_id", "gender", "region", "category", "age_bucket", "scenario",
        "item_text"]


@pytest.fixture(scope="module")
def explained(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("explain_text")
  model_dir = str(tmp / "bert")
  _write_tiny_model(model_dir)
  workdir = str(tmp / "run")
  args = [*TINY, "--config.data.synthetic.num_rows=4000", "--config.train.epochs=1",
          "--config.text.enabled=true", "--config.text.fusion=gate",
          f"--config.text.model_path={model_dir}"]
  assert cli.main(["train", "--config", SYNTHETIC, "--workdir", workdir, *args]) == 0
  table = synthetic.load_raw(load_config(SYNTHETIC, args).data)
  base = [table.columns[c][0] for c in COLS]
  known_item, known_text = str(base[1]), str(table.columns["item_text"][0])
  rows = [base,                                                 # a known item
          base[:1] + ["new-1"] + base[2:7] + ["space opera with robots"],
          base[:1] + ["new-2"] + base[2:7] + ["a quiet cooking documentary"],
          base[:1] + ["new-3"] + base[2:7] + ["space opera with robots"],
          base[:1] + ["new-4"] + base[2:7] + [known_text]]     # a known item's text
  path = tmp / "rows.csv"
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(COLS)
    w.writerows(rows)
  out = tmp / "out"
  result = explain_workdir(workdir, input_path=str(path), out=str(out), log=lambda *a: None)
  model_dir = str(tmp / "model")
  assert cli.main(["export", "--workdir", workdir, "--out", model_dir, "--buckets", "1"]) == 0
  return out, result, known_item, rows, model_dir


def test_cold_rows_listed_with_their_nearest_training_items(explained):
  out, result, known_item, _, _ = explained
  cold = result["cold_items"]["items"]
  assert result["cold_items"]["rows"] == 4 == len(cold)   # new-1..new-4, not the known item
  by_line = {c["line"]: c for c in cold}
  assert len(by_line) == 4
  for c in cold:
    cos = [n["cosine"] for n in c["neighbours"]]
    assert len(cos) == 5 and cos == sorted(cos, reverse=True)
    assert all(n["train_rows"] > 0 for n in c["neighbours"])  # training items only
  # The item whose text is a known item's text: that item is (one of) its nearest, cosine 1.
  same = cold[-1]
  top = [n["item"] for n in same["neighbours"] if n["cosine"] > 1 - 1e-5]
  assert known_item in top, same["neighbours"]
  # Identical texts give identical neighbour lists; different texts do not.
  assert cold[0]["neighbours"] == cold[2]["neighbours"]
  assert cold[0]["neighbours"] != cold[1]["neighbours"]
  saved = json.loads((out / "explain.json").read_text())
  assert saved["cold_items"] == result["cold_items"]
  with open(out / "cold_item_neighbours.csv") as f:
    assert len(list(csv.DictReader(f))) == 4 * 5


def test_cold_items_explained_from_their_own_text(explained):
  """Same text -> same logit, different text -> different logit: the explained rows carry
  the items' encoded text (without it every new item reads the one OOV text row)."""
  _, result, _, _, _ = explained
  logit = [c["logit"] for c in result["cold_items"]["items"]]
  assert logit[0] == pytest.approx(logit[2], abs=1e-6)
  assert abs(logit[0] - logit[1]) > 1e-6 and abs(logit[0] - logit[3]) > 1e-6
  assert np.isfinite(logit).all()


def test_served_explanations_of_new_items_equal_explain_input(explained):
  out, _, _, rows, model_dir = explained
  model = pred_lib.load(model_dir)
  feats = model.manifest["explain"]["features"]
  with open(out / "attributions.csv") as f:
    offline = list(csv.DictReader(f))
  for row, want in zip(rows, offline):
    item = {c: (v.item() if hasattr(v, "item") else v) for c, v in zip(COLS, row)
            if c != "scenario"}
    got = model.explain_arrays(model.encode([model.parse({"scenario": str(row[6]),
                                                          "items": [item]})]))
    assert got["logit"][0] == pytest.approx(float(want["logit"]), abs=2e-5)
    np.testing.assert_allclose(got["attributions"][0], [float(want[f]) for f in feats],
                               atol=2e-4)

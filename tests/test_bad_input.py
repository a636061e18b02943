"""Bad input gives a DataError naming file, line and field (or, with on_error='skip', rows are
dropped and counted), and the CLI turns it into one paragraph and exit status 2."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from ml_collections import ConfigDict

from mscenario import config as config_lib
from mscenario.data import prepare as prepare_lib
from mscenario.errors import ConfigError, DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = lambda *_: None  # noqa: E731
HEADER = "user_id,item_id,scenario,click,price"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
  monkeypatch.setenv("MSCENARIO_CACHE", str(tmp_path / "cache"))


def good_rows(n=30):
  return [f"u{k % 5},i{k % 7},{'ab'[k % 2]},{k % 3 == 0:d},{k * 0.5}" for k in range(n)]


def write(tmp_path, rows, name="t.csv"):
  path = tmp_path / name
  path.write_text("\n".join([HEADER, *rows]) + "\n")
  return path


def table_config(path, *overrides, features=None):
  c = config_lib.base_config()
  d = c.data
  d.source = "table"
  d.name = "tiny"
  d.table.train = str(path)
  d.features = ConfigDict(features or {
      "user_id": {"kind": "sparse", "column": "user_id"},
      "item_id": {"kind": "sparse", "column": "item_id"},
      "price": {"kind": "dense", "column": "price"}})
  d.scenario = ConfigDict({"field": "scenario", "groups": {"a": ["a"], "b": ["b"]},
                           "descriptions": {}})
  d.label = ConfigDict({"field": "click", "rule": "binary"})
  return config_lib.apply_overrides(c, overrides)


def prepare_error(path, *overrides, features=None) -> DataError:
  with pytest.raises(DataError) as info:
    prepare_lib.prepare(table_config(path, *overrides, features=features), log=QUIET)
  return info.value


def test_good_table_prepares(tmp_path):
  data = prepare_lib.prepare(table_config(write(tmp_path, good_rows())), log=QUIET)
  assert data.meta["num_rows"] == 30 and data.meta["skipped"] == {}


def test_unknown_scenario_value(tmp_path):
  rows = good_rows()
  rows[11] = "u1,i1,zz,1,2.0"  # line 13 (header is line 1)
  path = write(tmp_path, rows)
  e = prepare_error(path)
  assert (e.file, e.line, e.field) == (str(path), 13, "scenario")
  assert "unknown scenario" in str(e) and "got 'zz'" in str(e)  # not np.str_('zz')
  assert str(path) in str(e) and "line 13" in str(e) and "'scenario'" in str(e)


def test_underivable_label(tmp_path):
  rows = good_rows()
  rows[4] = "u1,i1,a,yes,2.0"  # line 6
  path = write(tmp_path, rows)
  e = prepare_error(path)
  assert (e.file, e.line, e.field) == (str(path), 6, "click")
  assert "line 6" in str(e)


def test_label_not_binary_under_binary_rule(tmp_path):
  rows = good_rows()
  rows[7] = "u1,i1,a,3,2.0"  # line 9
  e = prepare_error(write(tmp_path, rows))
  assert (e.line, e.field) == (9, "click") and "0/1" in str(e)
  assert "got 3.0" in str(e)  # a plain number, not np.float64(3.0)


@pytest.mark.parametrize("value", ["inf", "-inf"])
def test_non_finite_dense_value(tmp_path, value):
  rows = good_rows()
  rows[20] = f"u1,i1,b,0,{value}"  # line 22
  path = write(tmp_path, rows)
  e = prepare_error(path)
  assert (e.file, e.line, e.field) == (str(path), 22, "price")
  assert "finite" in str(e)


def test_non_numeric_dense_value(tmp_path):
  rows = good_rows()
  rows[2] = "u1,i1,b,0,cheap"  # line 4
  path = write(tmp_path, rows)
  e = prepare_error(path)
  assert (e.file, e.line, e.field) == (str(path), 4, "price")


@pytest.mark.parametrize("kind", ["sparse", "dense", "multi"])
def test_missing_feature_column(tmp_path, kind):
  path = write(tmp_path, good_rows())
  e = prepare_error(path, features={"user_id": {"kind": "sparse", "column": "user_id"},
                                    "colour": {"kind": kind, "column": "colour"}})
  assert e.field == "colour" and "colour" in str(e) and str(path) in str(e)


def test_missing_scenario_column(tmp_path):
  path = write(tmp_path, good_rows())
  e = prepare_error(path, "--config.data.scenario.field=site")
  assert e.field == "site"


def test_empty_split(tmp_path):
  path = write(tmp_path, good_rows())
  e = prepare_error(path, "--config.data.split.ratios=(1.0, 0.0, 0.0)")
  assert "split 'valid' is empty" in str(e)


def test_empty_file(tmp_path):
  path = write(tmp_path, [])
  with pytest.raises(DataError):
    prepare_lib.prepare(table_config(path), log=QUIET)


def test_bad_split_ratios_are_a_config_error(tmp_path):
  path = write(tmp_path, good_rows())
  with pytest.raises(ConfigError, match="ratios"):
    prepare_lib.prepare(table_config(path, "--config.data.split.ratios=(0.5, 0.1, 0.1)"),
                        log=QUIET)


def test_skip_drops_and_counts_bad_rows(tmp_path):
  rows = good_rows(40)
  rows[3] = "u1,i1,zz,1,2.0"       # unknown scenario
  rows[8] = "u1,i1,a,maybe,2.0"    # underivable label
  rows[13] = "u1,i1,a,1,inf"       # non-finite dense
  rows[18] = "u1,i1,b,0,cheap"     # non-numeric dense (dropped by the source)
  rows[23] = "u1,i1,b"             # wrong number of fields (dropped by the source)
  path = write(tmp_path, rows)
  with pytest.raises(DataError):
    prepare_lib.prepare(table_config(path), log=QUIET)
  data = prepare_lib.prepare(table_config(path, "--config.data.on_error=skip"), log=QUIET)
  skipped = data.meta["skipped"]
  assert sum(skipped.values()) == 5, skipped
  assert data.meta["num_rows"] == 35
  assert sum(len(s) for s in data.splits.values()) == 35
  assert any("scenario" in k for k in skipped) and any("finite" in k for k in skipped)
  assert any("label" in k for k in skipped)
  # Kept rows are clean.
  import numpy as np
  assert np.isfinite(np.asarray(data.arrays["dense"])).all()
  assert set(np.unique(np.asarray(data.arrays["label"]))) <= {0.0, 1.0}


# ---------------------------------------------------------------------------- command line
CONFIG_TEMPLATE = '''
from ml_collections import ConfigDict
from mscenario.config import base_config


def get_config():
  c = base_config()
  c.data.source = "table"
  c.data.name = "tiny"
  c.data.table.train = {path!r}
  c.data.features = ConfigDict({{
      "user_id": {{"kind": "sparse", "column": "user_id"}},
      "price": {{"kind": "dense", "column": "price"}}}})
  c.data.scenario = ConfigDict({{"field": "scenario", "groups": {{"a": ["a"], "b": ["b"]}},
                                 "descriptions": {{}}}})
  c.data.label = ConfigDict({{"field": "click", "rule": "binary"}})
  c.model.name = "seed"
  c.train.epochs = 1
  c.train.batch_size = 8
  return c
'''


def run_cli(tmp_path, config_path, *overrides):
  env = dict(os.environ, MSCENARIO_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run(
      [sys.executable, "-m", "mscenario", "train", "--config", str(config_path),
       "--workdir", str(tmp_path / "work"), *overrides],
      capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


def test_cli_bad_file_exits_2_with_one_paragraph(tmp_path):
  rows = good_rows()
  rows[11] = "u1,i1,zz,1,2.0"  # line 13
  path = write(tmp_path, rows)
  config_path = tmp_path / "cfg.py"
  config_path.write_text(CONFIG_TEMPLATE.format(path=str(path)))
  proc = run_cli(tmp_path, config_path, "--config.train.log_every_steps=1")
  assert proc.returncode == 2, proc.stderr
  assert "Traceback" not in proc.stderr
  err = proc.stderr.strip()
  message = [line for line in err.splitlines() if line.startswith("mscenario: error:")]
  assert len(message) == 1, err
  assert str(path) in message[0] and "line 13" in message[0] and "'scenario'" in message[0]


def test_cli_typo_in_override_exits_2(tmp_path):
  path = write(tmp_path, good_rows())
  config_path = tmp_path / "cfg.py"
  config_path.write_text(CONFIG_TEMPLATE.format(path=str(path)))
  proc = run_cli(tmp_path, config_path, "--config.train.epochz=3")
  assert proc.returncode == 2, proc.stderr
  assert "Traceback" not in proc.stderr
  assert "epochz" in proc.stderr
  assert not (tmp_path / "cache").exists()  # failed before touching any data

"""Issue 10 §2: one path resolver, a cache that cannot be clobbered, and inputs that used to
escape as tracebacks (each reproduced on a copy of real data where the issue did) are now the
project's user errors naming file, line and field -- or, under data.on_error=skip, counted."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from ml_collections import ConfigDict

from mscenario import config as config_lib
from mscenario.data import prepare as prepare_lib
from mscenario.data.sources import load_source, resolve_root
from mscenario.data.sources.movielens import load_movielens
from mscenario.data.sources.recbole import load_recbole
from mscenario.errors import ConfigError, DataError, MscenarioError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = lambda *_: None  # noqa: E731


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
  monkeypatch.setenv("MSCENARIO_CACHE", str(tmp_path / "cache"))


# ---------------------------------------------------------------- copies of ml-100k.inter
@pytest.fixture
def inter_lines(shared_data) -> list[bytes]:
  return (shared_data / "movielens/ml-100k/ml-100k.inter").read_bytes().split(b"\n")


def ml100k_copy(tmp_path, lines) -> str:
  """A RecBole ml-100k dir holding only the (changed) interaction file."""
  root = tmp_path / "ml"
  root.mkdir(exist_ok=True)
  (root / "ml-100k.inter").write_bytes(b"\n".join(lines))
  return str(root)


def set_field(lines, line_no, index, value: bytes):
  parts = lines[line_no - 1].split(b"\t")
  parts[index] = value
  lines[line_no - 1] = b"\t".join(parts)
  return lines


def both_readers(root):
  """The RecBole reader and the MovieLens reader (RecBole layout) on the same files."""
  return [lambda **kw: load_recbole(root, "ml-100k", **kw),
          lambda **kw: load_movielens(root, "ml-100k", layout="recbole", **kw)]


def test_invalid_utf8_names_line_and_field(tmp_path, inter_lines):
  lines = set_field(inter_lines, 6, 1, b"12\xff\xfe3")  # item_id of line 6
  root = ml100k_copy(tmp_path, lines)
  for read in both_readers(root):
    with pytest.raises(DataError) as e:
      read()
    assert (e.value.file, e.value.line, e.value.field) == (
        os.path.join(root, "ml-100k.inter"), 6, "item_id")
    assert "UTF-8" in str(e.value)
    t = read(on_error="skip")
    assert t.num_rows == 99_999 and 6 not in t.row_line.tolist()
    assert sum(t.skipped.values()) == 1 and "UTF-8" in next(iter(t.skipped))


@pytest.mark.parametrize("value", ["1_000", "３", "٣", "1 000", "0x10"])
def test_number_spellings_python_accepts_are_errors(tmp_path, inter_lines, value):
  root = ml100k_copy(tmp_path, set_field(inter_lines, 6, 2, value.encode()))  # rating
  for read in both_readers(root):
    with pytest.raises(DataError) as e:
      read()
    assert (e.value.line, e.value.field) == (6, "rating") and repr(value) in str(e.value)
    t = read(on_error="skip")
    assert t.num_rows == 99_999 and sum(t.skipped.values()) == 1


def test_20kb_random_bytes(tmp_path, inter_lines):
  rng = np.random.default_rng(0)
  junk = rng.integers(0, 256, 20_000, dtype=np.uint8).tobytes()
  lines = inter_lines[:5] + junk.split(b"\n") + inter_lines[5:]
  root = ml100k_copy(tmp_path, lines)
  for read in both_readers(root):
    with pytest.raises(DataError) as e:
      read()
    assert e.value.file.endswith("ml-100k.inter") and 6 <= e.value.line <= 5 + len(
        junk.split(b"\n"))
    t = read(on_error="skip")  # every junk line is dropped and counted, real rows all kept
    assert 100_000 - 10 <= t.num_rows <= 100_000  # a junk line may merge with a real one
    assert sum(t.skipped.values()) >= len(junk.split(b"\n")) - 1


def test_lone_carriage_return_is_reported_at_its_line(tmp_path, inter_lines):
  lines = set_field(inter_lines, 8, 0, b"19\r6")
  root = ml100k_copy(tmp_path, lines)
  with pytest.raises(DataError) as e:
    load_recbole(root, "ml-100k")
  assert (e.value.line, e.value.field) == (8, "user_id")
  t = load_recbole(root, "ml-100k", on_error="skip")
  assert t.num_rows == 99_999 and t.row_line[-1] == 100_001  # later lines keep their numbers


def test_bad_float_seq_token(tmp_path):
  (tmp_path / "x.inter").write_text(
      "user_id:token\titem_id:token\tvec:float_seq\n1\t2\t1.0 2.5\n1\t3\t1.0 abc\n1\t4\t3\n")
  with pytest.raises(DataError) as e:
    load_recbole(str(tmp_path), "x")
  assert (e.value.line, e.value.field) == (3, "vec") and "'abc'" in str(e.value)
  t = load_recbole(str(tmp_path), "x", on_error="skip")
  assert list(t.columns["vec"]) == [(1.0, 2.5), (3.0,)] and sum(t.skipped.values()) == 1


def test_ml1m_age_infinity_is_not_an_overflow(tmp_path):
  (tmp_path / "ratings.dat").write_text("1::10::5::978300760\n2::10::3::978300761\n")
  (tmp_path / "users.dat").write_text("1::F::inf::10::48067\n2::M::1.5::16::70072\n")
  t = load_movielens(str(tmp_path), "ml-1m", layout="grouplens")
  assert list(t.columns["age_bucket"]) == [None, "1.5"]  # never truncated to a code


# ---------------------------------------------------------------- table source + prepare
def table_config(path, *overrides, time=False):
  c = config_lib.base_config()
  d = c.data
  d.source, d.name, d.table.train = "table", "tiny", str(path)
  d.features = ConfigDict({"user_id": {"kind": "sparse", "column": "user_id"}})
  d.scenario = ConfigDict({"field": "scenario", "groups": {"a": ["a"], "b": ["b"]},
                           "descriptions": {}})
  d.label = ConfigDict({"field": "click", "rule": "> 0"})
  return config_lib.apply_overrides(c, overrides)


def write_table(path, rows, header="user_id,scenario,click,ts"):
  path.write_text("\n".join([header, *rows]) + "\n")
  return path


def rows(n=30, ts=lambda k: str(1000 + k), click=lambda k: str(k % 2)):
  return [f"u{k % 5},{'ab'[k % 2]},{click(k)},{ts(k)}" for k in range(n)]


@pytest.mark.parametrize("kind", ["temporal", "leave_last_out"])
def test_text_timestamps_in_time_split(tmp_path, kind):
  path = write_table(tmp_path / "t.csv", rows(ts=lambda k: f"2024-01-{k % 28 + 1:02d}T10:00"))
  c = table_config(path, f"--config.data.split.kind={kind}", "--config.data.time_field=ts")
  with pytest.raises(DataError) as e:
    prepare_lib.prepare(c, log=QUIET)
  assert (e.value.file, e.value.line, e.value.field) == (str(path), 2, "ts")
  assert "Unix seconds" in str(e.value)


def test_python_only_number_in_text_label_is_not_read(tmp_path):
  """A text label column is read with the same grammar as the sources: '1_0' is not 10."""
  path = write_table(tmp_path / "t.csv", rows(click=lambda k: "1_0" if k == 3 else str(k % 2)))
  with pytest.raises(DataError) as e:
    prepare_lib.prepare(table_config(path), log=QUIET)
  assert (e.value.line, e.value.field) == (5, "click")


def test_missing_table_file_is_a_data_error_before_hashing(tmp_path):
  with pytest.raises(DataError) as e:
    prepare_lib.prepare(table_config(tmp_path / "nope.csv"), log=QUIET)
  assert e.value.file == str(tmp_path / "nope.csv")


# ---------------------------------------------------------------- one path resolver
def test_one_resolver_for_reader_and_fingerprint(tmp_path, monkeypatch):
  """Table paths relative to a `~` root: the reader and the fingerprint see the same file,
  and a same-named file in the current directory is neither read nor hashed."""
  home = tmp_path / "home"
  (home / "d").mkdir(parents=True)
  monkeypatch.setenv("HOME", str(home))
  real = write_table(home / "d" / "t.csv", rows())
  monkeypatch.chdir(tmp_path)
  decoy = write_table(tmp_path / "t.csv", rows(40))
  c = table_config("t.csv", "--config.data.root=~/d")
  assert resolve_root(c.data) == str(home / "d")
  assert prepare_lib.source_files(c.data) == [str(real)]
  assert load_source(c.data).files == [str(real)]
  before = prepare_lib.fingerprint(c.data, 0)
  decoy.write_text(decoy.read_text() + "u9,a,1,5\n")
  assert prepare_lib.fingerprint(c.data, 0) == before
  real.write_text(real.read_text() + "u9,a,1,5\n")
  assert prepare_lib.fingerprint(c.data, 0) != before
  assert prepare_lib.prepare(c, log=QUIET).meta["num_rows"] == 31


def test_movielens_root_with_tilde(tmp_path, monkeypatch, shared_data):
  monkeypatch.setenv("HOME", str(shared_data / "movielens"))
  c = config_lib.base_config().data
  c.source, c.name, c.root = "recbole", "ml-100k", "~/ml-100k"
  files = prepare_lib.source_files(c)
  assert str(shared_data / "movielens/ml-100k/ml-100k.inter") in files


def test_relative_input_paths_resolve_against_cwd(tmp_path, monkeypatch):
  """`update --data` and `predict --input` never join a relative path with data.root."""
  from mscenario.data import sources
  from mscenario.train import evaluate, update
  from mscenario.train import workdir as workdir_lib
  monkeypatch.chdir(tmp_path)
  (tmp_path / "root").mkdir()
  write_table(tmp_path / "root" / "new.csv", rows(3))  # a same-named file under data.root
  write_table(tmp_path / "new.csv", rows(7))
  c = table_config(tmp_path / "root" / "train.csv", f"--config.data.root={tmp_path}/root")
  assert update.read_events(c, "new.csv").files == [str(tmp_path / "new.csv")]

  seen = []

  def stop(data_cfg):  # what predict reads, then stop before any model is built
    seen.append(load_source(data_cfg).files)
    raise MscenarioError("stop")
  monkeypatch.setattr(workdir_lib.WorkDir, "read_transform", lambda self: None)
  monkeypatch.setattr(sources, "load_source", stop)
  with pytest.raises(MscenarioError, match="stop"):
    evaluate.score_file(c, str(tmp_path / "work"), "new.csv")
  assert seen == [[str(tmp_path / "new.csv")]]


# ---------------------------------------------------------------- overrides and config files
def test_empty_override_value_is_a_config_error():
  with pytest.raises(ConfigError, match="empty value"):
    config_lib.apply_overrides(config_lib.base_config(),
                               ["--config.data.table.columns.label="])


@pytest.mark.parametrize("override", ["--config.seed.x=1", "--config.model.star.hidden={[]: 1}",
                                      "--config.data.scenario.groups.a=[1,",
                                      "--config.model.star.hidden=" + "(" * 5000,
                                      "--config.data=3", "--config.seed=True"])
def test_bad_overrides_are_config_errors(override):
  with pytest.raises(ConfigError):
    config_lib.apply_overrides(config_lib.base_config(), [override])


def test_get_config_that_raises(tmp_path):
  path = tmp_path / "cfg.py"
  path.write_text("def get_config():\n  raise KeyError('oops')\n")
  with pytest.raises(ConfigError, match="get_config.*KeyError"):
    config_lib.load_config(str(path))
  path.write_text("def get_config():\n  return {'seed': 1}\n")
  with pytest.raises(ConfigError, match="ConfigDict"):
    config_lib.load_config(str(path))


@pytest.mark.parametrize("override,key,value", [
    ("--config.model.seed.hidden=(64, 32)", ("model", "seed", "hidden"), [64, 32]),
    ("--config.model.seed.hidden=64", ("model", "seed", "hidden"), [64]),
    ("--config.data.split.ratios=(0.7, 0.2, 0.1)", ("data", "split", "ratios"),
     [0.7, 0.2, 0.1]),
    ("--config.data.split.ratios=(1, 0, 0)", ("data", "split", "ratios"), [1.0, 0.0, 0.0]),
    ("--config.model.seed.user_features=('age',)", ("model", "seed", "user_features"),
     ["age"])])
def test_tuple_overrides_when_resuming_from_config_json(override, key, value):
  """config.json stores tuples as lists; the same override works on either."""
  config = config_lib.base_config()
  config.model.name = "seed"  # its subtree is written to config.json (as lists)
  resumed = config_lib.from_json(config_lib.to_json(config))
  assert isinstance(resumed.model.seed.hidden, list)
  node = config_lib.apply_overrides(resumed, [override])
  fresh = config_lib.apply_overrides(config_lib.base_config(), [override])
  for k in key:
    node, fresh = node[k], fresh[k]
  assert list(node) == value and list(fresh) == value and type(fresh) is tuple
  assert all(type(a) is type(b) for a, b in zip(node, value))


def test_cli_get_config_raising_exits_2(tmp_path):
  path = tmp_path / "cfg.py"
  path.write_text("def get_config():\n  return 1 / 0\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-m", "mscenario", "train", "--config", str(path),
                         "--workdir", str(tmp_path / "w")], capture_output=True, text=True,
                        env=env, cwd=ROOT, timeout=120)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert "ZeroDivisionError" in proc.stderr


# ---------------------------------------------------------------- the cache under a race
RACER = textwrap.dedent("""
    import json, os, sys, time
    sys.path.insert(0, {root!r})
    from ml_collections import ConfigDict
    from mscenario import config as config_lib
    from mscenario.data import prepare as prepare_lib
    barrier, me, out, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    c = config_lib.base_config()
    c.seed = seed
    d = c.data
    d.source, d.name, d.table.train = "table", "race", {path!r}
    d.features = ConfigDict({{"user_id": {{"kind": "sparse", "column": "user_id"}}}})
    d.scenario = ConfigDict({{"field": "scenario", "groups": {{"a": ["a"], "b": ["b"]}},
                             "descriptions": {{}}}})
    d.label = ConfigDict({{"field": "click", "rule": "> 0"}})
    open(os.path.join(barrier, me), "w").close()
    while len(os.listdir(barrier)) < 2:  # start together: both find no cache and build
      time.sleep(0.001)
    data = prepare_lib.prepare(c, log=lambda *a: None)
    ino = os.stat(os.path.join(data.path, "meta.json")).st_ino
    total = int(sum(int(v.sum()) for v in data.arrays.values()))
    open(os.path.join(barrier, me + ".done"), "w").close()
    while len([f for f in os.listdir(barrier) if f.endswith(".done")]) < 2:
      time.sleep(0.001)
    time.sleep(0.2)
    after = os.stat(os.path.join(data.path, "meta.json")).st_ino
    json.dump({{"path": data.path, "ino": ino, "after": after, "total": total,
               "files": sorted(os.listdir(os.path.dirname(data.path)))}}, open(out, "w"))
""")


def test_two_processes_preparing_the_same_cache(tmp_path):
  """Both build at once; the loser discards its copy and uses the winner's, which stays."""
  path = write_table(tmp_path / "t.csv", rows(20_000))
  script = tmp_path / "racer.py"
  script.write_text(RACER.format(root=ROOT, path=str(path)))
  env = dict(os.environ, MSCENARIO_CACHE=str(tmp_path / "cache"))
  for seed in range(3):
    barrier = tmp_path / f"barrier{seed}"
    barrier.mkdir()
    outs = [tmp_path / f"out{seed}{k}.json" for k in range(2)]
    procs = [subprocess.Popen([sys.executable, str(script), str(barrier), str(k), str(out),
                               str(seed)], env=env, stderr=subprocess.PIPE, text=True)
             for k, out in enumerate(outs)]
    for p in procs:
      assert p.wait(timeout=300) == 0, p.stderr.read()
    a, b = (json.loads(o.read_text()) for o in outs)
    assert a["path"] == b["path"] and a["total"] == b["total"]
    # Nobody's copy was deleted under them: the one each loaded is the one left.
    assert a["ino"] == a["after"] == b["ino"] == b["after"]
    assert not [f for f in a["files"] if f.startswith(".")]  # no temp dirs left behind


def test_parquet_integers_beyond_2_53_in_a_dense_column(tmp_path):
  """Found by the fuzzer: pyarrow's safe cast refused them with a traceback."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  path = tmp_path / "t.parquet"
  pq.write_table(pa.table({"user_id": ["a", "b"], "price": pa.array([2**53 + 1, 3]),
                           "n": pa.array([2**62, 1])}), path)
  c = config_lib.base_config().data
  c.source, c.name, c.table.train = "table", "p", str(path)
  c.features = ConfigDict({"price": {"kind": "dense", "column": "price"}})
  t = load_source(c)
  assert t.columns["price"].tolist() == [float(2**53 + 1), 3.0]
  assert t.columns["n"].tolist() == [float(2**62), 1.0]

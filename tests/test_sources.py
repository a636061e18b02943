"""Sources -> RawTable: RecBole atomic files, MovieLens layouts, CSV / Parquet tables."""
import sys
import time
import types

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mscenario.config import base_config
from mscenario.data.sources import load_source, resolve_root
from mscenario.data.sources.movielens import CANONICAL, age_bucket, load_movielens
from mscenario.data.sources.recbole import load_recbole
from mscenario.errors import ConfigError, DataError


def write(path, text, encoding="utf-8"):
  path.write_bytes(text.encode(encoding))
  return path


def rows(*lines):
  return "".join(line + "\n" for line in lines)


# ---- RecBole atomic files ----------------------------------------------------------------------

@pytest.fixture
def atomic(tmp_path):
  write(tmp_path / "toy.inter", rows(
      "user_id:token\titem_id:token\trating:float\ttags:token_seq\tscore:float_seq",
      "u1\ti1\t4\ta b\t0.5 1",
      "u2\ti2\t\t\t",
      "u9\ti1\t2.5\tc\t2"))
  write(tmp_path / "toy.user", rows("user_id:token\tage:float\tgender:token",
                                   "u1\t30\tF", "u2\t41\tM"))
  write(tmp_path / "toy.item", rows("item_id:token\tgenre:token_seq\trating:float",
                                   "i1\tDrama Comedy\t3.5", "i2\tAction\t1"))
  return tmp_path


def test_recbole_types_join_and_provenance(atomic):
  t = load_recbole(str(atomic), "toy")
  t.validate()
  c = t.columns
  assert list(c["user_id"]) == ["u1", "u2", "u9"] and c["user_id"].dtype == object
  np.testing.assert_array_equal(c["rating"], [4.0, np.nan, 2.5])
  assert list(c["tags"]) == [("a", "b"), (), ("c",)]
  assert list(c["score"]) == [(0.5, 1.0), (), (2.0,)]
  # u9 has no user row: its side columns are missing, not an error.
  np.testing.assert_array_equal(c["age"], [30.0, 41.0, np.nan])
  assert list(c["gender"]) == ["F", "M", None]
  assert list(c["genre"]) == [("Drama", "Comedy"), ("Action",), ("Drama", "Comedy")]
  np.testing.assert_array_equal(c["item_rating"], [3.5, 1.0, 3.5])  # name clash -> prefixed
  assert list(t.row_line) == [2, 3, 4] and t.where(2) == (str(atomic / "toy.inter"), 4)
  assert t.files == [str(atomic / f"toy.{s}") for s in ("inter", "user", "item")]


def test_recbole_line_numbers_count_blank_lines(tmp_path):
  write(tmp_path / "b.inter", "user_id:token\trating:float\r\n\r\nu1\t1\r\n\r\n\r\nu2\tx\r\n")
  with pytest.raises(DataError) as e:
    load_recbole(str(tmp_path), "b")
  assert (e.value.line, e.value.field) == (6, "rating")
  t = load_recbole(str(tmp_path), "b", on_error="skip")
  assert list(t.row_line) == [3] and t.skipped == {"b.inter: non-numeric 'rating'": 1}


def test_recbole_bad_rows_raise_or_skip(atomic):
  write(atomic / "toy.inter", rows(
      "user_id:token\titem_id:token\trating:float\ttags:token_seq\tscore:float_seq",
      "u1\ti1\t4\ta\t1", "u2\ti2\tfour\ta\t1", "u1\ti1\t4", "u1\ti2\t5\tb\t2"))
  with pytest.raises(DataError) as e:
    load_recbole(str(atomic), "toy")
  err = e.value
  assert err.file.endswith("toy.inter") and err.line == 4 and err.field == "tags"
  assert "line 4" in str(err) and "5 fields" in str(err)
  write(atomic / "toy.inter", rows(
      "user_id:token\titem_id:token\trating:float\ttags:token_seq\tscore:float_seq",
      "u1\ti1\t4\ta\t1", "u2\ti2\tfour\ta\t1", "u1\ti2\t5\tb\t2"))
  with pytest.raises(DataError, match="line 3, field 'rating'.*'four'.*expected a number"):
    load_recbole(str(atomic), "toy")
  write(atomic / "toy.inter", rows(
      "user_id:token\titem_id:token\trating:float\ttags:token_seq\tscore:float_seq",
      "u1\ti1\t4\ta\t1", "u2\ti2\tfour\ta\t1", "u1\ti1\t4", "u1\ti2\t5\tb\t2"))
  t = load_recbole(str(atomic), "toy", on_error="skip")
  assert list(t.row_line) == [2, 5]
  assert t.skipped == {"toy.inter: wrong number of fields": 1,
                       "toy.inter: non-numeric 'rating'": 1}


def test_recbole_bad_header(tmp_path):
  write(tmp_path / "h.inter", rows("user_id:token\trating:number", "u\t1"))
  with pytest.raises(DataError, match="line 1, field 'rating'"):
    load_recbole(str(tmp_path), "h")
  with pytest.raises(DataError, match="no RecBole interaction file"):
    load_recbole(str(tmp_path), "absent")


# ---- MovieLens --------------------------------------------------------------------------------

SCENARIOS = {"ml-1m": (1_000_209, (210_747, 395_556, 393_906)),
             "ml-100k": (100_000, (26_551, 35_444, 38_005))}


@pytest.mark.parametrize("name", ["ml-100k", "ml-1m"])
def test_movielens_recbole_shared_counts(shared_data, name):
  start = time.perf_counter()
  t = load_movielens(str(shared_data / "movielens" / name), name)
  seconds = time.perf_counter() - start
  print(f"{name}: {t.num_rows} rows loaded in {seconds:.2f}s")
  total, expected = SCENARIOS[name]
  assert t.num_rows == total and tuple(t.columns) == CANONICAL
  bucket = t.columns["age_bucket"]
  counts = tuple(int(np.isin(bucket, group).sum())
                 for group in (["1", "18"], ["25"], ["35", "45", "50", "56"]))
  assert counts == expected
  assert seconds < 10
  assert t.columns["rating"].dtype == np.float64 and t.columns["year"].dtype == np.float64
  assert all(isinstance(g, tuple) for g in t.columns["genres"][:100])
  assert not np.isnan(t.columns["age"]).any()


# Four ratings, three users (one without a row), three movies, in both GroupLens layouts and
# the RecBole layout that should read back to the same canonical values.
U_DATA = rows("1\t10\t5\t881250949", "2\t20\t3\t881250950", "3\t10\t1\t881250951",
              "7\t30\t4\t881250952")
U_USER = rows("1|17|M|student|55105", "2|53|F|other|94043", "3|24|M|writer|0A123")
U_ITEM = ("10|Toy Story (1995)|01-Jan-1995||http://x|0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
          "20|Café Society (1995)|01-Jan-1996||http://y|0|0|0|0|0|0|0|0|1|0|0|0|0|0|0|0|0|0|0\n"
          "30|unknown||||1|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0\n")
INTER_100K = rows("user_id:token\titem_id:token\trating:float\ttimestamp:float",
                  *[line.replace("|", "\t") for line in U_DATA.splitlines()])
USER_100K = rows("user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token",
                 *[line.replace("|", "\t") for line in U_USER.splitlines()])
ITEM_100K = rows("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq",
                 "10\tToy Story\t1995\tAnimation Children's Comedy",
                 "20\tCafé Society\t1996\tDrama", "30\tunknown\t\tunknown")


def canonical_equal(a, b):
  for name in CANONICAL:
    x, y = a.columns[name], b.columns[name]
    if x.dtype == np.float64:
      np.testing.assert_array_equal(x, y, err_msg=name)
    else:
      assert list(x) == list(y), name


def test_movielens_100k_grouplens_matches_recbole(tmp_path):
  gl, rb = tmp_path / "gl", tmp_path / "rb"
  gl.mkdir(), rb.mkdir()
  write(gl / "u.data", U_DATA)
  write(gl / "u.user", U_USER)
  write(gl / "u.item", U_ITEM, encoding="latin-1")
  write(rb / "ml-100k.inter", INTER_100K)
  write(rb / "ml-100k.user", USER_100K)
  write(rb / "ml-100k.item", ITEM_100K)
  a = load_movielens(str(gl), "ml-100k")
  b = load_movielens(str(rb), "ml-100k", layout="recbole")
  a.validate()
  canonical_equal(a, b)
  c = a.columns
  assert list(c["title"]) == ["Toy Story", "Café Society", "Toy Story", "unknown"]
  np.testing.assert_array_equal(c["year"], [1995, 1996, 1995, np.nan])
  assert list(c["genres"]) == [("Animation", "Children's", "Comedy"), ("Drama",),
                               ("Animation", "Children's", "Comedy"), ("unknown",)]
  assert list(c["age_bucket"]) == ["1", "50", "18", None]
  assert list(c["zip_code"]) == ["55105", "94043", "0A123", None]
  assert list(a.row_line) == [1, 2, 3, 4] and a.files[0].endswith("u.data")


def test_movielens_100k_genre_names_from_u_genre(tmp_path):
  write(tmp_path / "u.data", U_DATA)
  write(tmp_path / "u.item", U_ITEM, encoding="latin-1")
  names = ["unknown", "A", "B", "C", "D", "E", *[f"G{i}" for i in range(13)]]
  write(tmp_path / "u.genre", rows(*[f"{n}|{i}" for i, n in enumerate(names)]))
  t = load_movielens(str(tmp_path), "ml-100k")
  assert t.columns["genres"][0] == ("C", "D", "E")
  assert list(t.columns["gender"]) == [None] * 4  # no u.user: user columns missing


def test_movielens_1m_grouplens(tmp_path):
  write(tmp_path / "ratings.dat", rows("1::1193::5::978300760", "2::1::3::978302109"))
  write(tmp_path / "users.dat", rows("1::F::1::10::48067", "2::M::56::16::70072"))
  write(tmp_path / "movies.dat", rows(
      "1::Toy Story (1995)::Animation|Children's|Comedy",
      "1193::One Flew Over the Cuckoo's Nest (1975)::Drama",
      "5::City of Lost Children, The (Cité des enfants perdus, La) (1995)::Sci-Fi"),
      encoding="latin-1")
  t = load_movielens(str(tmp_path), "ml-1m", layout="grouplens")
  c = t.columns
  assert list(c["item_id"]) == ["1193", "1"]
  assert list(c["title"]) == ["One Flew Over the Cuckoo's Nest", "Toy Story"]
  np.testing.assert_array_equal(c["year"], [1975, 1995])
  assert list(c["genres"]) == [("Drama",), ("Animation", "Children's", "Comedy")]
  np.testing.assert_array_equal(c["age"], [1, 56])
  assert list(c["age_bucket"]) == ["1", "56"] and list(c["occupation"]) == ["10", "16"]
  write(tmp_path / "ratings.dat", rows("1::1193::5::978300760", "2::1::3"))
  with pytest.raises(DataError, match=r"ratings.dat, line 2, field 'timestamp'"):
    load_movielens(str(tmp_path), "ml-1m")


def test_movielens_layout_errors(tmp_path):
  with pytest.raises(DataError, match="no MovieLens ml-1m files"):
    load_movielens(str(tmp_path), "ml-1m")
  with pytest.raises(DataError, match="unknown MovieLens"):
    load_movielens(str(tmp_path), "ml-20m")


def test_age_bucket_edges():
  ages = np.array([0, 17, 18, 24, 25, 34, 35, 44, 45, 49, 50, 55, 56, 90, np.nan])
  assert list(age_bucket(ages, "ml-100k")) == [
      "1", "1", "18", "18", "25", "25", "35", "35", "45", "45", "50", "50", "56", "56", None]
  assert list(age_bucket(np.array([1.0, 56.0]), "ml-1m")) == ["1", "56"]


# ---- CSV / Parquet tables -----------------------------------------------------------------------

def table_cfg(train, **kw):
  c = base_config().data
  c.source = "table"
  c.table.train = str(train)
  for k, v in kw.items():
    if k in ("valid", "test", "delimiter"):
      c.table[k] = v
    else:
      c[k] = v
  return c


def test_table_mind_sample_with_mapping(shared_data):
  c = table_cfg(shared_data / "samples" / "mind_sample.csv",
                features={"category": {"kind": "sparse", "column": "Category"}})
  c.table.columns = {"user_id": "User_ID", "item_id": "News_ID"}
  t = load_source(c)
  assert t.num_rows == 8000 and t.row_line[0] == 2 and t.row_line[-1] == 8001
  assert t.columns["user_id"][0].startswith("U") and t.columns["label"].dtype == np.float64
  assert "User_ID" not in t.columns and t.columns["Category"].dtype == object


def test_table_douban_sample(shared_data):
  c = table_cfg(shared_data / "samples" / "douban_sample.csv",
                features={"time": {"kind": "dense", "column": "time_bin"}})
  c.scenario.field = "domain"
  t = load_source(c)
  assert t.num_rows == 3000
  assert set(t.columns["domain"]) == {"book", "movie", "music"}
  assert t.columns["user_id"].dtype == object and isinstance(t.columns["user_id"][0], str)
  assert t.columns["time_bin"].dtype == np.float64
  assert isinstance(t.columns["living_place"][0], str)


def test_table_ali_ccp_presplit(shared_data):
  s = shared_data / "samples"
  c = table_cfg(s / "ali_ccp_train_sample.csv", valid=str(s / "ali_ccp_val_sample.csv"),
                test=str(s / "ali_ccp_test_sample.csv"),
                features={"f205": {"kind": "sparse", "column": "205"},
                          "d508": {"kind": "dense", "column": "D508"}})
  c.scenario.field = "301"
  t = load_source(c)
  t.validate()
  assert t.num_rows == 200 and len(t.files) == 3
  split = t.columns["__split__"]
  assert [int((split == s).sum()) for s in ("train", "valid", "test")] == [100, 50, 50]
  assert set(t.columns["301"]) == {"1", "2", "3"}
  assert isinstance(t.columns["205"][0], str) and t.columns["D508"].dtype == np.float64
  assert t.where(150) == (str(s / "ali_ccp_test_sample.csv"), 2)


def test_table_multi_values_and_parquet(tmp_path):
  path = tmp_path / "t.parquet"
  pq.write_table(pa.table({
      "uid": [1, 2, 3], "item_id": ["a", "b", None], "click": [1, 0, 1],
      "tags": ["x|y", None, "z"], "words": ["p q", "r", ""], "cats": [["k", "l"], [], None],
      "price": [1.5, None, 3.0], "code": [10.0, 2.5, None]}), path)
  c = table_cfg(path, features={
      "tags": {"kind": "multi"}, "w": {"kind": "multi", "column": "words", "sep": " "},
      "cats": {"kind": "multi"}, "price": {"kind": "dense"}, "code": {"kind": "sparse"}})
  c.table.columns = {"user_id": "uid"}
  t = load_source(c)
  col = t.columns
  assert list(col["user_id"]) == ["1", "2", "3"] and list(col["item_id"]) == ["a", "b", None]
  assert list(col["tags"]) == [("x", "y"), (), ("z",)]
  assert list(col["words"]) == [("p", "q"), ("r",), ()]
  assert list(col["cats"]) == [("k", "l"), (), ()]
  np.testing.assert_array_equal(col["price"], [1.5, np.nan, 3.0])
  np.testing.assert_array_equal(col["click"], [1.0, 0.0, 1.0])
  assert list(col["code"]) == ["10", "2.5", None]  # a float category code prints as text
  assert list(t.row_line) == [1, 2, 3]


def test_table_bad_input(tmp_path):
  path = write(tmp_path / "t.tsv", rows("u\tlabel\tprice", "a\t1\t2", "b\t0", "c\t1\t3"))
  c = table_cfg(path, delimiter="\t", features={"price": {"kind": "dense"}})
  with pytest.raises(DataError) as e:
    load_source(c)
  assert (e.value.line, e.value.field) == (3, "price") and "t.tsv" in str(e.value)
  c.on_error = "skip"
  t = load_source(c)
  assert list(t.row_line) == [2, 4] and sum(t.skipped.values()) == 1
  c.table.columns = {"user_id": "uid"}
  with pytest.raises(DataError, match=r"line 1, field 'uid'.*data.table.columns.user_id"):
    load_source(c)
  write(tmp_path / "n.csv", rows("u,price", "a,1", "b,cheap"))
  with pytest.raises(DataError, match="line 3, field 'price'"):
    load_source(table_cfg(tmp_path / "n.csv", features={"price": {"kind": "dense"}}))
  with pytest.raises(DataError, match="file not found"):
    load_source(table_cfg(tmp_path / "absent.csv"))
  with pytest.raises(ConfigError, match="data.table.train"):
    load_source(table_cfg(""))
  with pytest.raises(ConfigError, match="on_error"):
    load_source(table_cfg(path, on_error="ignore"))


def test_table_quoted_csv_and_relative_root(tmp_path):
  write(tmp_path / "q.csv", rows('user_id,title,n', 'a,"Hello, world",1', 'b,"say ""hi""",x'))
  t = load_source(table_cfg("q.csv", root=str(tmp_path)))
  assert list(t.columns["title"]) == ["Hello, world", 'say "hi"']
  assert list(t.columns["n"]) == ["1", "x"]  # not all numeric -> text


# ---- dispatch ----------------------------------------------------------------------------------

def test_dispatch_and_root(monkeypatch, tmp_path, atomic):
  c = base_config().data
  c.source, c.name, c.root = "recbole", "toy", str(atomic)
  assert load_source(c).num_rows == 3
  monkeypatch.setenv("MSCENARIO_DATA", str(tmp_path))
  c.root = ""
  assert resolve_root(c) == str(tmp_path / "toy")
  fake = types.ModuleType("mscenario.data.synthetic")
  fake.load_raw = lambda cfg: ("synthetic", cfg.source)
  monkeypatch.setitem(sys.modules, "mscenario.data.synthetic", fake)
  c.source = "synthetic"
  assert load_source(c) == ("synthetic", "synthetic")
  c.source = "hdfs"
  with pytest.raises(ConfigError, match="data.source"):
    load_source(c)

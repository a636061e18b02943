"""A BERT-family sentence encoder in Flax Linen, loading Hugging Face weights without torch.

Covers BERT / MiniLM / BGE / E5-style checkpoints (`model_type` "bert"): word + position +
token-type embeddings, post-LN transformer blocks, GELU MLP, then mean or CLS pooling and an
optional L2 norm, as sentence-transformers does. Submodule names follow the Hugging Face
parameter names so that `params_from_hf` is a mechanical rename (and a transpose for kernels).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mscenario.errors import MscenarioError

_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # HF "gelu" is the exact erf form
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The subset of a Hugging Face `config.json` the forward pass needs."""
  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  intermediate_size: int
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"

  @classmethod
  def from_hf(cls, d: Mapping) -> "BertConfig":
    model_type = d.get("model_type", "bert")
    if model_type != "bert":
      raise MscenarioError(
          f"model_type {model_type!r} is not supported by the text encoder: it loads BERT-family "
          "checkpoints (model_type 'bert': BERT, MiniLM, BGE, E5)")
    if d.get("position_embedding_type", "absolute") != "absolute":
      raise MscenarioError("only absolute position embeddings are supported, not "
                           f"{d['position_embedding_type']!r}")
    act = d.get("hidden_act", "gelu")
    if act not in _ACTIVATIONS:
      raise MscenarioError(f"hidden_act {act!r} is not supported (one of {sorted(_ACTIVATIONS)})")
    names = [f.name for f in dataclasses.fields(cls)]
    return cls(**{k: d[k] for k in names if k in d})


class _SelfAttention(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x, bias):
    c = self.config
    heads, head_dim = c.num_attention_heads, c.hidden_size // c.num_attention_heads
    split = lambda t: t.reshape(t.shape[:-1] + (heads, head_dim))
    q = split(nn.Dense(c.hidden_size, name="query")(x))
    k = split(nn.Dense(c.hidden_size, name="key")(x))
    v = split(nn.Dense(c.hidden_size, name="value")(x))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim) + bias
    probs = jax.nn.softmax(scores, axis=-1)
    ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return ctx.reshape(ctx.shape[:-2] + (c.hidden_size,))


class _Layer(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x, bias):
    c = self.config
    ln = lambda name: nn.LayerNorm(epsilon=c.layer_norm_eps, name=name)
    attn = _SelfAttention(c, name="attention_self")(x, bias)
    attn = nn.Dense(c.hidden_size, name="attention_output_dense")(attn)
    x = ln("attention_output_LayerNorm")(x + attn)
    h = _ACTIVATIONS[c.hidden_act](nn.Dense(c.intermediate_size, name="intermediate_dense")(x))
    return ln("output_LayerNorm")(x + nn.Dense(c.hidden_size, name="output_dense")(h))


class BertEncoder(nn.Module):
  """Token ids -> one pooled sentence vector per row (padding rows/positions masked out)."""
  config: BertConfig
  pooling: str = "mean"   # "mean" or "cls"
  normalize: bool = True

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids=None):
    c = self.config
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    positions = jnp.arange(input_ids.shape[1])[None, :]
    x = (nn.Embed(c.vocab_size, c.hidden_size, name="word_embeddings")(input_ids)
         + nn.Embed(c.max_position_embeddings, c.hidden_size, name="position_embeddings")(positions)
         + nn.Embed(c.type_vocab_size, c.hidden_size, name="token_type_embeddings")(token_type_ids))
    x = nn.LayerNorm(epsilon=c.layer_norm_eps, name="embeddings_LayerNorm")(x)
    mask = attention_mask.astype(x.dtype)
    # Padded keys get a bias whose exp underflows to exactly 0, so padding never changes a row.
    bias = ((1.0 - mask) * jnp.finfo(x.dtype).min)[:, None, None, :]
    for i in range(c.num_hidden_layers):
      x = _Layer(c, name=f"layer_{i}")(x, bias)
    if self.pooling == "cls":
      pooled = x[:, 0]
    elif self.pooling == "mean":
      summed = jnp.einsum("bld,bl->bd", x, mask)
      pooled = summed / jnp.maximum(mask.sum(axis=1, keepdims=True), 1e-9)
    else:
      raise ValueError(f"pooling {self.pooling!r}: expected mean or cls")
    if self.normalize:
      norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
      pooled = pooled / jnp.maximum(norm, 1e-12)
    return pooled


# ---------------------------------------------------------------------------- weights
_PREFIXES = ("bert.", "model.", "encoder_model.")
_IGNORED = re.compile(r"^(pooler\.|cls\.|embeddings\.position_ids$|lm_head\.)")


def params_from_hf(tensors: Mapping[str, np.ndarray], config: BertConfig) -> dict:
  """Hugging Face BertModel tensors (by name) -> the `BertEncoder` params pytree."""
  clean = {}
  for name, value in tensors.items():
    for p in _PREFIXES:
      if name.startswith(p):
        name = name[len(p):]
    if not _IGNORED.match(name):
      clean[name] = np.asarray(value, np.float32)
  used = set()

  def get(name):
    if name not in clean:
      raise MscenarioError(f"model.safetensors has no tensor {name!r}: not a BERT checkpoint?")
    used.add(name)
    return clean[name]

  def dense(prefix):
    return {"kernel": get(prefix + ".weight").T, "bias": get(prefix + ".bias")}

  def norm(prefix):
    return {"scale": get(prefix + ".weight"), "bias": get(prefix + ".bias")}

  p = {
      "word_embeddings": {"embedding": get("embeddings.word_embeddings.weight")},
      "position_embeddings": {"embedding": get("embeddings.position_embeddings.weight")},
      "token_type_embeddings": {"embedding": get("embeddings.token_type_embeddings.weight")},
      "embeddings_LayerNorm": norm("embeddings.LayerNorm"),
  }
  for i in range(config.num_hidden_layers):
    e = f"encoder.layer.{i}."
    p[f"layer_{i}"] = {
        "attention_self": {k: dense(e + "attention.self." + k) for k in ("query", "key", "value")},
        "attention_output_dense": dense(e + "attention.output.dense"),
        "attention_output_LayerNorm": norm(e + "attention.output.LayerNorm"),
        "intermediate_dense": dense(e + "intermediate.dense"),
        "output_dense": dense(e + "output.dense"),
        "output_LayerNorm": norm(e + "output.LayerNorm"),
    }
  unused = sorted(set(clean) - used)
  if unused:
    raise MscenarioError(f"model.safetensors has tensors the BERT encoder does not use "
                         f"(wrong architecture?): {unused[:5]}")
  return {"params": jax.tree_util.tree_map(jnp.asarray, p)}


def hf_tensors_from_params(params: Mapping, config: BertConfig) -> dict[str, np.ndarray]:
  """The inverse of `params_from_hf`: lets tests write a random model in HF layout."""
  p = params["params"]
  out = {}
  emb = ("word_embeddings", "position_embeddings", "token_type_embeddings")
  for k in emb:
    out[f"embeddings.{k}.weight"] = np.asarray(p[k]["embedding"])
  out["embeddings.LayerNorm.weight"] = np.asarray(p["embeddings_LayerNorm"]["scale"])
  out["embeddings.LayerNorm.bias"] = np.asarray(p["embeddings_LayerNorm"]["bias"])

  def dense(prefix, d):
    out[prefix + ".weight"] = np.ascontiguousarray(np.asarray(d["kernel"]).T)
    out[prefix + ".bias"] = np.asarray(d["bias"])

  def norm(prefix, d):
    out[prefix + ".weight"] = np.asarray(d["scale"])
    out[prefix + ".bias"] = np.asarray(d["bias"])

  for i in range(config.num_hidden_layers):
    e, lp = f"encoder.layer.{i}.", p[f"layer_{i}"]
    for k in ("query", "key", "value"):
      dense(e + "attention.self." + k, lp["attention_self"][k])
    dense(e + "attention.output.dense", lp["attention_output_dense"])
    norm(e + "attention.output.LayerNorm", lp["attention_output_LayerNorm"])
    dense(e + "intermediate.dense", lp["intermediate_dense"])
    dense(e + "output.dense", lp["output_dense"])
    norm(e + "output.LayerNorm", lp["output_LayerNorm"])
  return out

"""Building blocks shared by the models: MLP, stacked (per-expert / per-scenario) modules,
scenario selection, and packing rows by scenario for grouped matmuls."""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mscenario.data.schema import FeatureSchema
from mscenario.errors import ConfigError
from mscenario.models.embedding import model_input

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "gelu": nn.gelu,
    "silu": nn.silu,
    "swish": nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": nn.sigmoid,
    "leaky_relu": nn.leaky_relu,
    "elu": nn.elu,
    "identity": lambda x: x,
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ConfigError(f"model.activation={name!r}: expected one of {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def get_dtype(name: str):
  if name not in DTYPES:
    raise ConfigError(f"model.dtype={name!r}: expected one of {sorted(DTYPES)}")
  return DTYPES[name]


class MLP(nn.Module):
  """Dense -> [BatchNorm] -> activation -> [Dropout] per hidden width, then an optional
  linear output layer (no activation), the benchmark's MLP layout."""
  hidden: Sequence[int]
  activation: str = "relu"
  dropout: float = 0.0
  dtype: str = "float32"
  batch_norm: bool = False
  output_dim: Optional[int] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    act = get_activation(self.activation)
    dt = get_dtype(self.dtype)
    if x.shape[-1] == 0:  # an empty feature group: one zero column keeps Dense's init valid
      x = jnp.zeros(x.shape[:-1] + (1,), x.dtype)
    for width in self.hidden:
      # A bias in front of BatchNorm is cancelled by its mean subtraction: its gradient is
      # pure rounding noise, which Adam would amplify into lr-sized random steps.
      x = nn.Dense(width, use_bias=not self.batch_norm, dtype=dt, param_dtype=jnp.float32)(x)
      if self.batch_norm:
        # momentum 0.9 == torch's BatchNorm1d momentum 0.1.
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                         dtype=dt, param_dtype=jnp.float32)(x)
      x = act(x)
      if self.dropout > 0:
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
    if self.output_dim is not None:
      x = nn.Dense(self.output_dim, dtype=dt, param_dtype=jnp.float32)(x)
    return x


def stacked(module_cls: type[nn.Module], n: int, takes_train: bool = True) -> type[nn.Module]:
  """`n` independent copies of a module evaluated as one vectorised op (params [n, ...]).

  The wrapped module's __call__(x[, train]) takes x stacked on axis 0 ([n, B, ...]) and
  returns outputs stacked on axis 0; each copy has its own params, BatchNorm statistics and
  dropout mask. One vmapped op instead of a Python loop keeps the XLA graph small.
  """
  return nn.vmap(
      module_cls,
      variable_axes={"params": 0, "batch_stats": 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=(0, None) if takes_train else 0,
      out_axes=0,
      axis_size=n)


def select_scenario(values: jax.Array, scenario: jax.Array) -> jax.Array:
  """values [B, S] (one column per scenario) -> [B], each row's own scenario's column."""
  return jnp.take_along_axis(values, scenario[:, None].astype(jnp.int32), axis=1)[:, 0]


class ScenarioModel(nn.Module):
  """Fields every model shares; subclasses implement __call__(batch, train) -> logits [B]."""
  schema: FeatureSchema
  embed_dim: int = 16
  hidden: Sequence[int] = (256, 128)
  dropout: float = 0.0
  activation: str = "relu"
  dtype: str = "float32"
  batch_norm: bool = True
  embed_init_std: float = 1e-4

  @property
  def num_scenarios(self) -> int:
    return self.schema.num_scenarios

  @property
  def compute_dtype(self):
    return get_dtype(self.dtype)

  def inputs(self, batch: dict) -> jax.Array:
    """x = concat(flatten(embeddings), dense) [B, F*E + D] float32 (call in compact)."""
    return model_input(self.schema, self.embed_dim, self.embed_init_std, batch)

  def mlp(self, hidden: Sequence[int], output_dim: Optional[int] = None,
          name: Optional[str] = None) -> MLP:
    return MLP(tuple(hidden), self.activation, self.dropout, self.dtype, self.batch_norm,
               output_dim, name=name)

  def stacked_mlp(self, n: int, hidden: Sequence[int], output_dim: Optional[int] = None,
                  name: Optional[str] = None) -> nn.Module:
    """`n` independent MLPs with this model's settings; call with x [n, B, in]."""
    return stacked(MLP, n)(tuple(hidden), self.activation, self.dropout, self.dtype,
                           self.batch_norm, output_dim, name=name)


# ---- packing rows by scenario --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ScenarioPacking:
  """Where each row goes when a batch is laid out as [num_chunks, chunk] scenario-pure chunks.

  Each scenario's rows are padded to a multiple of `chunk`, so every chunk holds one
  scenario's rows and a per-scenario weight is applied by a batched matmul over chunks
  with the chunk's own weights: ~(1 + S*chunk/B) times the FLOPs of one shared layer
  instead of S times for computing every scenario's layer on every row.
  """
  dest: jax.Array            # [B] int32 slot of each row in the packed [P] layout
  chunk_scenario: jax.Array  # [num_chunks] int32 scenario of each chunk
  chunk: int
  num_chunks: int

  def pack(self, x: jax.Array) -> jax.Array:
    """[B, ...] -> [num_chunks, chunk, ...] (padding slots are zeros)."""
    p = self.num_chunks * self.chunk
    packed = jnp.zeros((p,) + x.shape[1:], x.dtype).at[self.dest].set(
        x, unique_indices=True, indices_are_sorted=False)
    return packed.reshape((self.num_chunks, self.chunk) + x.shape[1:])

  def unpack(self, y: jax.Array) -> jax.Array:
    """[num_chunks, chunk, ...] -> [B, ...] in the original row order."""
    flat = y.reshape((self.num_chunks * self.chunk,) + y.shape[2:])
    return jnp.take(flat, self.dest, axis=0, unique_indices=True)


def default_chunk(batch_size: int, num_scenarios: int) -> int:
  """Power of two near B / (4 S), in [8, 512]: padding waste vs. matmul efficiency."""
  target = max(1, -(-batch_size // (4 * num_scenarios)))
  chunk = 1 << (target - 1).bit_length()
  return int(min(512, max(8, chunk)))


def pack_by_scenario(scenario: jax.Array, num_scenarios: int,
                     chunk: Optional[int] = None) -> ScenarioPacking:
  """Compute the packing of rows with scenario ids `scenario` [B] (static shapes only)."""
  b = scenario.shape[0]
  chunk = chunk or default_chunk(b, num_scenarios)
  num_chunks = -(-(b + num_scenarios * (chunk - 1)) // chunk)  # worst case over counts
  s = scenario.astype(jnp.int32)
  onehot = jax.nn.one_hot(s, num_scenarios, dtype=jnp.int32)
  rank = jnp.take_along_axis(jnp.cumsum(onehot, axis=0) - 1, s[:, None], axis=1)[:, 0]
  counts = onehot.sum(axis=0)
  padded = (counts + chunk - 1) // chunk * chunk
  start = jnp.cumsum(padded) - padded
  dest = start[s] + rank
  # Chunk c belongs to the last scenario whose padded block starts at or before it (empty
  # scenarios have zero-length blocks and are skipped); trailing all-padding chunks get the
  # last scenario, harmlessly.
  chunk_start = jnp.arange(num_chunks, dtype=jnp.int32) * chunk
  chunk_scenario = jnp.searchsorted(start, chunk_start, side="right").astype(jnp.int32) - 1
  chunk_scenario = jnp.clip(chunk_scenario, 0, num_scenarios - 1)
  return ScenarioPacking(dest, chunk_scenario, chunk, num_chunks)

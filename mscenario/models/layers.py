"""Building blocks shared by the models: MLP, stacked (per-expert / per-scenario) modules,
scenario selection, and packing rows by scenario for grouped matmuls."""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import flax.linen as nn
from flax.linen.dtypes import promote_dtype
import jax
import jax.numpy as jnp

from mscenario.errors import ConfigError

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


class StackedDense(nn.Module):
  """`n` independent Dense layers without vmap; params kernel [n, in, out], bias [n, out],
  the tree (and per-copy lecun-normal / zeros init) of `stacked(nn.Dense, n)`.

  x [B, in], one input for every copy -> [B, n, out], as ONE [B, in] @ [in, n*out] matmul.
  (vmap broadcasts x to [n, B, in]: n small matmuls, and x's gradient becomes n matmuls
  plus a sum over copies instead of one matmul.)
  x [n, B, in], one input per copy -> [n, B, out], a batched matmul (copy-major, the layout
  a batched matmul reads and writes without transposes); copy_axis=1 for x [B, n, in].
  """
  n: int
  features: int
  use_bias: bool = True
  dtype: Optional[object] = None

  @nn.compact
  def __call__(self, x: jax.Array, copy_axis: int = 0) -> jax.Array:
    n, out, in_dim = self.n, self.features, x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(batch_axis=(0,)),
                        (n, in_dim, out), jnp.float32)
    bias = (self.param("bias", nn.initializers.zeros, (n, out), jnp.float32)
            if self.use_bias else None)
    x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
    if x.ndim == 2:
      wide = jnp.transpose(kernel, (1, 0, 2)).reshape(in_dim, n * out)
      y = (x @ wide).reshape(x.shape[0], n, out)
      return y if bias is None else y + bias
    if out == 1:  # a batched matmul with one output column is a multiply-add per row
      w = kernel[..., 0]                                     # [n, in]
      y = jnp.sum(x * (w[None] if copy_axis else w[:, None]), axis=-1, keepdims=True)
    else:
      y = jnp.einsum("bni,nio->bno" if copy_axis else "nbi,nio->nbo", x, kernel)
    if bias is None:
      return y
    return y + (bias[None] if copy_axis == 1 else bias[:, None])


class StackedMLP(nn.Module):
  """`n` independent MLPs (the layout of `MLP`) without vmap: the param and batch_stats tree
  of `stacked(MLP, n)` (leaves [n, ...]).

  x [B, F], one input for every copy (experts, towers over one representation) -> [B, n, out];
  x [n, B, F], one input per copy -> [n, B, out]; each the layout its matmul writes (see
  StackedDense). On a shared input the first layer is one wide matmul; either way the
  copies' BatchNorm statistics come from one reduction over the batch axis (feature axes
  (n, H): the per-copy statistics vmap computed one by one). Dropout masks are
  independent per copy, as under vmap (not the same random bits).
  """
  n: int
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
    shared = x.ndim == 2
    if not self.hidden and self.output_dim is None and shared:
      return jnp.broadcast_to(x[:, None], (x.shape[0], self.n, x.shape[1]))
    copy_axis = 1 if shared else 0  # the layout stays the one the first matmul writes
    for i, width in enumerate(self.hidden):
      # No bias in front of BatchNorm: see MLP.
      x = StackedDense(self.n, width, use_bias=not self.batch_norm, dtype=dt,
                       name=f"Dense_{i}")(x, copy_axis)
      if self.batch_norm:
        x = nn.BatchNorm(use_running_average=not train, axis=(copy_axis, 2), momentum=0.9,
                         epsilon=1e-5, dtype=dt, param_dtype=jnp.float32,
                         name=f"BatchNorm_{i}")(x)
      x = act(x)
      if self.dropout > 0:
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
    if self.output_dim is not None:
      x = StackedDense(self.n, self.output_dim, dtype=dt,
                       name=f"Dense_{len(self.hidden)}")(x, copy_axis)
    return x


def mix(gate: jax.Array, experts: Sequence[jax.Array]) -> jax.Array:
  """gate [S, B, E], experts E arrays [B, H] -> [S, B, H], out[s, b] = Σ_e gate[s, b, e] experts[e][b].

  Per-row weights make this B tiny [S, E] @ [E, H] matmuls, which XLA's CPU backend runs
  slowly however it is written as one op: an einsum becomes a batched dot over B (and more
  for the gradient); a broadcast product summed over E materialises [B, S, E, H]; a
  product broadcast over S turns into reductions over S in the gradient. Written per
  (s, e) on [B, H] slices it is S*E multiply-adds that fuse into single passes, forward
  and backward. The result is scenario-major, the layout the towers' batched matmul reads.
  """
  rows = []
  for s in range(gate.shape[0]):
    out = gate[s, :, 0, None] * experts[0]
    for e in range(1, len(experts)):
      out = out + gate[s, :, e, None] * experts[e]
    rows.append(out)
  return jnp.stack(rows)


def select_scenario(values: jax.Array, scenario: jax.Array) -> jax.Array:
  """values [B, S] (one column per scenario) -> [B], each row's own scenario's column."""
  return jnp.take_along_axis(values, scenario[:, None].astype(jnp.int32), axis=1)[:, 0]


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

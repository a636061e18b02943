"""Sparse embedding updates: only the rows a batch touched are read, updated and written.

A dense optimizer over a 10^8-row table touches every row every step (Adam moments decay
everywhere), which makes step time and memory grow with the table. Here the step gathers the
batch's unique rows once, differentiates with respect to those rows only (duplicates are
summed by the gather's transpose), and scatter-applies the optimizer to them:

  * row-wise Adagrad: one accumulator float per row (the TPU-embedding / FBGEMM default);
  * lazy Adam: Adam moments per row, updated only when the row is touched (bias correction
    uses the global step, as TF's LazyAdam does).

Rows not in the batch are bit-identical after a step. `jnp.unique` needs a static size: it is
the number of ids in the batch, padded with an out-of-range row index whose reads give zeros
and whose writes are dropped.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mscenario.errors import ConfigError

KINDS = ("rowwise_adagrad", "lazy_adam")
ADAGRAD_INIT = 0.1
EPS = 1e-8
B1, B2, ADAM_EPS = 0.9, 0.999, 1e-8


def check_kind(kind: str) -> None:
  if kind not in KINDS:
    raise ConfigError(f"train.embed_update={kind!r}: expected dense, {' or '.join(KINDS)}")


def init_table(key: jax.Array, rows: int, dim: int, std: float,
               chunk: int = 1 << 18) -> jax.Array:
  """N(0, std) table filled chunk by chunk, so peak memory is the table plus one chunk
  (generating 10^8 x 16 normals at once needs several times the table's size)."""
  chunk = min(chunk, rows)
  full, rest = divmod(rows, chunk)

  def body(i, table):
    block = std * jax.random.normal(jax.random.fold_in(key, i), (chunk, dim), jnp.float32)
    return jax.lax.dynamic_update_slice(table, block, (i * chunk, 0))

  table = jax.lax.fori_loop(0, full, body, jnp.zeros((rows, dim), jnp.float32))
  if rest:
    block = std * jax.random.normal(jax.random.fold_in(key, full), (rest, dim), jnp.float32)
    table = jax.lax.dynamic_update_slice(table, block, (full * chunk, 0))
  return table


def init_opt_state(kind: str, table: jax.Array) -> dict:
  rows = table.shape[0]
  if kind == "rowwise_adagrad":
    return {"acc": jnp.full((rows,), ADAGRAD_INIT, jnp.float32)}
  return {"m": jnp.zeros_like(table), "v": jnp.zeros_like(table)}


def unique_rows(ids: jax.Array, num_rows: int) -> tuple[jax.Array, jax.Array]:
  """(unique row ids padded with `num_rows`, inverse map ids -> position in the unique list)."""
  flat = ids.reshape(-1)
  uniq, inv = jnp.unique(flat, size=flat.shape[0], fill_value=num_rows, return_inverse=True)
  return uniq, inv.reshape(ids.shape)


def gather(table: jax.Array, uniq: jax.Array) -> jax.Array:
  return table.at[uniq].get(mode="fill", fill_value=0)


def apply_update(kind: str, table: jax.Array, opt: dict, uniq: jax.Array, grad: jax.Array,
                 lr: float, step: jax.Array) -> tuple[jax.Array, dict]:
  """Update rows `uniq` of `table` with their summed gradients `grad` [U, E]."""
  if kind == "rowwise_adagrad":
    acc = opt["acc"].at[uniq].get(mode="fill", fill_value=1.0) + jnp.mean(grad * grad, axis=1)
    delta = -lr * grad / (jnp.sqrt(acc)[:, None] + EPS)
    return (table.at[uniq].add(delta, mode="drop"),
            {"acc": opt["acc"].at[uniq].set(acc, mode="drop")})
  m = B1 * gather(opt["m"], uniq) + (1 - B1) * grad
  v = B2 * gather(opt["v"], uniq) + (1 - B2) * grad * grad
  t = (step + 1).astype(jnp.float32)
  m_hat = m / (1 - B1 ** t)
  v_hat = v / (1 - B2 ** t)
  delta = -lr * m_hat / (jnp.sqrt(v_hat) + ADAM_EPS)
  return (table.at[uniq].add(delta, mode="drop"),
          {"m": opt["m"].at[uniq].set(m, mode="drop"),
           "v": opt["v"].at[uniq].set(v, mode="drop")})

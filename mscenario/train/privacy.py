"""Differentially private training: Poisson sampling, per-unit clipping, Gaussian noise, and
a sparsity-preserving mechanism for embedding rows; accounted with `dp_accounting`.

The mechanism, step by step (one step = one Poisson-sampled batch):
  * Sampling: each privacy unit (one training row, or one user with up to
    `privacy.max_examples_per_user` of their rows) joins the step independently with
    probability q. Drawn as |batch| ~ Binomial(n, q) and then a uniform subset of that size,
    which is the same distribution (Lemma 1 of arXiv:2406.17298; jax-privacy's
    CyclicPoissonSampling draws it the same way), padded to the fixed physical batch with
    weight-0 rows. A draw above the physical batch is truncated (accounted below).
  * Gradients: each unit's gradient with respect to the dense parameters and to its own
    gathered embedding rows (no per-example table gradient is ever materialised). Its norm
    counts each table row once (duplicate ids of a unit are summed first); it is clipped to
    `clip_norm` jointly over dense parameters and rows, and the clipped sum gets
    N(0, (noise_multiplier * clip_norm)^2) noise. privacy.clipping='ghost' (default) takes
    the norms from the linear layers' inputs and output gradients (train/ghost.py) and the
    clipped sum from one gradient of the clip-weighted loss; 'vmap' materialises every
    unit's gradient (the reference the ghost path is tested against).
  * Embedding rows, DP-AdaFEST (Ghazi et al., "Sparsity-Preserving Differentially Private
    Training of Large Embedding Models", NeurIPS 2023): every unit contributes a vector over
    table rows, 1 on each row it touches, scaled to L2 norm `selection_clip`; the summed
    counts get N(0, (sigma_1 * selection_clip)^2) noise and rows whose noisy count exceeds
    `selection_threshold` are selected. Only selected rows receive their clipped gradient
    sum plus noise; every other row is untouched this step. An untouched row (count 0) is
    selected with probability P(N(0, (sigma_1 C_1)^2) > threshold); drawn exactly that way,
    one Bernoulli per row, and at most `max_false_positives` of them are kept (accounted
    below). `embed_noise='dense'` is the simple alternative: noise on every row.
  * Accounting (never by hand): the step is PoissonSampledDpEvent(q, ComposedDpEvent(
    [GaussianDpEvent(sigma_1), GaussianDpEvent(sigma)])) self-composed over the run's steps,
    in dp_accounting's RDP accountant; the noise for a target epsilon is found by
    `dp_accounting.calibrate_dp_mechanism`. Truncation (batch overflow, false-positive cap)
    changes the output only on an event of probability eta (binomial tails, summed over
    steps), so the run is (epsilon, delta_acc + (1 + e^epsilon) eta)-DP; delta_acc is set
    so that the total is the requested delta, and a config whose eta does not fit is refused.
The guarantee covers the trained parameters (checkpoints, exports). The training loss and
gradient norm written to metrics.jsonl are computed without noise and are not covered.

Length: sampling, per-unit clipping, row selection and accounting are one mechanism whose
guarantee depends on each part matching what the accountant assumes; they are kept in view
together.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import logging
import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from scipy import stats

from mscenario.data import pipeline
from mscenario.errors import ConfigError
from mscenario.models.embedding import batch_ids
from mscenario.models.fusion import route_scenarios
from mscenario.train import aux as aux_lib
from mscenario.train import ghost, sparse
from mscenario.train.steps import TrainState, _apply, drop_item_ids

UNITS = ("example", "user")
CLIPPING = ("ghost", "vmap")
EMBED_NOISE = ("sparse", "dense")
# Part of delta reserved for the truncation events (batch overflow, false-positive cap).
TRUNCATION_SHARE = 0.01


@dataclasses.dataclass(frozen=True)
class Plan:
  """The resolved mechanism of one run (what results.json reports under 'privacy')."""
  unit: str
  num_units: int            # training rows (example) or users (user)
  rows_per_unit: int        # physical rows per unit in a batch (1 for example level)
  physical_units: int       # unit slots per batch (train.batch_size / rows_per_unit)
  expected_units: float     # q * num_units: the constant the clipped sum is divided by
  expected_rows: float      # training rows per step, in expectation
  sampling_prob: float
  steps_per_epoch: int
  epochs: int
  noise_multiplier: float   # sigma: gradient noise std / clip_norm
  clip_norm: float
  embed_noise: str
  selection_noise_multiplier: float  # sigma_1 (0 when embed_noise='dense')
  selection_clip: float
  selection_threshold: float
  false_positive_prob: float
  max_false_positives: int
  table_rows: int
  selection_over_table: bool  # the table has no more rows than a step has ids: select
                              # over every row (no cap, no truncation); else over the unique ids
  delta: float              # the run's total delta
  target_epsilon: float     # 0 when the noise multiplier was given
  microbatch: int
  clipping: str = "ghost"

  @property
  def total_steps(self) -> int:
    return self.steps_per_epoch * self.epochs

  def truncation_prob(self, steps: int) -> float:
    """eta: P(any step's sample overflows the batch or its false positives the cap)."""
    over = stats.binom.sf(self.physical_units, self.num_units, self.sampling_prob)
    fp = 0.0
    if (self.embed_noise == "sparse" and self.false_positive_prob > 0
        and not self.selection_over_table):
      fp = stats.binom.sf(self.max_false_positives, self.table_rows, self.false_positive_prob)
    return float(steps * (over + fp))

  @property
  def accountant_delta(self) -> float:
    return self.delta * (1.0 - TRUNCATION_SHARE)


# ---------------------------------------------------------------------------- accounting
def dp_event(plan_or_q, sigma: float, sigma_1: float, steps: int) -> dp_accounting.DpEvent:
  """The run's DpEvent: `steps` Poisson-sampled Gaussian steps (two Gaussians per step when
  rows are selected by the noisy-count mechanism)."""
  q = plan_or_q.sampling_prob if isinstance(plan_or_q, Plan) else float(plan_or_q)
  inner = dp_accounting.GaussianDpEvent(sigma)
  if sigma_1 > 0:
    inner = dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(sigma_1), inner])
  return dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(q, inner),
                                           steps)


def epsilon_for(q: float, sigma: float, sigma_1: float, steps: int, delta: float) -> float:
  if steps <= 0:
    return 0.0
  if sigma <= 0:
    return math.inf
  acc = dp_accounting.rdp.RdpAccountant()
  acc.compose(dp_event(q, sigma, sigma_1, steps))
  with _quiet_accountant():
    return float(acc.get_epsilon(delta))


def calibrate(q: float, steps: int, target_epsilon: float, delta: float,
              selection_ratio: float) -> float:
  """The smallest gradient noise multiplier sigma (with sigma_1 = selection_ratio * sigma;
  0 = no selection) that meets (target_epsilon, delta): dp_accounting's calibration."""
  def event(sigma):
    return dp_event(q, sigma, selection_ratio * sigma, steps)
  with _quiet_accountant():
    return float(dp_accounting.calibrate_dp_mechanism(
        dp_accounting.rdp.RdpAccountant, event, target_epsilon, delta,
        bracket_interval=dp_accounting.LowerEndpointAndGuess(1e-3, 1.0)))


@contextlib.contextmanager
def _quiet_accountant():
  """The RDP accountant logs (through absl) each low order whose series it drops for not
  converging, dozens of lines per calibration; the orders it keeps give the epsilon."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def spent_epsilon(plan: Plan, steps: int) -> float:
  return epsilon_for(plan.sampling_prob, plan.noise_multiplier,
                     plan.selection_noise_multiplier, steps, plan.accountant_delta)


# ---------------------------------------------------------------------------- planning
def check_config(p) -> None:
  """Field-by-field checks of c.privacy, each naming the field and what it expects."""
  if p.unit not in UNITS:
    raise ConfigError(f"privacy.unit={p.unit!r}: expected 'example' or 'user'")
  if p.embed_noise not in EMBED_NOISE:
    raise ConfigError(f"privacy.embed_noise={p.embed_noise!r}: expected 'sparse' "
                      "(DP-AdaFEST row selection) or 'dense' (noise on every row)")
  if p.epsilon < 0 or p.noise_multiplier < 0:
    raise ConfigError("privacy.epsilon and privacy.noise_multiplier must be >= 0")
  if (p.epsilon > 0) == (p.noise_multiplier > 0):
    raise ConfigError(f"privacy: give exactly one of privacy.epsilon (target, e.g. 8) or "
                      f"privacy.noise_multiplier (got epsilon={p.epsilon}, "
                      f"noise_multiplier={p.noise_multiplier})")
  if not p.clip_norm > 0:
    raise ConfigError(f"privacy.clip_norm={p.clip_norm}: expected > 0 (float('inf') = no "
                      "clipping, which is not private)")
  if not 0 <= p.delta < 1:
    raise ConfigError(f"privacy.delta={p.delta}: expected 0 (= 1/n) or a value in (0, 1)")
  if p.max_examples_per_user < 1:
    raise ConfigError(f"privacy.max_examples_per_user={p.max_examples_per_user}: expected "
                      ">= 1")
  if not p.selection_clip > 0 or p.selection_noise_ratio < 0:
    raise ConfigError("privacy.selection_clip must be > 0 and privacy.selection_noise_ratio "
                      ">= 0")
  if p.clipping not in CLIPPING:
    raise ConfigError(f"privacy.clipping={p.clipping!r}: expected 'ghost' (per-unit norms, "
                      "then the gradient of the clip-weighted loss) or 'vmap' (per-unit "
                      "gradients materialised, the reference)")
  if p.microbatch < 0:
    raise ConfigError(f"privacy.microbatch={p.microbatch}: expected >= 1 (0 = auto)")


def check_model(model_state, config) -> None:
  """BatchNorm normalises each example by statistics of the whole batch, so one example
  moves every other example's gradient: per-example clipping bounds nothing. Refused."""
  if "batch_stats" not in model_state:
    return
  where = sorted({"/".join(str(getattr(k, "key", k)) for k in path[:-1])
                  for path, _ in jax.tree_util.tree_leaves_with_path(model_state["batch_stats"])})
  fix = ("set --config.model.batch_norm=false (the MLPs then have no BatchNorm, and STAR "
         "normalises each example over its own features with the same shared x "
         "scenario-specific scale and bias; STAR also needs "
         "--config.model.star.scenario_matmul=dense)" if config.model.batch_norm else
         "this model keeps them even with model.batch_norm=false: use a model without them, "
         "e.g. sharedbottom, mmoe, ple or star with --config.model.batch_norm=false")
  raise ConfigError(
      f"privacy.enabled: model {config.model.name!r} keeps batch statistics in "
      f"{', '.join(where)[:200]} (model.batch_norm={config.model.batch_norm}); batch "
      "normalisation mixes the examples of a batch and breaks the per-example sensitivity "
      f"DP-SGD relies on; {fix}")


def make_plan(config, data, model_state=None) -> Plan:
  """Resolve c.privacy against the training data into a Plan (calibrating the noise)."""
  p, tc = config.privacy, config.train
  check_config(p)
  if model_state is not None:
    check_model(model_state, config)
  if config.model.name == "star" and config.model.star.scenario_matmul != "dense":
    raise ConfigError(
        "privacy.enabled with model 'star': set --config.model.star.scenario_matmul=dense "
        "(the same logits; 'grouped' packs a batch's rows by scenario, which per-example "
        "gradients cannot use, and the ghost norms read each layer on every scenario)")
  if tc.grad_clip_norm > 0:
    raise ConfigError(f"train.grad_clip_norm={tc.grad_clip_norm} with privacy.enabled: "
                      "privacy.clip_norm is the per-example clip; set train.grad_clip_norm=0")
  train_rows = np.asarray(data.splits["train"])
  k = 1 if p.unit == "example" else int(p.max_examples_per_user)
  if tc.batch_size % k:
    raise ConfigError(f"train.batch_size={tc.batch_size} must be a multiple of "
                      f"privacy.max_examples_per_user={k}")
  physical = tc.batch_size // k
  if p.unit == "example":
    n, rows_per_step_per_unit = len(train_rows), 1.0
  else:
    counts = np.bincount(np.asarray(data.arrays["user"][train_rows]))
    counts = counts[counts > 0]
    n, rows_per_step_per_unit = len(counts), float(np.minimum(counts, k).mean())
  expected = (float(p.expected_batch_size) if p.expected_batch_size > 0
              else _default_expected(physical, n))
  if expected > physical:
    raise ConfigError(f"privacy.expected_batch_size={p.expected_batch_size} exceeds the "
                      f"{physical} unit slots of a batch (train.batch_size / rows per unit)")
  q = min(1.0, expected / n)
  steps_per_epoch = max(1, math.ceil(len(train_rows) / (expected * rows_per_step_per_unit)))
  delta = p.delta if p.delta > 0 else 1.0 / n
  table_rows = int(data.schema.table_rows)
  ids_per_row = int(batch_ids(data.schema, {key: np.asarray(v[:1]) for key, v in
                                            data.arrays.items()}).shape[1])
  over_table = table_rows <= tc.batch_size * ids_per_row
  sparse_rows = p.embed_noise == "sparse"
  ratio = float(p.selection_noise_ratio) if sparse_rows else 0.0
  steps = steps_per_epoch * tc.epochs
  if p.epsilon > 0:
    sigma = calibrate(q, steps, p.epsilon, delta * (1 - TRUNCATION_SHARE), ratio)
  else:
    sigma = float(p.noise_multiplier)
  sigma_1 = ratio * sigma
  if sparse_rows:
    fp_prob, threshold, cap = _selection(p, sigma_1, table_rows)
    cap = 0 if over_table else cap
  else:
    fp_prob, threshold, cap = 0.0, 0.0, 0
  plan = Plan(unit=p.unit, num_units=n, rows_per_unit=k, physical_units=physical,
              expected_units=q * n, expected_rows=q * n * rows_per_step_per_unit,
              sampling_prob=q, steps_per_epoch=steps_per_epoch,
              epochs=int(tc.epochs), noise_multiplier=sigma, clip_norm=float(p.clip_norm),
              embed_noise=p.embed_noise, selection_noise_multiplier=sigma_1,
              selection_clip=float(p.selection_clip), selection_threshold=threshold,
              false_positive_prob=fp_prob, max_false_positives=cap, table_rows=table_rows,
              selection_over_table=over_table, delta=delta,
              target_epsilon=float(p.epsilon), microbatch=int(p.microbatch),
              clipping=p.clipping)
  eps = spent_epsilon(plan, steps)
  slack = (1 + math.exp(min(eps, 700.0))) * plan.truncation_prob(steps)
  if p.epsilon > 0 and slack > delta * TRUNCATION_SHARE:
    raise ConfigError(
        f"privacy: truncation probability too large for delta={delta:.3g} (sampled batches "
        f"of expected size {expected:.0f} overflow the {physical} slots, or false positives "
        f"overflow privacy.max_false_positives={cap}); lower privacy.expected_batch_size or "
        "raise train.batch_size / privacy.max_false_positives")
  return plan


def _default_expected(slots: int, n: int) -> float:
  """Expected units per step: 9 standard deviations below the batch's unit slots (overflow
  probability ~1e-19 per step); for small batches, where that leaves under half the slots,
  the largest mean whose binomial overflow probability is at most 1e-19."""
  mean = slots - 9.0 * math.sqrt(slots)
  if mean >= slots / 2:
    return mean
  lo, hi = 0.0, float(min(slots, n))
  for _ in range(60):
    mid = (lo + hi) / 2
    if stats.binom.sf(slots, n, min(1.0, mid / n)) <= 1e-19:
      lo = mid
    else:
      hi = mid
  return max(lo, 1.0)


def _selection(p, sigma_1: float, table_rows: int) -> tuple[float, float, int]:
  """(P(an untouched row is selected), threshold, cap on selected untouched rows)."""
  scale = sigma_1 * p.selection_clip
  if p.selection_threshold > 0:
    threshold = float(p.selection_threshold)
  else:  # auto: about 10 untouched rows selected per step, whatever the table's size
    threshold = scale * float(stats.norm.isf(min(0.5, 10.0 / table_rows)))
  fp_prob = float(stats.norm.sf(threshold / scale)) if scale > 0 else 0.0
  cap = int(p.max_false_positives)
  if cap <= 0 and fp_prob > 0:  # auto: the smallest cap whose binomial tail is below 1e-18
    # (scipy's binom.isf returns n below ~1e-17; its sf stays accurate far beyond)
    lo, hi = int(math.ceil(table_rows * fp_prob)), table_rows
    while lo < hi:
      mid = (lo + hi) // 2
      lo, hi = (lo, mid) if stats.binom.sf(mid, table_rows, fp_prob) <= 1e-18 else (mid + 1, hi)
    cap = max(lo, 1)
  return fp_prob, threshold, max(cap, 0)


def report(plan: Plan, steps_run: int) -> dict:
  """The 'privacy' block of results.json: what is guaranteed, for the steps actually run."""
  eps = spent_epsilon(plan, steps_run)
  return {
      "epsilon": eps, "delta": total_delta(plan, eps, steps_run), "unit": plan.unit,
      "sampling": (f"Poisson, q={plan.sampling_prob:.6g} ({plan.expected_units:.1f} "
                   f"expected {plan.unit}s per step, padded to {plan.physical_units})"),
      "sampling_prob": plan.sampling_prob, "expected_rows_per_step": plan.expected_rows,
      "physical_batch": plan.physical_units * plan.rows_per_unit, "steps": int(steps_run),
      "planned_steps": plan.total_steps,
      "epsilon_planned": spent_epsilon(plan, plan.total_steps),
      "target_epsilon": plan.target_epsilon or None,
      "noise_multiplier": plan.noise_multiplier, "clip_norm": plan.clip_norm,
      "max_examples_per_user": plan.rows_per_unit if plan.unit == "user" else None,
      "embedding_mechanism": ("DP-AdaFEST row selection (Ghazi et al., NeurIPS 2023)"
                              if plan.embed_noise == "sparse" else "dense noise on every row"),
      "selection_noise_multiplier": plan.selection_noise_multiplier,
      "selection_threshold": plan.selection_threshold,
      "selection_clip": plan.selection_clip,
      "untouched_row_selection_prob": plan.false_positive_prob,
      "truncation_prob": plan.truncation_prob(steps_run),
      "accountant": f"dp_accounting {_version()} RDP (add/remove one {plan.unit})",
  }


def total_delta(plan: Plan, eps: float, steps: int) -> float:
  """delta of the run as sampled (truncation included): the requested delta when the
  truncation events fit their share (always, for a calibrated run), else more."""
  eta = plan.truncation_prob(steps)
  extra = (1 + math.exp(min(eps, 700.0))) * eta if eta > 0 else 0.0
  return float(min(1.0, max(plan.delta, plan.accountant_delta + extra)))


def summary_line(block: dict) -> str:
  return (f"privacy: ({block['epsilon']:.3g}, {block['delta']:.3g})-DP per {block['unit']} "
          f"after {block['steps']} steps; {block['sampling']}; noise multiplier "
          f"{block['noise_multiplier']:.4g}, clip {block['clip_norm']:g}; "
          f"{block['embedding_mechanism']}")


def _version() -> str:
  return importlib.metadata.version("dp-accounting")


# ---------------------------------------------------------------------------- sampling
class PoissonBatches(pipeline.BatchIterator):
  """Poisson-sampled training batches in fixed shapes (padding rows have weight 0).

  Deterministic in (seed, epoch), so a resumed run draws the same batches. User level: a
  sampled user's rows are taken `max_examples_per_user` at a time, cycling through the
  user's rows in an order shuffled each epoch (as jax-privacy's UserSelectionStrategy), and
  the unit's rows sit next to each other in the batch (the step reshapes to [units, k]).
  """

  def __init__(self, plan: Plan, data, *, seed: int, process_index: int = 0,
               process_count: int = 1):
    super().__init__(data, "train", plan.physical_units * plan.rows_per_unit, seed=seed,
                     shuffle=True, drop_last=True, process_index=process_index,
                     process_count=process_count)
    self.plan = plan
    self.num_batches = plan.steps_per_epoch
    if plan.unit == "user":
      users = np.asarray(data.arrays["user"][self.index])
      _, self._user_of = np.unique(users, return_inverse=True)
      self._counts = np.bincount(self._user_of)
      self._starts = np.concatenate([[0], np.cumsum(self._counts)[:-1]])

  def epoch_rows(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    plan = self.plan
    rng = np.random.default_rng([self.seed, epoch, 0xD9])
    k, slots = plan.rows_per_unit, plan.physical_units
    rows = np.full((self.num_batches, slots * k), self.index[0], np.int64)
    weight = np.zeros((self.num_batches, slots * k), np.float32)
    if plan.unit == "user":  # this epoch's order of each user's rows, and where each starts
      order = np.lexsort((rng.random(len(self.index)), self._user_of))
      pointer = rng.integers(0, self._counts)
    for t in range(self.num_batches):
      m = min(int(rng.binomial(plan.num_units, plan.sampling_prob)), slots)  # truncation
      units = rng.choice(plan.num_units, size=m, replace=False, shuffle=False)
      if plan.unit == "example":
        rows[t, :m], weight[t, :m] = self.index[units], 1.0
        continue
      n_u = self._counts[units]
      j = np.arange(k)[None, :]
      pos = self._starts[units][:, None] + (pointer[units][:, None] + j) % n_u[:, None]
      real = j < n_u[:, None]
      rows[t, :m * k] = np.where(real, self.index[order[pos]], self.index[0]).reshape(-1)
      weight[t, :m * k] = real.reshape(-1)
      pointer[units] = (pointer[units] + np.minimum(k, n_u)) % n_u
    lo = self.process_index * self.local_batch_size
    return (rows[:, lo: lo + self.local_batch_size].astype(np.int32),
            weight[:, lo: lo + self.local_batch_size])

  def epoch(self, epoch: int, start: int = 0):
    rows, weight = self.epoch_rows(epoch)
    for b in range(start, self.num_batches):
      batch = {k: np.asarray(v[rows[b]]) for k, v in self.arrays.items()}
      batch["weight"] = weight[b]
      yield batch


# ---------------------------------------------------------------------------- the step
def _strided(x, n: int):
  """[G, ...] -> [n, G/n, ...] with chunk i = units i, i+n, … (every chunk spans the whole
  batch, so each chunk stays spread over the 'data' axis)."""
  return jnp.swapaxes(x.reshape((x.shape[0] // n, n) + x.shape[1:]), 0, 1)


def _unstrided(x):
  return jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:])


def clipped_unit_grads(model, model_state, params, rows, batch, ids, rng, clip_norm,
                       rows_per_unit: int, microbatch: int, method: str = "ghost"):
  """Per-unit gradients of each unit's mean loss w.r.t. (params, its own rows), each unit's
  clipped to `clip_norm` (a table row a unit touches twice counts once, with its gradients
  summed). Returns (sum of clipped dense grads, clipped row grads per position [B, P, E],
  per-unit norms [G], per-unit losses [G], unit valid mask [G]).

  method='vmap' (the reference): per-unit gradients of every parameter by `jax.vmap`,
  clipped and summed. method='ghost': pass 1 computes only each unit's norm (ghost norms for
  the linear layers, train/ghost.py; vmapped gradients for the rest), pass 2 differentiates
  the clip-weighted sum of the units' losses, whose gradient is the clipped sum itself."""
  b_rows, p = ids.shape
  k = rows_per_unit
  g = b_rows // k
  unit = lambda x: x.reshape((g, k) + x.shape[1:])  # noqa: E731
  ub = {key: unit(v) for key, v in batch.items()}
  ur, ui = unit(rows), ids.reshape(g, k * p)
  valid_pos = jnp.repeat(ub["weight"] > 0, p, axis=1)  # [G, k*P]
  keys = jax.random.split(jax.random.fold_in(rng, 0xC1), g)
  valid_unit = jnp.any(ub["weight"] > 0, axis=1)

  def mean_loss(logits, b):
    per_row = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), b["label"])
    return jnp.sum(per_row * b["weight"]) / jnp.maximum(jnp.sum(b["weight"]), 1.0)

  def unit_loss(prm, r, b, key):
    logits, _ = _apply(model, prm, model_state, {**b, "embedding_rows": r}, True, key)
    return mean_loss(logits, b)

  def row_sq(gr, uid, vp):
    """Per unit: squared norm of its row gradients, a row touched twice counted once."""
    c = uid.shape[0]
    gr = gr.reshape(c, k * p, -1)
    same = (uid[:, :, None] == uid[:, None, :]) & vp[:, None, :]
    per_row = jnp.einsum("cij,cje->cie", same.astype(gr.dtype), gr)  # row totals per unit
    first = vp & ~jnp.any(jnp.tril(same, -1), axis=2)
    return jnp.sum(jnp.where(first[..., None], per_row * per_row, 0.0), axis=(1, 2))

  def leaf_sq(tree, c):
    return sum((jnp.sum(x.reshape(c, -1) ** 2, axis=1) for x in jax.tree_util.tree_leaves(tree)),
               jnp.zeros((c,), jnp.float32))

  flat = traverse_util.flatten_dict(params) if params else {}
  covered = set()
  if method == "ghost":
    b0, r0 = jax.tree_util.tree_map(lambda x: x[0], ub), ur[0]
    probe = jax.eval_shape(lambda: _ghost_apply(model, model_state, params, r0, b0, keys[0]))
    covered = ghost.covered_params(probe[1][ghost.INPUTS]) & set(flat)
    zero_perturbations = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype),
                                                probe[1][ghost.OUTPUTS])
  fixed = {key: v for key, v in flat.items() if key in covered}
  rest = {key: v for key, v in flat.items() if key not in covered}

  if microbatch <= 0:  # auto: per-unit gradients of one chunk within ~2^25 floats (128 MB)
    per_unit = sum(x.size for x in rest.values()) + rows[0].size * k
    microbatch = max(1, (1 << 25) // per_unit)
  chunks = max(1, g // max(1, min(microbatch, g)))
  while g % chunks:
    chunks += 1
  xs = jax.tree_util.tree_map(lambda x: _strided(x, chunks), (ub, ur, ui, valid_pos, keys))
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)

  if method == "vmap":
    grad_fn = jax.vmap(jax.value_and_grad(unit_loss, argnums=(0, 1)), in_axes=(None, 0, 0, 0))

    def body(acc, xs):
      b, r, uid, vp, key = xs
      loss, (gd, gr) = grad_fn(params, r, b, key)
      c = uid.shape[0]
      norm = jnp.sqrt(row_sq(gr, uid, vp) + leaf_sq(gd, c))
      scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norm, 1e-12))
      acc = jax.tree_util.tree_map(lambda a, x: a + jnp.tensordot(scale, x, axes=1), acc, gd)
      return acc, (gr * scale.reshape((c,) + (1,) * (gr.ndim - 1)), norm, loss)

    dense, (row_grads, norms, losses) = jax.lax.scan(body, zeros, xs)
    row_grads = _unstrided(row_grads).reshape(b_rows, p, -1)
    return dense, row_grads, _unstrided(norms), _unstrided(losses), valid_unit

  def unit_norm(rest_params, r, b, key):
    """(loss, squared gradient norm) of one unit."""
    def loss_fn(rest_params, r, perturbations):
      prm = traverse_util.unflatten_dict({**fixed, **rest_params}) if flat else params
      logits, coll = _ghost_apply(model, model_state, prm, r, b, key, perturbations)
      return mean_loss(logits, b), coll[ghost.INPUTS]
    (loss, inputs), (g_rest, g_r, g_out) = jax.value_and_grad(
        loss_fn, argnums=(0, 1, 2), has_aux=True)(rest_params, r, zero_perturbations)
    sq = ghost.ghost_sq_norm(inputs, g_out, flat) + sum(
        (jnp.sum(x * x) for x in jax.tree_util.tree_leaves(g_rest)), jnp.float32(0.0))
    return loss, sq, g_r

  norm_fn = jax.vmap(unit_norm, in_axes=(None, 0, 0, 0))

  def norm_body(_, xs):
    b, r, uid, vp, key = xs
    loss, sq, gr = norm_fn(rest, r, b, key)
    return None, (jnp.sqrt(sq + row_sq(gr, uid, vp)), loss)

  _, (norms, losses) = jax.lax.scan(norm_body, None, xs)
  scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norms, 1e-12))  # [chunks, G/chunks]

  def weighted_body(acc, xs):
    b, r, key, s = xs

    def total(prm, r):
      return jnp.sum(s * jax.vmap(unit_loss, in_axes=(None, 0, 0, 0))(prm, r, b, key))

    gd, gr = jax.grad(total, argnums=(0, 1))(params, r)
    return jax.tree_util.tree_map(jnp.add, acc, gd), gr

  dense, row_grads = jax.lax.scan(weighted_body, zeros, (xs[0], xs[1], xs[4], scale))
  row_grads = _unstrided(row_grads).reshape(b_rows, p, -1)
  return dense, row_grads, _unstrided(norms), _unstrided(losses), valid_unit


def _ghost_apply(model, model_state, params, rows, batch, key, perturbations=None):
  batch = route_scenarios(model, {**batch, "embedding_rows": rows})
  variables = {"params": aux_lib.model_params(params), **model_state}
  return ghost.apply(model, variables, batch, rngs={"dropout": key},
                     perturbations=perturbations)


def selection_counts(ids, weight, rows_per_unit: int, selection_clip: float, segments,
                     num_segments: int | None = None):
  """Noiseless DP-AdaFEST counts per segment (a unique batch row, `segments` = the unique
  map; or a table row, `segments` = ids): each unit adds selection_clip / sqrt(#distinct
  rows it touches) to each of them (its contribution vector has L2 norm selection_clip)."""
  b_rows, p = ids.shape
  g = b_rows // rows_per_unit
  ui = ids.reshape(g, rows_per_unit * p)
  vp = jnp.repeat(weight.reshape(g, rows_per_unit) > 0, p, axis=1)
  same = (ui[:, :, None] == ui[:, None, :]) & vp[:, None, :]
  first = vp & ~jnp.any(jnp.tril(same, -1), axis=2)
  n = jnp.sum(first, axis=1)
  share = selection_clip / jnp.sqrt(jnp.maximum(n, 1)).astype(jnp.float32)
  contrib = jnp.where(first, share[:, None], 0.0).reshape(-1)
  return jax.ops.segment_sum(contrib, segments.reshape(-1),
                             num_segments=num_segments or ids.size)


def select_rows(key, uniq, counts, plan: Plan):
  """Row ids that get an update this step (padded with table_rows): touched rows whose
  noisy count passes the threshold, then untouched rows each selected with probability
  plan.false_positive_prob (at most plan.max_false_positives of them)."""
  r = plan.table_rows
  k_count, k_fp = jax.random.split(key)
  noisy = counts + plan.selection_noise_multiplier * plan.selection_clip * \
      jax.random.normal(k_count, counts.shape)
  touched = jnp.where((uniq < r) & (noisy > plan.selection_threshold), uniq, r)
  if plan.max_false_positives <= 0:
    return touched, jnp.zeros((0,), uniq.dtype)
  seen = jnp.zeros((r,), bool).at[uniq].set(True, mode="drop")
  fp = jax.random.bernoulli(k_fp, plan.false_positive_prob, (r,)) & ~seen
  fp_ids = jnp.nonzero(fp, size=plan.max_false_positives, fill_value=r)[0].astype(uniq.dtype)
  return touched, fp_ids


def select_table_rows(key, counts, plan: Plan):
  """Selected-row mask over the whole table [R] from per-row counts (0 for untouched rows):
  the same per-row events as `select_rows`, an untouched row passing w.p.
  plan.false_positive_prob, with no cap."""
  noisy = counts + plan.selection_noise_multiplier * plan.selection_clip * \
      jax.random.normal(key, counts.shape)
  return noisy > plan.selection_threshold


def make_private_step(model, tx, schema, embed_update: str, embed_lr: float, plan: Plan,
                      item_id_dropout: tuple[int, float] = (-1, 0.0)):
  """Pure DP-SGD step (state, batch) -> (state, metrics), for either embedding mode: the
  model always reads gathered rows, so row gradients are per unit; with
  train.embed_update='dense' the noisy rows are scattered into the table's gradient for tx."""
  sparse_mode = embed_update != "dense"
  if sparse_mode:
    sparse.check_kind(embed_update)
  sigma, clip = plan.noise_multiplier, plan.clip_norm
  std = sigma * clip if sigma > 0 else 0.0  # noise 0 with no clip (inf) is 0, not nan

  def step(state: TrainState, batch: dict):
    rng = jax.random.fold_in(state.rng, state.step)
    batch = drop_item_ids(batch, rng, *item_id_dropout)
    if sparse_mode:
      table, params = state.embed["table"], state.params
    else:
      table = state.params["embedding"]["table"]
      params = _without_table(state.params)
    r = table.shape[0]
    ids = batch_ids(schema, batch)
    rows = table.at[ids].get(mode="fill", fill_value=0)
    dense, row_grads, norms, losses, valid = clipped_unit_grads(
        model, state.model_state, params, rows, batch, ids, rng, clip, plan.rows_per_unit,
        plan.microbatch, plan.clipping)
    k_noise, k_sel = jax.random.split(jax.random.fold_in(rng, 0xD9))
    flat_grads = row_grads.reshape(-1, row_grads.shape[-1])
    if plan.embed_noise == "dense" or plan.selection_over_table:
      # Every table row at once: no sort; untouched rows are rows with count 0.
      summed = jax.ops.segment_sum(flat_grads, ids.reshape(-1), num_segments=r)
      out_ids = jnp.arange(r, dtype=ids.dtype)
      if plan.embed_noise == "sparse":
        counts = selection_counts(ids, batch["weight"], plan.rows_per_unit,
                                  plan.selection_clip, ids, r)
        chosen = select_table_rows(k_sel, counts, plan)
        out_ids = jnp.where(chosen, out_ids, r)
        summed = jnp.where(chosen[:, None], summed, 0.0)
      out = summed
    else:
      uniq, inv = sparse.unique_rows(ids, r)
      summed = jax.ops.segment_sum(flat_grads, inv.reshape(-1), num_segments=uniq.shape[0])
      counts = selection_counts(ids, batch["weight"], plan.rows_per_unit,
                                plan.selection_clip, inv)
      touched, fp_ids = select_rows(k_sel, uniq, counts, plan)
      out_ids = jnp.concatenate([touched, fp_ids])
      out = jnp.concatenate([jnp.where((touched < r)[:, None], summed, 0.0),
                             jnp.zeros((fp_ids.shape[0], summed.shape[1]), summed.dtype)])
    k_rows, k_dense = jax.random.split(k_noise)
    out = out + std * jax.random.normal(k_rows, out.shape) * (out_ids < r)[:, None]
    out = out / plan.expected_units
    leaves, treedef = jax.tree_util.tree_flatten(dense)
    noise_keys = jax.random.split(k_dense, max(1, len(leaves)))
    grads = jax.tree_util.tree_unflatten(treedef, [
        (x + std * jax.random.normal(nk, x.shape, x.dtype)) / plan.expected_units
        for x, nk in zip(leaves, noise_keys)])
    if sparse_mode:
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      new_table, embed_opt = sparse.apply_update(embed_update, table, state.embed["opt"],
                                                 out_ids, out, embed_lr, state.step)
      new_state = state.replace(step=state.step + 1,
                                params=optax.apply_updates(state.params, updates),
                                opt_state=opt_state,
                                embed={"table": new_table, "opt": embed_opt})
    else:
      table_grad = (out if out.shape[0] == r else
                    jnp.zeros_like(table).at[out_ids].add(out, mode="drop"))
      full = _with_table(grads, table_grad)
      updates, opt_state = tx.update(full, state.opt_state, state.params)
      new_state = state.replace(step=state.step + 1,
                                params=optax.apply_updates(state.params, updates),
                                opt_state=opt_state)
    n_valid = jnp.maximum(jnp.sum(valid), 1)
    loss = jnp.sum(jnp.where(valid, losses, 0.0)) / n_valid
    return new_state, {"loss": loss, "grad_norm": optax.tree.norm((grads, out))}

  return step


def _without_table(params: dict) -> dict:
  params = dict(params)
  rest = {k: v for k, v in params["embedding"].items() if k != "table"}
  if rest:
    params["embedding"] = rest
  else:
    del params["embedding"]
  return params


def _with_table(params: dict, table) -> dict:
  params = dict(params)
  params["embedding"] = {**params.get("embedding", {}), "table": table}
  return params

"""Differentially private training (mscenario/train/privacy.py): clipping bounds each unit's
contribution, the mechanism with no noise and no clip is the ordinary step, the calibrated
noise is dp_accounting's, rows are selected with the probabilities the mechanism states,
user-level sampling and clipping bound a user's contribution, BatchNorm is refused."""
from __future__ import annotations

import dataclasses
import functools
import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from mscenario import config as config_lib
from mscenario.config import load_config
from mscenario.data import pipeline
from mscenario.data.prepare import prepare
from mscenario.errors import ConfigError
from mscenario.models.embedding import batch_ids
from mscenario.parallel import mesh as mesh_lib
from mscenario.train import loop, privacy, sparse
from mscenario.train.steps import _apply, make_train_step
from tests.helpers import SYNTHETIC, tiny

STAR_DP = ["--config.model.star.scenario_matmul=dense"]
DP = ["--config.model.batch_norm=false",
      "--config.privacy.enabled=true", "--config.privacy.epsilon=4"]


def _setup(*extra, model="sharedbottom"):
  unused = config_lib.SHARED_KEYS_UNUSED.get(model, ())  # e.g. m3oe: LayerNorm, no batch_norm
  dp = [o for o in DP if not ("batch_norm" in o and "batch_norm" in unused)]
  config = load_config(SYNTHETIC, [*tiny(model), *dp, *extra])
  data = prepare(config, log=lambda *_: None)
  return loop.build(config, data, mesh_lib.make_mesh(config.mesh)), data


@pytest.fixture(scope="module")
def dense_setup():
  return _setup()


def _batch(data, size=64, seed=0):
  it = pipeline.BatchIterator(data, "train", size, seed=seed, shuffle=True, drop_last=True)
  return {k: jnp.asarray(v) for k, v in next(it.epoch(0)).items()}


_JITTED = {}


def _contribution(setup, state, batch, clip, k=1):
  """Everything the noisy sum is built from: (clipped dense-grad sum, clipped row grads
  scattered into the table), as one flat vector; and the per-unit norms."""
  key = (id(setup), k)
  if key not in _JITTED:
    def contribution(state, batch, clip):
      params = privacy._without_table(state.params)
      table = state.params["embedding"]["table"]
      ids = batch_ids(setup.data.schema, batch)
      dense, row_grads, norms, _, _ = privacy.clipped_unit_grads(
          setup.model, state.model_state, params, table[ids], batch, ids, state.rng, clip,
          k, 0)
      table_grad = jnp.zeros_like(table).at[ids.reshape(-1)].add(
          row_grads.reshape(-1, table.shape[1]))
      flat = jnp.concatenate([x.reshape(-1) for x in jax.tree_util.tree_leaves(dense)]
                             + [table_grad.reshape(-1)])
      return flat, norms
    _JITTED[key] = jax.jit(contribution)
  flat, norms = _JITTED[key](state, batch, jnp.float32(clip))
  return np.asarray(flat, np.float64), np.asarray(norms)


def _without(batch, rows):
  w = np.asarray(batch["weight"]).copy()
  w[list(rows)] = 0.0
  return {**batch, "weight": jnp.asarray(w)}


@pytest.fixture(scope="module")
def star_setup():
  """STAR under DP: model.batch_norm=false makes its partitioned normalisation per example."""
  return _setup(*STAR_DP, model="star")


@pytest.mark.parametrize("which", [
    "dense_setup",
    # STAR: ~13 s more; CI checks STAR's per-example forward (the test below) instead
    pytest.param("star_setup", marks=pytest.mark.slow)])
def test_clipping_bounds_each_example(which, request):
  setup, data = request.getfixturevalue(which)
  state = setup.create_state()
  batch = _batch(data)
  unclipped, norms = _contribution(setup, state, batch, math.inf)
  clip = 0.5 * float(norms.min())  # every example is clipped
  full, _ = _contribution(setup, state, batch, clip)
  seen_big = 0
  for i in range(0, 64, 8):
    delta = np.linalg.norm(full - _contribution(setup, state, _without(batch, [i]), clip)[0])
    assert delta <= clip * (1 + 1e-4), (i, delta, clip)
    raw = np.linalg.norm(unclipped - _contribution(setup, state, _without(batch, [i]),
                                                   math.inf)[0])
    seen_big += raw > clip * 1.5
  assert seen_big >= 6  # without clipping the bound would not hold: the test can fail


def test_star_normalises_each_example_alone(star_setup):
  """Under DP (model.batch_norm=false) STAR's partitioned normalisation reads no batch
  statistics: a row's training-mode logit is the same alone, in any batch, and at eval; so
  the per-example gradients DP-SGD clips are the gradients of the model as trained and served.
  With batch statistics a row's logit moves with the other rows of its batch."""
  setup, data = star_setup
  state = setup.create_state()
  assert not state.model_state  # no batch statistics
  batch = _batch(data, 32)
  params = privacy._without_table(state.params)
  table = state.params["embedding"]["table"]

  @functools.partial(jax.jit, static_argnums=1)
  def forward(b, train):  # the forward the private step differentiates per example
    b = {**b, "embedding_rows": table[batch_ids(setup.data.schema, b)]}
    return _apply(setup.model, params, state.model_state, b, train, jax.random.PRNGKey(0))[0]

  def logits(b, train):
    return np.asarray(forward(b, train))

  together = logits(batch, True)
  alone = np.concatenate([logits({k: v[i:i + 1] for k, v in batch.items()}, True)
                          for i in range(0, 32, 8)])
  np.testing.assert_allclose(alone, together[::8], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(logits(batch, False), together, rtol=1e-5, atol=1e-6)
  assert together.std() > 1e-3  # rows differ: equal logits are not a constant


@pytest.mark.slow  # ~90 s on 2 cores; CI covers the step (clipping bound) and the model above
def test_star_trains_privately(tmp_path):
  config = load_config(SYNTHETIC, [*tiny("star"), *DP, *STAR_DP,
                                   "--config.privacy.epsilon=8"])
  results = loop.train(config, str(tmp_path / "run"), log=lambda *_: None)
  assert results["privacy"]["epsilon"] == pytest.approx(8, rel=1e-3)
  assert results["overall"]["auc"] > 0.6  # learns under noise (0.64 measured; random 0.5)


def test_user_level_clipping_counts_a_repeated_row_once(dense_setup):
  """A user unit reads its user-id row k times: the unit's table gradient for that row is
  the sum, and the bound must hold for it (per-position norms would under-count by ~sqrt k)."""
  setup, data = dense_setup
  state = setup.create_state()
  k = 8
  one = _batch(data, 64)
  same = {key: jnp.repeat(v[:8], k, axis=0) for key, v in one.items()}  # 8 units of 8 copies
  _, norms = _contribution(setup, state, same, math.inf, k)
  clip = float(norms.min()) / 2
  full, _ = _contribution(setup, state, same, clip, k)
  for u in range(8):
    rest, _ = _contribution(setup, state, _without(same, range(u * k, (u + 1) * k)), clip, k)
    assert np.linalg.norm(full - rest) <= clip * (1 + 1e-4)
  # A unit's loss is its rows' mean, so k copies of one example have that example's
  # gradient: its row gradients (1/k each, k positions) must be summed before the norm.
  single, _ = _contribution(setup, state, {key: v[:1] for key, v in one.items()}, math.inf)
  assert norms[0] == pytest.approx(np.linalg.norm(single), rel=1e-4)


def test_user_level_batches_bound_each_users_rows():
  setup, data = _setup("--config.privacy.unit=user", "--config.privacy.max_examples_per_user=4",
                       "--config.privacy.epsilon=8")
  plan = setup.privacy
  it = privacy.PoissonBatches(plan, data, seed=0)
  rows, weight = it.epoch_rows(0)
  users = np.asarray(data.arrays["user"])
  sizes = []
  for r, w in zip(rows, weight):
    units_r, units_w = r.reshape(-1, 4), w.reshape(-1, 4)
    real = units_w.sum(1) > 0
    sizes.append(int(real.sum()))
    owners = [set(users[u][wu > 0]) for u, wu in zip(units_r[real], units_w[real])]
    assert all(len(o) == 1 for o in owners)              # a unit is one user's rows
    flat = [next(iter(o)) for o in owners]
    assert len(flat) == len(set(flat))                   # a user at most once per step
    assert (units_w.sum(1) <= 4).all()
  # Poisson: the number of sampled users per step has the binomial's mean and spread.
  mean, sd = plan.expected_units, math.sqrt(plan.expected_units * (1 - plan.sampling_prob))
  assert abs(np.mean(sizes) - mean) < 5 * sd / math.sqrt(len(sizes))
  assert 0.5 * sd < np.std(sizes) < 1.5 * sd


def test_example_batches_are_poisson(dense_setup):
  setup, data = dense_setup
  plan = setup.privacy
  it = privacy.PoissonBatches(plan, data, seed=1)
  counts = np.zeros(len(data.arrays["label"]))
  sizes = []
  for e in range(6):
    rows, weight = it.epoch_rows(e)
    sizes += list(weight.sum(1))
    np.add.at(counts, rows[weight > 0], 1)
  steps = len(sizes)
  train = np.asarray(data.splits["train"])
  assert counts[np.setdiff1d(np.arange(len(counts)), train)].sum() == 0
  # Each example joins each step with probability q: per-example counts ~ Binomial(steps, q).
  expected = steps * plan.sampling_prob
  assert abs(counts[train].mean() - expected) < 0.01 * expected
  assert counts[train].var() == pytest.approx(expected * (1 - plan.sampling_prob), rel=0.1)
  assert abs(np.mean(sizes) - plan.expected_units) < 5 * math.sqrt(plan.expected_units / steps)


def test_noise_zero_and_infinite_clip_is_the_ordinary_step():
  """Same batches, same init: the private step with sigma = 0, clip = inf and every touched
  row selected (sigma_1 = 0, threshold 0) is the non-private step, in both embedding modes."""
  for mode in ("dense", "lazy_adam"):
    setup, data = _setup(f"--config.train.embed_update={mode}",
                         "--config.train.embed_learning_rate=0.01")
    plan = dataclasses.replace(setup.privacy, noise_multiplier=0.0, clip_norm=math.inf,
                               selection_noise_multiplier=0.0, selection_threshold=0.0,
                               false_positive_prob=0.0, max_false_positives=0,
                               expected_units=512.0)
    cfg = setup.config.train
    private = jax.jit(privacy.make_private_step(setup.model, setup.tx, data.schema, mode,
                                                cfg.embed_learning_rate, plan))
    plain = jax.jit(make_train_step(setup.model, setup.tx, data.schema, mode,
                                    cfg.embed_learning_rate))
    init = setup.create_state()
    a = b = init
    b = jax.tree_util.tree_map(jnp.array, b)
    it = pipeline.BatchIterator(data, "train", 512, seed=0, shuffle=True, drop_last=True)
    for batch, _ in zip(it.epoch(0), range(2)):
      batch = {k: jnp.asarray(v) for k, v in batch.items()}
      a, ma = private(a, batch)
      b, mb = plain(b, batch)
      assert float(ma["loss"]) == pytest.approx(float(mb["loss"]), rel=1e-5)
    flat_a = jax.tree_util.tree_leaves((a.params, a.embed))
    flat_b = jax.tree_util.tree_leaves((b.params, b.embed))
    moved = 0
    for x, y, x0 in zip(flat_a, flat_b, jax.tree_util.tree_leaves((init.params, init.embed))):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-4, atol=2e-6)
      moved += int(not np.allclose(np.asarray(x), np.asarray(x0)))
    assert moved >= 3
    if mode == "dense":
      continue
    # With the calibrated noise the same step moves the parameters elsewhere.
    noisy = jax.jit(privacy.make_private_step(setup.model, setup.tx, data.schema, mode,
                                              cfg.embed_learning_rate, setup.privacy))
    c, _ = noisy(setup.create_state(), batch)
    assert not np.allclose(np.asarray(jax.tree_util.tree_leaves(c.params)[0]),
                           np.asarray(jax.tree_util.tree_leaves(a.params)[0]))


GHOST_CASES = [
    ("mmoe", ()), ("star", STAR_DP), ("m2m", ()),  # stacked copies; STAR's rule; tokens
    ("mmoe", ("--config.privacy.unit=user", "--config.privacy.max_examples_per_user=4")),
    ("star", (*STAR_DP, "--config.privacy.unit=user",
              "--config.privacy.max_examples_per_user=4")),
    *[pytest.param(m, (), marks=pytest.mark.slow)
      for m in ("sharedbottom", "ple", "seed", "pepnet", "adasparse", "sarnet", "m3oe")]]


@pytest.mark.parametrize("model,extra", GHOST_CASES)
def test_ghost_norms_equal_materialised_per_unit_gradients(model, extra):
  """privacy.clipping=ghost (norms from layer inputs and output gradients, then one
  gradient of the clip-weighted loss) gives the per-unit norms, clipped dense sum and
  clipped row gradients of the reference that materialises every unit's gradient."""
  setup, data = _setup(*extra, model=model)
  state = setup.create_state()
  batch = _batch(data, 64)
  k = setup.privacy.rows_per_unit
  params = privacy._without_table(state.params)
  table = state.params["embedding"]["table"]
  ids = batch_ids(data.schema, batch)
  fns = {method: jax.jit(functools.partial(
      lambda params, rows, batch, ids, clip, method: privacy.clipped_unit_grads(
          setup.model, state.model_state, params, rows, batch, ids, state.rng, clip, k, 0,
          method), method=method)) for method in ("vmap", "ghost")}
  args = (params, table[ids], batch, ids)
  clip = float(np.median(np.asarray(fns["vmap"](*args, jnp.inf)[2])))  # half are clipped
  (dv, rv, nv, lv, _), (dg, rg, ng, lg, _) = (fns[m](*args, clip) for m in ("vmap", "ghost"))
  np.testing.assert_allclose(np.asarray(ng), np.asarray(nv), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(lg), np.asarray(lv), rtol=1e-6)
  # One tolerance for the whole sum: some leaves' exact gradient is 0 (e.g. a bias in front
  # of a softmax, which is shift-invariant) and holds only summation-order rounding noise.
  scale = max(float(np.abs(np.asarray(b)).max()) for b in jax.tree_util.tree_leaves(dv))
  for a, b in zip(jax.tree_util.tree_leaves(dg), jax.tree_util.tree_leaves(dv)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * scale)
  np.testing.assert_allclose(np.asarray(rg), np.asarray(rv), rtol=0,
                             atol=1e-5 * float(np.abs(np.asarray(rv)).max()))


def test_calibrated_noise_is_dp_accountings(dense_setup):
  setup, _ = dense_setup
  plan = setup.privacy
  q, steps, delta = plan.sampling_prob, plan.total_steps, plan.accountant_delta
  ratio = setup.config.privacy.selection_noise_ratio
  assert plan.selection_noise_multiplier == pytest.approx(ratio * plan.noise_multiplier)

  def event(sigma):
    inner = dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(ratio * sigma),
                                           dp_accounting.GaussianDpEvent(sigma)])
    return dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(q, inner),
                                             steps)

  theirs = dp_accounting.calibrate_dp_mechanism(
      dp_accounting.rdp.RdpAccountant, event, 4.0, delta,
      bracket_interval=dp_accounting.ExplicitBracketInterval(0.05, 50.0))
  assert plan.noise_multiplier == pytest.approx(theirs, rel=1e-3)
  acc = dp_accounting.rdp.RdpAccountant()
  acc.compose(event(plan.noise_multiplier))
  assert acc.get_epsilon(delta) == pytest.approx(4.0, abs=0.02)
  acc = dp_accounting.rdp.RdpAccountant()
  acc.compose(event(0.9 * plan.noise_multiplier))
  assert acc.get_epsilon(delta) > 4.2  # calibrated, not merely safe
  # Dense noise on rows: one Gaussian per step, less noise for the same budget.
  sigma = privacy.calibrate(q, steps, 4.0, delta, 0.0)
  acc = dp_accounting.rdp.RdpAccountant()
  acc.compose(dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
  assert acc.get_epsilon(delta) == pytest.approx(4.0, abs=0.02)
  assert sigma < plan.noise_multiplier
  block = privacy.report(plan, steps)
  assert block["epsilon"] == pytest.approx(4.0, abs=0.02)
  assert block["delta"] == pytest.approx(1.0 / plan.num_units)
  assert block["unit"] == "example" and "Poisson" in block["sampling"]


def test_row_selection_probabilities():
  """Untouched rows: selected w.p. P(N(0, (s1 C1)^2) > tau); a touched row with count c:
  P(c + N > tau). Checked over many draws against the exact probabilities."""
  r, sigma_1, tau = 3000, 1.0, 1.5
  fp = float(stats.norm.sf(tau / sigma_1))
  plan = privacy.Plan(
      unit="example", num_units=1, rows_per_unit=1, physical_units=1, expected_units=1.0,
      expected_rows=1.0, sampling_prob=1.0, steps_per_epoch=1, epochs=1, noise_multiplier=1.0,
      clip_norm=1.0, embed_noise="sparse", selection_noise_multiplier=sigma_1,
      selection_clip=1.0, selection_threshold=tau, false_positive_prob=fp,
      max_false_positives=int(stats.binom.isf(1e-12, r, fp)) + 1, table_rows=r,
      selection_over_table=False, delta=1e-5, target_epsilon=0.0, microbatch=0)
  # Two examples of 3 rows each; row 7 is shared. Counts: 1/sqrt(3) per example and row.
  ids = jnp.asarray([[7, 100, 200], [7, 300, 301]], jnp.int32)
  uniq, inv = sparse.unique_rows(ids, r)
  counts = privacy.selection_counts(ids, jnp.ones(2), 1, 1.0, inv)
  c1 = 1 / math.sqrt(3)
  got = dict(zip(np.asarray(uniq).tolist(), np.asarray(counts).tolist()))
  assert got[7] == pytest.approx(2 * c1) and got[100] == pytest.approx(c1)
  draws = 400
  keys = jax.random.split(jax.random.PRNGKey(0), draws)
  touched, fps = jax.jit(jax.vmap(lambda k: privacy.select_rows(k, uniq, counts, plan)))(keys)
  touched, fps = np.asarray(touched), np.asarray(fps)
  touched_set = {7, 100, 200, 300, 301}
  # Untouched rows: frequency over draws x untouched rows.
  fp_hits = (fps < r).sum()
  assert not np.isin(fps[fps < r], list(touched_set)).any()
  trials = draws * (r - len(touched_set))
  z = (fp_hits - trials * fp) / math.sqrt(trials * fp * (1 - fp))
  assert abs(z) < 4, (fp_hits, trials * fp)
  # Uniform over untouched rows: no row far from the mean frequency.
  per_row = np.bincount(fps[fps < r], minlength=r)
  assert per_row.max() <= draws * fp + 6 * math.sqrt(draws * fp)
  for row, count in ((7, 2 * c1), (100, c1)):
    p = float(stats.norm.sf((tau - count) / sigma_1))
    hits = (touched == row).sum()
    z = (hits - draws * p) / math.sqrt(draws * p * (1 - p))
    assert abs(z) < 4, (row, hits, draws * p)
  # A table no larger than a step's ids: the same events drawn over every row (no cap).
  table_counts = privacy.selection_counts(ids, jnp.ones(2), 1, 1.0, ids, r)
  assert float(table_counts[7]) == pytest.approx(2 * c1)
  assert float(table_counts.sum()) == pytest.approx(6 * c1)
  chosen = np.asarray(jax.jit(jax.vmap(
      lambda k: privacy.select_table_rows(k, table_counts, plan)))(keys))
  untouched = np.setdiff1d(np.arange(r), list(touched_set))
  fp_hits, trials = chosen[:, untouched].sum(), draws * len(untouched)
  z = (fp_hits - trials * fp) / math.sqrt(trials * fp * (1 - fp))
  assert abs(z) < 4, (fp_hits, trials * fp)
  for row, count in ((7, 2 * c1), (100, c1)):
    p = float(stats.norm.sf((tau - count) / sigma_1))
    z = (chosen[:, row].sum() - draws * p) / math.sqrt(draws * p * (1 - p))
    assert abs(z) < 4, (row, chosen[:, row].sum(), draws * p)


def test_false_positive_cap_is_the_binomial_tail():
  """The auto cap on selected untouched rows: the smallest whose binomial tail per step is
  below 1e-18 (scipy's isf gives the whole table there, which made every step scatter a
  table-sized block of zero rows)."""
  cfg = load_config(SYNTHETIC, [*DP]).privacy
  for rows in (13_312, 10 ** 6, 10 ** 8):
    fp_prob, threshold, cap = privacy._selection(cfg, 2.0, rows)
    assert stats.binom.sf(cap, rows, fp_prob) <= 1e-18 < stats.binom.sf(cap - 1, rows, fp_prob)
    assert cap < 100, (rows, cap)


def test_batchnorm_and_bad_privacy_config_are_refused():
  with pytest.raises(ConfigError, match="model.batch_norm=false"):
    _setup("--config.model.batch_norm=true")
  with pytest.raises(ConfigError, match="STAR normalises each example"):
    _setup("--config.model.batch_norm=true", model="star")
  with pytest.raises(ConfigError, match="scenario_matmul=dense"):
    _setup(model="star")
  with pytest.raises(ConfigError, match="exactly one of privacy.epsilon"):
    _setup("--config.privacy.noise_multiplier=1.0")
  with pytest.raises(ConfigError, match="privacy.unit"):
    _setup("--config.privacy.unit=household")

"""Synthetic multi-scenario click data whose true click probability is known for every row.

Why: it needs no download, reports can print the Bayes-optimal AUC beside the model's, it is
deterministic by seed, and it streams any number of rows (10^8 for scaling runs) without
holding them in memory.

The world (built once from the seed):
  * `num_topics` topic vectors in R^latent_dim; users and items are topic mixtures plus noise.
    Users' mixtures lean towards their age bucket's favourite topics, so side features carry
    signal about interests.
  * users: gender (2 values), age bucket (7), region (50); a user bias made of feature effects
    (the age effect differs per scenario) plus noise; mildly skewed activity.
  * items: category = dominant topic, a "quality" bias, Zipf-like popularity; short texts made
    of their top topics' words (for the language-model features).
  * scenarios: traffic share ~ (k+1)^-1.5 (one big, some small), a base rate (logit offset),
    an interest shift W_s = I + lambda_s R_s and an additive item-side vector b_s, a strength
    a_s, and a topic tilt of which items they show.
  * p = sigmoid(base_s + a_s * <u, W_s i + b_s> + item_bias + user_bias_s); label ~ Bernoulli(p).
  * With `importance` set (ground truth for explanations), p = sigmoid(base_s +
    sum_f w[s][f] * e_{s,f}(value of f)) instead: an additive world in which each feature's
    contribution to each scenario's logit is known exactly (`contributions`).

Rows are generated in fixed chunks of `CHUNK_ROWS`; the RNG of chunk k is derived from
(seed, k) alone, so any row range (e.g. one host's shard) is reproducible independently.

Length: the generator, its ground truth (Bayes-optimal probabilities, per-scenario feature
importance) and its texts must come from the same draws of one seed.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from mscenario.data.table import RawTable

CHUNK_ROWS = 65_536
TIME_ORIGIN = 1_600_000_000.0  # seconds; row r happens in [origin + r, origin + r + 1)

GENDERS = ("F", "M")
AGE_BUCKETS = ("under18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")
NUM_REGIONS = 50
AFFINITY_STD = 1.3  # logit std of the interest term for a_s = 1
# Columns of `data.synthetic.importance`: one weight per feature and scenario.
IMPORTANCE_FEATURES = ("user_id", "item_id", "gender", "age_bucket", "region", "category")

# Real English words per topic make item texts meaningful to a pretrained language model.
TOPIC_WORDS = (
    ("sports", ("football", "tennis", "marathon", "goal", "league", "stadium", "coach", "medal")),
    ("music", ("guitar", "album", "concert", "melody", "drums", "lyrics", "band", "piano")),
    ("cooking", ("recipe", "kitchen", "spice", "bake", "noodle", "sauce", "oven", "flavor")),
    ("travel", ("beach", "flight", "hotel", "passport", "island", "mountain", "journey", "map")),
    ("technology", ("laptop", "software", "robot", "chip", "network", "code", "gadget",
                    "cloud")),
    ("fashion", ("dress", "sneaker", "jacket", "silk", "runway", "denim", "style", "scarf")),
    ("finance", ("stock", "budget", "invest", "bank", "loan", "market", "savings", "coin")),
    ("gaming", ("console", "quest", "arcade", "level", "puzzle", "controller", "avatar",
                "boss")),
    ("health", ("fitness", "yoga", "vitamin", "sleep", "diet", "clinic", "running",
                "wellness")),
    ("movies", ("cinema", "actor", "comedy", "thriller", "director", "trailer", "drama",
                "screen")),
    ("home", ("garden", "sofa", "lamp", "carpet", "paint", "furniture", "plant", "candle")),
    ("books", ("novel", "poetry", "author", "chapter", "library", "mystery", "fiction",
               "essay")),
)
WORDS_PER_TEXT = 6


def _pseudo_words(rng: np.random.Generator, count: int) -> tuple[str, ...]:
  """Pronounceable made-up words for topics beyond the fixed English list."""
  cons, vows = "bdfgklmnprstvz", "aeiou"
  words = []
  for _ in range(count):
    k = int(rng.integers(2, 4))
    words.append("".join(cons[rng.integers(len(cons))] + vows[rng.integers(len(vows))]
                         for _ in range(k)))
  return tuple(words)


def _alias_table(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Walker/Vose alias table: O(1) sampling per draw (binary search on random keys is ~20x
  slower per row because every probe is a mispredicted branch)."""
  n = weights.shape[0]
  q = (weights * (n / weights.sum())).tolist()
  prob = np.ones(n, dtype=np.float64)
  alias = np.arange(n, dtype=np.int32)
  small = [i for i in range(n) if q[i] < 1.0]
  large = [i for i in range(n) if q[i] >= 1.0]
  while small and large:
    s, l = small.pop(), large.pop()
    prob[s], alias[s] = q[s], l
    q[l] += q[s] - 1.0
    (small if q[l] < 1.0 else large).append(l)
  return prob, alias  # leftovers keep prob 1 (rounding residue)


def _alias_draw(u: np.ndarray, n: int, prob: np.ndarray, alias: np.ndarray,
                offset=0) -> np.ndarray:
  """One draw per row from one uniform: the integer part of u*n picks the slot, the fraction
  decides slot vs its alias. With stacked tables (`offset` = table * n, aliases stored as
  stacked indices) the result is the stacked index."""
  x = u * n
  whole = np.minimum(x.astype(np.int64), n - 1)
  slot = whole + offset
  return np.where(x - whole < prob[slot], slot, alias[slot])


def _get(cfg, key, default):
  try:
    return cfg[key]
  except (KeyError, AttributeError):
    return default


class SyntheticWorld:
  """Users, items and scenarios of one seed; `rows(a, b)` samples interactions deterministically.

  Built from the `c.data.synthetic` ConfigDict (num_rows, num_users, num_items, num_scenarios,
  latent_dim, num_topics, seed); any mapping with those keys works.
  """

  def __init__(self, cfg):
    self.num_rows = int(_get(cfg, "num_rows", 200_000))
    self.num_users = int(_get(cfg, "num_users", 5_000))
    self.num_items = int(_get(cfg, "num_items", 2_000))
    self.num_scenarios = int(_get(cfg, "num_scenarios", 3))
    self.latent_dim = int(_get(cfg, "latent_dim", 8))
    self.num_topics = int(_get(cfg, "num_topics", 12))
    self.seed = int(_get(cfg, "seed", 0))
    for name in ("num_users", "num_items", "num_scenarios", "latent_dim", "num_topics"):
      if getattr(self, name) < 1:
        raise ValueError(f"data.synthetic.{name} must be >= 1, got {getattr(self, name)}")
    if self.num_rows < 0 or self.seed < 0:
      raise ValueError("data.synthetic.num_rows and data.synthetic.seed must be >= 0")
    self._build(np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(0,))))
    self._texts = None
    self.importance = self._importance(_get(cfg, "importance", ()))

  def _importance(self, weights) -> np.ndarray | None:
    """[S, F] weights of the additive ground-truth world, or None (the default world).

    Each feature value v gets a per-scenario effect e_{s,f}(v) ~ N(0, 1), standardised over
    the feature's values (mean 0, std 1), so w[s][f] is the logit std feature f carries in
    scenario s. Drawn from their own RNG stream: the default world is unchanged.
    """
    if weights is None or len(weights) == 0:
      return None
    w = np.asarray(weights, dtype=np.float64)
    nf = len(IMPORTANCE_FEATURES)
    if w.shape != (self.num_scenarios, nf) or not np.all(np.isfinite(w)) or np.any(w < 0):
      raise ValueError(
          f"data.synthetic.importance: expected {self.num_scenarios} rows (one per scenario) "
          f"of {nf} non-negative weights for {IMPORTANCE_FEATURES}, got {weights!r}")
    rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(4,)))
    sizes = (self.num_users, self.num_items, len(GENDERS), len(AGE_BUCKETS), NUM_REGIONS,
             self.num_topics)
    self._effects = []
    for n in sizes:
      e = rng.standard_normal((self.num_scenarios, n))
      if n > 1:
        e = (e - e.mean(axis=1, keepdims=True)) / (e.std(axis=1, keepdims=True) + 1e-12)
      else:
        e = np.zeros_like(e)
      self._effects.append(e)
    return w

  def contributions(self, cols: dict[str, np.ndarray]) -> np.ndarray:
    """[N, F] each feature's additive term w[s][f] * e_{s,f}(v) in the logit of the rows
    `cols` (integer-coded, as `rows()` returns them); importance worlds only."""
    if self.importance is None:
      raise ValueError("contributions() needs data.synthetic.importance")
    scen = np.asarray(cols["scenario"]).astype(np.int64)
    out = np.empty((len(scen), len(IMPORTANCE_FEATURES)))
    for f, name in enumerate(IMPORTANCE_FEATURES):
      values = np.asarray(cols[name]).astype(np.int64)
      out[:, f] = self.importance[scen, f] * self._effects[f][scen, values]
    return out

  # ---- the world ------------------------------------------------------------------------
  def _build(self, rng: np.random.Generator) -> None:
    nu, ni, ns, d, nt = (self.num_users, self.num_items, self.num_scenarios, self.latent_dim,
                         self.num_topics)
    names = [t[0] for t in TOPIC_WORDS[:nt]]
    words = [t[1] for t in TOPIC_WORDS[:nt]]
    extra_rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(2,)))
    for t in range(len(names), nt):
      names.append(f"topic{t}")
      words.append(_pseudo_words(extra_rng, 8))
    self.topic_names = tuple(names)
    self.topic_words = tuple(words)
    self.scenario_names = tuple(f"s{k}" for k in range(ns))

    topics = rng.standard_normal((nt, d)) / np.sqrt(d)

    # Users: features, then interests leaning towards their age bucket's topics.
    self.user_gender = rng.integers(0, len(GENDERS), nu).astype(np.int8)
    age_p = np.array([0.04, 0.18, 0.35, 0.2, 0.09, 0.08, 0.06])
    self.user_age = rng.choice(len(AGE_BUCKETS), nu, p=age_p).astype(np.int8)
    region_p = rng.dirichlet(np.full(NUM_REGIONS, 2.0))
    self.user_region = rng.choice(NUM_REGIONS, nu, p=region_p).astype(np.int16)
    age_profile = rng.dirichlet(np.full(nt, 0.5), len(AGE_BUCKETS))
    user_mix = 0.7 * rng.dirichlet(np.full(nt, 0.3), nu) + 0.3 * age_profile[self.user_age]
    user_vec = user_mix @ topics + 0.3 * rng.standard_normal((nu, d)) / np.sqrt(d)
    self._user_prob, self._user_alias = _alias_table(rng.lognormal(0.0, 0.6, nu))

    # Items: interests, category, popularity, quality.
    item_mix = rng.dirichlet(np.full(nt, 0.2), ni)
    item_vec = item_mix @ topics + 0.3 * rng.standard_normal((ni, d)) / np.sqrt(d)
    self.item_category = np.argmax(item_mix, axis=1).astype(np.int16)
    self._item_top2 = np.argsort(-item_mix, axis=1)[:, :2]
    self._item_top2_w = np.take_along_axis(item_mix, self._item_top2, axis=1)
    rank = rng.permutation(ni) + 1
    popularity = rank.astype(np.float64) ** -0.8  # Zipf-like
    log_pop = np.log(popularity)
    self.item_bias = (0.5 * rng.standard_normal(ni)
                      + 0.15 * (log_pop - log_pop.mean()) / (log_pop.std() + 1e-9))

    # Scenarios: traffic, base rate, interest shift and strength, item-mix tilt.
    share = (np.arange(ns) + 1.0) ** -1.5
    self.scenario_share = share / share.sum()
    self._scenario_cdf = np.cumsum(self.scenario_share)
    spread = np.linspace(-0.9, 0.9, ns) if ns > 1 else np.zeros(1)
    self.scenario_base = -0.4 + spread[rng.permutation(ns)]
    self.scenario_strength = np.concatenate(([1.0], rng.uniform(0.5, 1.5, ns - 1)))
    self.scenario_shift = np.concatenate(([0.0], rng.uniform(0.4, 1.0, ns - 1)))
    tilt = rng.standard_normal((ns, nt))
    tilt[0] = 0.0  # the big scenario shows items by popularity alone
    self.scenario_tilt = tilt
    pairs_u = rng.integers(0, nu, 4096)
    pairs_i = rng.integers(0, ni, 4096)
    self._item_key = np.empty((ns, ni, d), dtype=np.float32)
    item_prob = np.empty((ns, ni), dtype=np.float64)
    item_alias = np.empty((ns, ni), dtype=np.int32)
    centre = np.zeros(ns)
    for s in range(ns):
      w_s = np.eye(d) + self.scenario_shift[s] * rng.standard_normal((d, d)) / np.sqrt(d)
      b_s = self.scenario_shift[s] * 0.5 * rng.standard_normal(d) / np.sqrt(d)
      key = item_vec @ w_s.T + b_s
      # Normalise so that a_s alone sets the interest term's strength, whatever latent_dim, and
      # centre it so that base_s is the scenario's logit offset.
      aff = np.sum(user_vec[pairs_u] * key[pairs_i], axis=1)
      scale = self.scenario_strength[s] * AFFINITY_STD / (np.std(aff) + 1e-9)
      self._item_key[s] = key * scale
      centre[s] = -np.mean(aff) * scale
      item_prob[s], item_alias[s] = _alias_table(popularity * np.exp(1.5 * item_mix @ tilt[s]))
    # Stacked per-scenario alias tables: row r reads table scenario[r] at offset s * num_items.
    self._item_prob = item_prob.reshape(-1)
    self._item_alias = (item_alias + (np.arange(ns) * ni)[:, None]).reshape(-1)
    self._item_key = self._item_key.reshape(ns * ni, d)
    self._user_vec = user_vec.astype(np.float32)

    age_shared = 0.4 * rng.standard_normal(len(AGE_BUCKETS))
    age_by_s = age_shared[None, :] + 0.3 * rng.standard_normal((ns, len(AGE_BUCKETS)))
    gender_eff = 0.2 * rng.standard_normal((ns, len(GENDERS)))
    region_eff = 0.2 * rng.standard_normal(NUM_REGIONS)
    noise = 0.3 * rng.standard_normal(nu)
    # [scenario, user]: feature effects (age and gender differ per scenario) + the centring.
    self._user_bias = (centre[:, None] + age_by_s[:, self.user_age]
                       + gender_eff[:, self.user_gender] + region_eff[self.user_region][None, :]
                       + noise[None, :])

  # ---- texts -----------------------------------------------------------------------------
  @property
  def item_texts(self) -> np.ndarray:
    """Object array of `num_items` texts "item <id>: <words of its top topics>" (built lazily)."""
    if self._texts is None:
      rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(3,)))
      ni = self.num_items
      first = rng.random((ni, WORDS_PER_TEXT)) < (
          self._item_top2_w[:, :1] / self._item_top2_w.sum(axis=1, keepdims=True))
      topic = np.where(first, self._item_top2[:, :1], self._item_top2[:, 1:])
      word = rng.integers(0, 8, (ni, WORDS_PER_TEXT))
      vocab = self.topic_words
      self._texts = np.array(
          [f"item {i}: " + " ".join(vocab[t][w] for t, w in zip(topic[i], word[i]))
           for i in range(ni)], dtype=object)
    return self._texts

  def scenario_descriptions(self) -> dict[str, str]:
    """Short text per scenario (its traffic and favoured topics), for language-model features."""
    out = {}
    for s, name in enumerate(self.scenario_names):
      fav = [self.topic_names[t] for t in np.argsort(-self.scenario_tilt[s])[:2]]
      kind = "main feed" if s == 0 else f"surface favouring {fav[0]} and {fav[1]}"
      out[name] = f"scenario {name}: {kind}, {self.scenario_share[s]:.0%} of traffic"
    return out

  # ---- rows ------------------------------------------------------------------------------
  def _chunk(self, k: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(1, k)))
    n, ns = CHUNK_ROWS, self.num_scenarios
    scen = np.minimum(np.searchsorted(self._scenario_cdf, rng.random(n), side="right"), ns - 1)
    ni = self.num_items
    users = _alias_draw(rng.random(n), self.num_users, self._user_prob, self._user_alias)
    key_row = _alias_draw(rng.random(n), ni, self._item_prob, self._item_alias, scen * ni)
    items = key_row - scen * ni
    aff = np.einsum("nd,nd->n", np.take(self._user_vec, users, axis=0),
                    np.take(self._item_key, key_row, axis=0))
    if self.importance is None:
      logit = (self.scenario_base[scen] + aff.astype(np.float64) + self.item_bias[items]
               + self._user_bias[scen, users])
    else:
      logit = self.scenario_base[scen] + self.contributions(
          {"scenario": scen, "user_id": users, "item_id": items,
           "gender": self.user_gender[users], "age_bucket": self.user_age[users],
           "region": self.user_region[users],
           "category": self.item_category[items]}).sum(axis=1)
    truth = 1.0 / (1.0 + np.exp(-logit))
    label = (rng.random(n) < truth).astype(np.float32)
    index = np.arange(k * n, (k + 1) * n, dtype=np.int64)
    return {
        "user_id": users.astype(np.int32),
        "item_id": items.astype(np.int32),
        "scenario": scen.astype(np.int8 if ns < 128 else np.int32),
        "gender": self.user_gender[users],
        "age_bucket": self.user_age[users],
        "region": self.user_region[users],
        "category": self.item_category[items],
        "timestamp": TIME_ORIGIN + index + 0.999 * rng.random(n),
        "label": label,
        "truth": truth,
    }

  def rows(self, start: int, stop: int) -> dict[str, np.ndarray]:
    """Rows [start, stop) as numpy columns; identical whichever range or host asks for them.

    Categorical columns are integer codes (scenario index, gender/age/region/category code;
    names in `scenario_names`, GENDERS, AGE_BUCKETS, 'r%02d', `topic_names`); `label` is
    float32 0/1, `truth` the float64 click probability, `timestamp` float64 increasing.
    The world is unbounded: ranges past `num_rows` are valid.
    """
    start, stop = int(start), int(stop)
    if start < 0 or stop < start:
      raise ValueError(f"rows({start}, {stop}): need 0 <= start <= stop")
    if stop == start:
      empty = self._chunk(0)
      return {k: v[:0] for k, v in empty.items()}
    k0, k1 = start // CHUNK_ROWS, (stop - 1) // CHUNK_ROWS
    parts = [self._chunk(k) for k in range(k0, k1 + 1)]
    lo = start - k0 * CHUNK_ROWS
    hi = lo + (stop - start)
    if len(parts) == 1:
      return {k: v[lo:hi].copy() for k, v in parts[0].items()}
    return {k: np.concatenate([p[k] for p in parts])[lo:hi] for k in parts[0]}

  def stream(self, chunk_rows: int = CHUNK_ROWS, start: int = 0,
             stop: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Yield rows [start, stop) (default: all `num_rows`) in blocks of `chunk_rows`.

    Memory stays O(chunk_rows) whatever the total; a multiple of CHUNK_ROWS avoids regenerating
    a chunk that straddles two blocks.
    """
    stop = self.num_rows if stop is None else int(stop)
    if chunk_rows < 1:
      raise ValueError("chunk_rows must be >= 1")
    for a in range(int(start), stop, chunk_rows):
      yield self.rows(a, min(a + chunk_rows, stop))

  def decode(self, cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Integer-coded `rows()` output -> RawTable's canonical columns (str categoricals, text)."""
    region_names = np.array([f"r{r:02d}" for r in range(NUM_REGIONS)], dtype=object)
    return {
        "user_id": cols["user_id"].astype(np.int64),
        "item_id": cols["item_id"].astype(np.int64),
        "scenario": np.array(self.scenario_names, dtype=object)[cols["scenario"]],
        "gender": np.array(GENDERS, dtype=object)[cols["gender"]],
        "age_bucket": np.array(AGE_BUCKETS, dtype=object)[cols["age_bucket"]],
        "region": region_names[cols["region"]],
        "category": np.array(self.topic_names, dtype=object)[cols["category"]],
        "item_text": self.item_texts[cols["item_id"]],
        "timestamp": cols["timestamp"].astype(np.float64),
        "label": cols["label"].astype(np.float64),
        "truth": cols["truth"].astype(np.float64),
    }


def load_raw(data_cfg) -> RawTable:
  """`data_cfg.synthetic.num_rows` rows of the seed's world as a RawTable.

  Provenance: one pseudo-file 'synthetic(seed=…, …)', row_line = row index + 1.
  """
  cfg = data_cfg.synthetic if hasattr(data_cfg, "synthetic") else data_cfg["synthetic"]
  world = SyntheticWorld(cfg)
  n = world.num_rows
  cols = world.decode(world.rows(0, n))
  name = (f"synthetic(seed={world.seed}, users={world.num_users}, items={world.num_items}, "
          f"scenarios={world.num_scenarios})")
  table = RawTable(columns=cols, row_file=np.zeros(n, dtype=np.int32),
                   row_line=np.arange(1, n + 1, dtype=np.int64), files=[name])
  table.validate()
  return table

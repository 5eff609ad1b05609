"""Golden values for ban_tf.stats against independent computations.

The references here are explicit Python loops (one resample at a time, the same
RNG draws), math.comb binomial tails, and tabulated Student-t quantiles: they
share no code with the vectorised implementation.
"""

import math
import time

import numpy as np
import pytest

from ban_tf import stats


def _percentile(values, q):
  """Linear-interpolation percentile (NumPy's default), by hand."""
  s = sorted(values)
  pos = (len(s) - 1) * q / 100.0
  lo = math.floor(pos)
  hi = min(lo + 1, len(s) - 1)
  return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _loop_bootstrap_classification(row, ref, seed, resamples):
  rng = np.random.default_rng(seed)
  n = len(row)
  out = []
  for _ in range(resamples):
    idx = rng.integers(0, n, size=n)
    err_row = sum(1 for i in idx if not row[i]) / n
    err_ref = sum(1 for i in idx if not ref[i]) / n
    out.append(100.0 * (err_row - err_ref))
  return _percentile(out, 2.5), _percentile(out, 97.5)


def _mcnemar_exact(b, c):
  """Two-sided exact McNemar: 2 * P(X <= min(b, c)), X ~ Bin(b + c, 1/2), capped at 1."""
  n, k = b + c, min(b, c)
  if n == 0:
    return 1.0
  tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
  return min(1.0, 2 * tail)


def _pairs(n_both, b, c, n_neither, seed=1):
  """correct_row, correct_ref with b = ref right/row wrong, c = ref wrong/row right, shuffled."""
  ref = [True] * n_both + [True] * b + [False] * c + [False] * n_neither
  row = [True] * n_both + [False] * b + [True] * c + [False] * n_neither
  perm = np.random.default_rng(seed).permutation(len(ref))
  return np.array(row)[perm], np.array(ref)[perm]


def test_identical_models_delta_zero_ci_contains_zero_p_one():
  row, ref = _pairs(80, 0, 0, 20)
  c = stats.paired_classification(row, ref, resamples=500)
  assert c.delta == 0.0
  assert c.ci95 == (0.0, 0.0)
  assert c.p == 1.0
  assert c.n == 100
  assert c.verdict == "no difference detected"


def test_known_difference_matches_loop_bootstrap_and_binomial_tail():
  row, ref = _pairs(150, 3, 25, 22)  # the row fixes 25 of the reference's errors, breaks 3
  c = stats.paired_classification(row, ref, seed=7, resamples=400)
  assert c.delta == pytest.approx(100.0 * (3 - 25) / 200)  # -11 points
  lo, hi = _loop_bootstrap_classification(row.tolist(), ref.tolist(), 7, 400)
  assert c.ci95 == pytest.approx((lo, hi), abs=1e-12)
  assert c.p == pytest.approx(_mcnemar_exact(3, 25), rel=1e-12)
  assert c.p < 1e-4
  assert c.verdict == "better"
  assert c.detail.startswith("b=3 ") and "c=25 " in c.detail


def test_uneven_discordant_split():
  row, ref = _pairs(60, 15, 2, 23)  # the row is worse: b=15, c=2
  c = stats.paired_classification(row, ref, seed=3, resamples=300)
  assert c.delta == pytest.approx(13.0)
  assert c.p == pytest.approx(_mcnemar_exact(15, 2), rel=1e-12)
  assert c.p == pytest.approx(2 * sum(math.comb(17, i) for i in range(3)) / 2**17)
  assert c.ci95 == pytest.approx(
    _loop_bootstrap_classification(row.tolist(), ref.tolist(), 3, 300), abs=1e-12
  )
  assert c.verdict == "worse" and c.ci95[0] > 0
  # Symmetric: swapping the roles negates delta and CI, keeps p.
  s = stats.paired_classification(ref, row, seed=3, resamples=300)
  assert s.delta == pytest.approx(-13.0) and s.p == pytest.approx(c.p)


def test_reproducible_with_seed_and_different_with_another():
  row, ref = _pairs(300, 20, 31, 49)
  a = stats.paired_classification(row, ref, seed=0, resamples=2000)
  b = stats.paired_classification(row, ref, seed=0, resamples=2000)
  other = stats.paired_classification(row, ref, seed=1, resamples=2000)
  assert a == b
  assert a.ci95 != other.ci95
  assert a.delta == other.delta and a.p == other.p


def test_chunked_draws_equal_one_stream(monkeypatch):
  """The chunking does not change the draws: tiny chunks give the same CI as one big chunk."""
  row, ref = _pairs(40, 9, 4, 7)
  whole = stats.paired_classification(row, ref, seed=5, resamples=301)
  monkeypatch.setattr(stats, "_CHUNK_ELEMENTS", 60 * 7)  # chunks of 7 resamples
  assert stats.paired_classification(row, ref, seed=5, resamples=301) == whole


def test_ten_thousand_examples_ten_thousand_resamples_is_fast():
  rng = np.random.default_rng(0)
  ref = rng.random(10000) < 0.9
  row = np.where(rng.random(10000) < 0.05, ~ref, ref)
  t = time.process_time()  # CPU time: the shared machine's load does not count against it
  c = stats.paired_classification(row, ref, resamples=10000)
  elapsed = time.process_time() - t
  assert c.n == 10000 and c.ci95[0] < c.delta < c.ci95[1]
  assert elapsed < 5.0, elapsed  # 0.8 s wall measured on a quiet moment of the 2-core machine


def test_bad_shapes_raise():
  with pytest.raises(ValueError, match="equal"):
    stats.paired_classification([True, False], [True])
  with pytest.raises(ValueError, match="equal"):
    stats.paired_lm([1.0, 2.0], [1.0, 2.0], [0])


# -- language models ------------------------------------------------------------


def _loop_lm(nll_row, nll_ref, ids, seed, resamples):
  """Sentence bootstrap by hand: group tokens by sentence, resample sentences, recompute both ppl."""
  sentences = sorted(set(ids))
  groups = {s: [i for i, x in enumerate(ids) if x == s] for s in sentences}
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(resamples):
    pick = rng.integers(0, len(sentences), size=len(sentences))
    toks = [i for k in pick for i in groups[sentences[k]]]
    ppl_row = math.exp(sum(nll_row[i] for i in toks) / len(toks))
    ppl_ref = math.exp(sum(nll_ref[i] for i in toks) / len(toks))
    out.append(ppl_row - ppl_ref)
  return _percentile(out, 2.5), _percentile(out, 97.5)


def _lm_case(seed=0):
  """Sentences of uneven length; within a sentence the row's advantage is shared (correlated)."""
  rng = np.random.default_rng(seed)
  nll_ref, nll_row, ids = [], [], []
  for s in range(30):
    length = int(rng.integers(1, 12))
    shift = float(rng.normal(-0.05, 0.4))  # one shift per sentence: tokens not independent
    for _ in range(length):
      base = float(rng.uniform(1.0, 3.0))
      nll_ref.append(base)
      nll_row.append(max(0.01, base + shift))
      ids.append(100 + 3 * s)  # arbitrary, non-contiguous ids
  return np.array(nll_row), np.array(nll_ref), np.array(ids)


def test_lm_identical_models():
  row, _, ids = _lm_case()
  c = stats.paired_lm(row, row.copy(), ids, resamples=300)
  assert c.delta == 0.0 and c.ci95 == (0.0, 0.0) and c.p == 1.0
  assert c.verdict == "no difference detected"


def test_lm_sentence_bootstrap_matches_loop():
  row, ref, ids = _lm_case()
  c = stats.paired_lm(row, ref, ids, seed=4, resamples=300)
  assert c.delta == pytest.approx(math.exp(row.mean()) - math.exp(ref.mean()), rel=1e-12)
  assert c.ci95 == pytest.approx(_loop_lm(row.tolist(), ref.tolist(), ids.tolist(), 4, 300))
  assert c.n == len(row) and c.detail == "30 sentences"


def test_lm_resamples_sentences_not_tokens():
  """Correlated tokens within a sentence: a token bootstrap's CI is much narrower; ours is not it."""
  row, ref, ids = _lm_case()
  c = stats.paired_lm(row, ref, ids, seed=4, resamples=300)
  token_ids = np.arange(len(row))  # every token its own sentence = a token bootstrap
  t = stats.paired_lm(row, ref, token_ids, seed=4, resamples=300)
  assert t.ci95 == pytest.approx(_loop_lm(row.tolist(), ref.tolist(), token_ids.tolist(), 4, 300))
  assert c.delta == t.delta
  assert (c.ci95[1] - c.ci95[0]) > 1.5 * (t.ci95[1] - t.ci95[0])


def test_lm_sign_flip_p_by_hand():
  row, ref, ids = _lm_case(2)
  c = stats.paired_lm(row, ref, ids, seed=9, resamples=200)
  d = [
    sum(row[i] - ref[i] for i in range(len(ids)) if ids[i] == s) for s in sorted(set(ids.tolist()))
  ]
  rng = np.random.default_rng(10)
  extreme = 0
  for _ in range(200):
    signs = rng.integers(0, 2, size=len(d), dtype=np.int8) * 2 - 1
    flipped = sum(float(s) * x for s, x in zip(signs, d))
    extreme += abs(flipped) >= abs(sum(d)) - 1e-9 * max(abs(sum(d)), 1.0)
  assert c.p == pytest.approx((1 + extreme) / 201)


def test_lm_clear_difference_is_detected():
  rng = np.random.default_rng(0)
  ref = rng.uniform(1, 3, size=2000)
  row = ref + 0.2  # uniformly worse
  ids = np.repeat(np.arange(200), 10)
  c = stats.paired_lm(row, ref, ids, resamples=500)
  assert c.verdict == "worse" and c.p == pytest.approx(1 / 501)


# -- over seeds -------------------------------------------------------------------


def test_over_seeds_t_interval_against_table_quantile():
  d = [-0.4, 0.1, -0.7, -0.2, -0.3]
  c = stats.over_seeds(d, includes="teacher resampled per seed")
  mean = sum(d) / 5
  sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 4)
  t975_df4 = 2.7764451051977987  # Student t, 97.5th percentile, 4 df (standard tables: 2.776)
  assert c.delta == pytest.approx(mean)
  assert c.ci95 == pytest.approx(
    (mean - t975_df4 * sd / math.sqrt(5), mean + t975_df4 * sd / 5**0.5)
  )
  tstat = mean / (sd / math.sqrt(5))
  assert tstat == pytest.approx(-2.3009, abs=1e-4)  # by hand: mean -0.3, sd sqrt(0.085)
  # Student t CDF with 4 df in closed form: F(t) = 1/2 + 3/8 u (1 - t^2 / (12 (1 + t^2/4))),
  # u = t / sqrt(1 + t^2/4); two-sided p = 2 F(-|t|).
  cdf4 = lambda t: (
    0.5 + 3 / 8 * (t / math.sqrt(1 + t * t / 4)) * (1 - t * t / (12 * (1 + t * t / 4)))
  )
  assert cdf4(t975_df4) == pytest.approx(0.975, abs=1e-12)
  assert c.p == pytest.approx(2 * cdf4(-abs(tstat)), rel=1e-9)
  assert c.n == 5 and c.includes == "teacher resampled per seed"
  assert c.verdict == "no difference detected"


def test_over_seeds_one_seed_is_undefined_not_zero():
  c = stats.over_seeds([-0.5], includes="one fixed teacher")
  assert c.p is None and c.ci95 == (-math.inf, math.inf)
  assert c.verdict == "no difference detected"
  assert c.to_json()["ci95"] == [None, None]


def test_verdict_and_json():
  assert stats.verdict((-1.0, -0.1)) == "better"
  assert stats.verdict((0.1, 1.0)) == "worse"
  assert stats.verdict((-0.1, 0.1)) == "no difference detected"
  assert stats.verdict((0.0, 0.5)) == "no difference detected"
  row, ref = _pairs(50, 2, 15, 33)
  j = stats.paired_classification(row, ref, resamples=100).to_json()
  assert set(j) >= {"delta", "ci95", "p", "n", "method", "verdict"}
  assert isinstance(j["ci95"], list) and len(j["ci95"]) == 2
  import json  # pylint: disable=g-import-not-at-top

  assert json.loads(json.dumps(j, allow_nan=False)) == j
  assert "better" in stats.LEGEND and "no difference detected" in stats.LEGEND


def test_no_verdict_when_the_paired_test_does_not_reject():
  """Few discordant pairs: the percentile bootstrap CI can exclude 0 while the exact McNemar
  test does not reject (b=30, c=16 of 2000: p = 0.054 by math.comb); the verdict follows both,
  so a row never reads "worse" beside p > 0.05."""
  row, ref = _pairs(1900, 30, 16, 54)
  got = stats.paired_classification(row, ref, seed=0, resamples=2000)
  assert got.p == pytest.approx(_mcnemar_exact(30, 16), rel=1e-12)
  assert 0.05 < got.p < 0.06
  assert got.ci95[0] > 0  # the bootstrap interval alone would say "worse"
  assert got.verdict == "no difference detected"
  assert stats.verdict((0.1, 1.0), p=0.054) == "no difference detected"
  assert stats.verdict((0.1, 1.0), p=0.01) == "worse"
  assert stats.verdict((-1.0, -0.1), p=0.049) == "better"


def test_identical_deltas_over_seeds_give_no_verdict():
  """Two seeds with the same Δ (deltas come in 0.01-point steps): zero variance leaves the
  t-test undefined, so no verdict from the zero-width interval."""
  got = stats.over_seeds([0.01, 0.01], includes="x")
  assert got.p is None and got.ci95 == (0.01, 0.01)
  assert got.verdict == "no difference detected"

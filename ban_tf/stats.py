"""Paired statistics: did a row (BAN-k, BANE-k, Baseline) differ from its reference (Teacher, Baseline)?

TensorFlow-free (NumPy and SciPy only), so reports and tests load it in a second.
Notes and references: docs/statistics.md. Three comparisons, one result type:

- `paired_classification`: two classifiers scored on the same test examples.
  Δ test error (percentage points) with a 95% paired bootstrap CI over examples
  (percentile method; Efron & Tibshirani 1993, ch. 13) and the exact McNemar
  p-value on the discordant pairs (Dietterich 1998), via `scipy.stats.binomtest`.
- `paired_lm`: two language models scored on the same tokens. Δ perplexity with a
  95% paired bootstrap CI that resamples *sentences* (all tokens of a sentence
  together: tokens within a sentence are not independent; Dror et al. 2018) and a
  paired sign-flip randomization p-value over sentences (approximate
  randomization, Riezler & Maxwell 2005).
- `over_seeds`: per-seed paired deltas; their mean with a 95% Student-t interval
  (`scipy.stats.t`) and a one-sample t-test p (`scipy.stats.ttest_1samp`).

Deltas are always row minus reference in the metric's table unit (percentage
points of error, or perplexity): positive = worse, negative = better. The
bootstrap is seeded (`seed`), so a report redone from the same files prints the
same interval. Resampling is vectorised: a (chunk x n) index matrix per chunk,
row r of all chunks together equal to `numpy.random.default_rng(seed).integers(0,
n, size=n)` drawn `resamples` times in sequence.
"""

import dataclasses
import math
from typing import Optional

import numpy as np
from scipy import stats as scipy_stats

RESAMPLES = 10000
_CHUNK_ELEMENTS = 4_000_000  # index-matrix elements per chunk (~16 MB of int32)

LEGEND = (
  "Verdict: `better` / `worse` = the 95% CI of Δ (row minus reference; positive = worse) lies "
  "entirely below / above 0 and the paired test's p < 0.05; `no difference detected` otherwise "
  "(the data cannot tell the two apart; not evidence that they are equal)."
)
ALPHA = 0.05  # the paired test's level that a verdict also needs (the CI is the 95% one)


@dataclasses.dataclass(frozen=True)
class Comparison:
  """One row against one reference.

  Attributes:
    delta: row minus reference, in the metric's table unit (percentage points of
      test error, or perplexity); positive = worse.
    ci95: 95% confidence interval of `delta` (lo, hi); (-inf, inf) when it is
      undefined (one seed).
    p: two-sided p-value of "no difference" (method's test), or None.
    n: number of test examples, sentences' tokens, or seeds the comparison used.
    method: how it was computed, in words (resamples, seed, test).
    verdict: `verdict(ci95, p)`.
    unit: what `n` counts ("examples", "tokens", "seeds").
    includes: for over-seed comparisons, which variance the interval includes.
    detail: row-specific counts behind `p` (McNemar's discordant pairs b and c).
  """

  delta: float
  ci95: tuple
  p: Optional[float]
  n: int
  method: str
  verdict: str
  unit: str = ""
  includes: str = ""
  detail: str = ""

  def to_json(self) -> dict:
    """{"delta", "ci95": [lo, hi], "p", "n", "method", "verdict"} (+ "unit", "includes",
    "detail" when set).

    Non-finite numbers (an undefined interval or p) are written as null: JSON has no inf/NaN.
    """
    out = {
      "delta": _finite(self.delta),
      "ci95": [_finite(self.ci95[0]), _finite(self.ci95[1])],
      "p": _finite(self.p),
      "n": int(self.n),
      "method": self.method,
      "verdict": self.verdict,
    }
    if self.unit:
      out["unit"] = self.unit
    if self.includes:
      out["includes"] = self.includes
    if self.detail:
      out["detail"] = self.detail
    return out


def _finite(v):
  return None if v is None or not math.isfinite(v) else float(v)


def verdict(ci95, p=None) -> str:
  """ "better" (hi < 0), "worse" (lo > 0), else "no difference detected" (the CI contains 0).

  With a paired test's `p`, a verdict also needs p < ALPHA: near the boundary a percentile
  bootstrap CI (few discordant pairs) can exclude 0 while the exact test does not reject, and
  the table then says "no difference detected" rather than a verdict its own p contradicts.
  """
  lo, hi = ci95
  if p is not None and not p < ALPHA:
    return "no difference detected"
  if hi is not None and hi < 0:
    return "better"
  if lo is not None and lo > 0:
    return "worse"
  return "no difference detected"


def _resample_indices(n: int, resamples: int, seed: int):
  """Yields int32 index matrices (chunk, n) drawn with replacement from range(n).

  Row r over all chunks equals the r-th `rng.integers(0, n, size=n)` of
  `numpy.random.default_rng(seed)` (NumPy fills row-major from one stream).
  """
  rng = np.random.default_rng(seed)
  chunk = max(1, _CHUNK_ELEMENTS // max(n, 1))
  done = 0
  while done < resamples:
    m = min(chunk, resamples - done)
    yield rng.integers(0, n, size=(m, n))
    done += m


def _percentile_ci(values) -> tuple:
  lo, hi = np.percentile(values, [2.5, 97.5])
  return float(lo), float(hi)


def paired_classification(
  correct_row, correct_ref, *, seed: int = 0, resamples: int = RESAMPLES
) -> Comparison:
  """Δ test error of two classifiers on the same examples: paired bootstrap CI and exact McNemar.

  Args:
    correct_row: bool [N], whether the row's model classified example i right.
    correct_ref: bool [N], the reference's (Teacher or Baseline), same examples, same order.
    seed: the bootstrap's seed (numpy default_rng).
    resamples: bootstrap resamples.

  Returns:
    Comparison: delta = 100 * (error(row) - error(ref)) in percentage points; ci95 the
    2.5/97.5 percentiles of that difference over `resamples` resamples of the N
    examples with replacement (both errors on the same resample); p = exact McNemar,
    two-sided: `scipy.stats.binomtest(min(b, c), b + c, 0.5).pvalue` with b = ref right
    / row wrong, c = ref wrong / row right (1.0 when b + c == 0); n = N.

  Raises:
    ValueError: shapes differ, or no examples.
  """
  row = np.asarray(correct_row, dtype=bool).reshape(-1)
  ref = np.asarray(correct_ref, dtype=bool).reshape(-1)
  if row.shape != ref.shape or row.size == 0:
    raise ValueError(
      f"paired_classification needs two equal, non-empty [N] arrays; got {row.shape} and {ref.shape}"
    )
  n = row.size
  # Per example: error(row) - error(ref) = ref - row in {-1, 0, 1}.
  diff = ref.astype(np.int8) - row.astype(np.int8)
  boot = np.concatenate(
    [diff[idx].sum(axis=1, dtype=np.int64) for idx in _resample_indices(n, resamples, seed)]
  ) * (100.0 / n)
  ci = _percentile_ci(boot)
  b = int(np.count_nonzero(ref & ~row))
  c = int(np.count_nonzero(~ref & row))
  p = 1.0 if b + c == 0 else float(scipy_stats.binomtest(min(b, c), b + c, 0.5).pvalue)
  return Comparison(
    delta=100.0 * (b - c) / n,
    ci95=ci,
    p=p,
    n=n,
    method=f"paired bootstrap over examples ({resamples} resamples, seed {seed}) + exact McNemar",
    verdict=verdict(ci, p),
    unit="examples",
    detail=f"b={b} (reference right, row wrong), c={c} (reference wrong, row right)",
  )


def sentence_sums(nll, sentence_ids):
  """Per-sentence NLL sums and token counts.

  Args:
    nll: float [T] per-token negative log-likelihoods (nats).
    sentence_ids: int [T], the sentence of each token (any integers; equal = same sentence).

  Returns:
    (sums float64 [S], counts int64 [S]) in the order of sorted unique ids.
  """
  ids = np.asarray(sentence_ids).reshape(-1)
  _, inverse = np.unique(ids, return_inverse=True)
  sums = np.bincount(inverse, weights=np.asarray(nll, dtype=np.float64).reshape(-1))
  counts = np.bincount(inverse)
  return sums, counts


def paired_lm(
  nll_row, nll_ref, sentence_ids, *, seed: int = 0, resamples: int = RESAMPLES
) -> Comparison:
  """Δ perplexity of two language models on the same tokens: bootstrap over sentences.

  Args:
    nll_row: float [T], the row's per-token NLL (nats), in evaluation order.
    nll_ref: float [T], the reference's on the same tokens.
    sentence_ids: int [T], each token's sentence (the resampling unit).
    seed: the bootstrap's and the randomization test's seed.
    resamples: resamples for both.

  Returns:
    Comparison: delta = exp(mean nll_row) - exp(mean nll_ref) (perplexity); ci95 the
    2.5/97.5 percentiles of that difference recomputed on `resamples` resamples of
    the S sentences with replacement (each resample: exp(sum nll / tokens) of both
    models on the same sentences); p = two-sided paired sign-flip randomization test
    over sentences of the summed log-likelihood difference, (1 + #{|flipped| >=
    |observed|}) / (1 + resamples); n = T (tokens; the sentence count is in `method`).

  Raises:
    ValueError: shapes differ, or no tokens.
  """
  row = np.asarray(nll_row, dtype=np.float64).reshape(-1)
  ref = np.asarray(nll_ref, dtype=np.float64).reshape(-1)
  ids = np.asarray(sentence_ids).reshape(-1)
  if row.shape != ref.shape or row.shape != ids.shape or row.size == 0:
    raise ValueError(
      f"paired_lm needs three equal, non-empty [T] arrays; got {row.shape}, {ref.shape}, {ids.shape}"
    )
  s_row, counts = sentence_sums(row, ids)
  s_ref, _ = sentence_sums(ref, ids)
  n_sent = counts.size
  boot = []
  for idx in _resample_indices(n_sent, resamples, seed):
    tokens = counts[idx].sum(axis=1)
    boot.append(np.exp(s_row[idx].sum(axis=1) / tokens) - np.exp(s_ref[idx].sum(axis=1) / tokens))
  ci = _percentile_ci(np.concatenate(boot))
  # Sign-flip randomization: under "no difference", each sentence's difference is as likely negated.
  d = s_row - s_ref
  observed = abs(d.sum())
  rng = np.random.default_rng(seed + 1)
  chunk = max(1, _CHUNK_ELEMENTS // n_sent)
  extreme, done = 0, 0
  while done < resamples:
    m = min(chunk, resamples - done)
    signs = rng.integers(0, 2, size=(m, n_sent), dtype=np.int8) * 2 - 1
    extreme += int(np.count_nonzero(np.abs(signs @ d) >= observed - 1e-9 * max(observed, 1.0)))
    done += m
  p = (1 + extreme) / (1 + resamples)
  t = row.size
  return Comparison(
    delta=math.exp(row.sum() / t) - math.exp(ref.sum() / t),
    ci95=ci,
    p=p,
    n=t,
    method=f"paired bootstrap over sentences ({resamples} resamples, seed {seed}) + sign-flip "
    f"randomization test over sentences ({resamples}, seed {seed + 1})",
    verdict=verdict(ci, p),
    unit="tokens",
    detail=f"{n_sent} sentences",
  )


def over_seeds(deltas, *, includes: str) -> Comparison:
  """Mean of per-seed paired deltas with a 95% Student-t interval.

  Args:
    deltas: float [n], one paired delta per seed (row_s - reference_s, table unit).
    includes: which variance the interval covers, in words (e.g. "teacher resampled
      per seed" or "one fixed teacher: excludes teacher variance").

  Returns:
    Comparison: delta = mean; ci95 = mean ± t.ppf(0.975, n - 1) * std(ddof=1) / sqrt(n)
    ((-inf, inf) for n < 2: undefined); p = `scipy.stats.ttest_1samp(deltas, 0)` two-sided
    (None for n < 2 or zero spread); n = seeds.

  Raises:
    ValueError: no deltas.
  """
  d = np.asarray(deltas, dtype=np.float64).reshape(-1)
  if d.size == 0:
    raise ValueError("over_seeds needs at least one delta")
  n = d.size
  mean = float(d.mean())
  p = None
  if n < 2:
    ci = (-math.inf, math.inf)
  else:
    half = float(scipy_stats.t.ppf(0.975, n - 1)) * float(d.std(ddof=1)) / math.sqrt(n)
    ci = (mean - half, mean + half)
    if d.std(ddof=1) > 0:
      p = float(scipy_stats.ttest_1samp(d, 0.0).pvalue)
  return Comparison(
    delta=mean,
    ci95=ci,
    p=p,
    n=n,
    method=f"mean of {n} per-seed paired deltas, 95% t-interval (ddof=1) + one-sample t-test",
    # Identical deltas over seeds leave the t-test undefined (zero variance): no verdict from a
    # zero-width interval of a handful of seeds.
    verdict=verdict(ci, p) if p is not None else "no difference detected",
    unit="seeds",
    includes=includes,
  )

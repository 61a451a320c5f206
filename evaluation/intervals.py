"""95% bootstrap intervals for perplexity, with SciPy's ``scipy.stats.bootstrap``.

Quality results are noisy in the text, not in the model: one method's PPL moves with which
windows or stretches were scored. So every interval resamples units of text, and every
comparison is *paired*: a method and dense are resampled on the same units.

- context protocol: the unit is a context window (each scores the same number of tokens);
- streaming protocol: the unit is a ``SEGMENT_TOKENS``-token stretch of the text (a block
  bootstrap: consecutive tokens stay together, so their correlation is kept), weighted by the
  tokens it scored (the last stretch may be shorter).

A unit's data is its NLL sum and its token count; PPL is ``exp(sum NLL / sum tokens)`` over the
resampled units, and the difference to dense is ``PPL(method) - PPL(dense)`` on the same units.
"A beats B" needs the interval of the difference to exclude zero.
"""

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
RESAMPLES = 10_000
SEED = 0  # the same resamples on every run: intervals repeat exactly


def _ppl(nll: np.ndarray, tokens: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.exp(nll.sum(axis=axis) / tokens.sum(axis=axis))


def _bootstrap(data: tuple, statistic) -> tuple[float, float]:
    if len(data[0]) < 2:  # one unit: nothing to resample
        return float("nan"), float("nan")
    result = stats.bootstrap(data, statistic, paired=True, vectorized=True, confidence_level=CONFIDENCE,
                             n_resamples=RESAMPLES, method="percentile", random_state=np.random.default_rng(SEED))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def ppl_interval(nll: list[float], tokens: list[int]) -> dict:
    """PPL over the units and its 95% interval (units: windows or stretches)."""
    nll, tokens = np.asarray(nll, dtype=np.float64), np.asarray(tokens, dtype=np.float64)
    low, high = _bootstrap((nll, tokens), _ppl)
    return {"ppl": float(_ppl(nll, tokens)), "ppl_ci95": [low, high], "units": len(nll)}


def paired_difference(nll: list[float], dense_nll: list[float], tokens: list[int]) -> dict:
    """PPL(method) - PPL(dense) over the same units, its 95% paired interval, and the same as a
    percentage of dense's PPL."""
    nll, dense_nll = np.asarray(nll, dtype=np.float64), np.asarray(dense_nll, dtype=np.float64)
    tokens = np.asarray(tokens, dtype=np.float64)
    if nll.shape != dense_nll.shape:
        raise ValueError(f"paired units differ: {nll.shape[0]} against dense's {dense_nll.shape[0]}")

    def difference(a, b, n, axis=-1):
        return _ppl(a, n, axis) - _ppl(b, n, axis)

    def relative(a, b, n, axis=-1):
        return 100 * (_ppl(a, n, axis) / _ppl(b, n, axis) - 1)

    data = (nll, dense_nll, tokens)
    return {"delta_ppl": float(difference(*data)), "delta_ppl_ci95": list(_bootstrap(data, difference)),
            "delta_pct": float(relative(*data)), "delta_pct_ci95": list(_bootstrap(data, relative))}


def excludes_zero(interval: list[float]) -> bool:
    """Whether a difference's interval is clear of zero (a claimed difference needs this)."""
    low, high = interval
    return low > 0 or high < 0

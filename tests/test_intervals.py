"""Bootstrap intervals: PPL over units, paired differences that see a shift the unpaired spread hides."""

import math

import numpy as np
import pytest

from evaluation.intervals import excludes_zero, paired_difference, ppl_interval


def test_ppl_is_the_token_weighted_mean_and_its_interval_holds_it():
    nll, tokens = [200.0, 300.0, 260.0, 240.0], [100, 100, 100, 100]
    result = ppl_interval(nll, tokens)
    assert result["ppl"] == pytest.approx(math.exp(1000 / 400)) and result["units"] == 4
    low, high = result["ppl_ci95"]
    assert math.exp(2.0) <= low < result["ppl"] < high <= math.exp(3.0)
    # a shorter last unit (a streaming stretch) weighs by its tokens
    assert ppl_interval([100.0, 10.0], [50, 10])["ppl"] == pytest.approx(math.exp(110 / 60))


def test_paired_difference_sees_a_small_shift_across_very_different_windows():
    rng = np.random.default_rng(0)
    dense = rng.uniform(1.5, 4.0, size=32) * 512  # windows far apart in difficulty
    method = dense + 512 * 0.01  # every window 0.01 nats worse
    tokens = [512] * 32
    shift = paired_difference(method, dense, tokens)
    assert shift["delta_pct"] == pytest.approx(100 * (math.exp(0.01) - 1), rel=1e-6)
    assert excludes_zero(shift["delta_pct_ci95"]) and shift["delta_ppl"] > 0
    unpaired_low, unpaired_high = ppl_interval(dense, tokens)["ppl_ci95"]
    assert unpaired_low < ppl_interval(method, tokens)["ppl"] < unpaired_high  # unpaired: hidden in the spread
    same = paired_difference(dense, dense, tokens)
    assert same["delta_ppl"] == 0 and same["delta_ppl_ci95"] == [0.0, 0.0] and not excludes_zero([0.0, 0.0])


def test_noise_without_a_shift_is_not_a_difference():
    rng = np.random.default_rng(1)
    dense = rng.uniform(1.5, 4.0, size=32) * 512
    noise = rng.normal(0, 5, size=32)
    noisy = dense + noise - noise.mean()  # window by window different, zero on average
    assert not excludes_zero(paired_difference(noisy, dense, [512] * 32)["delta_ppl_ci95"])


def test_unpaired_units_are_refused():
    with pytest.raises(ValueError, match="paired units"):
        paired_difference([1.0, 2.0], [1.0], [1, 1])

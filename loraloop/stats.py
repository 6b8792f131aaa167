"""Small one-sided tests shared by the learner's gate and the rollback guard: is the new version worse?

The fixed-sample tests (:func:`worse_p_value`, :func:`paired_worse_p_value`) are valid when
looked at once; the guard, which looks at its evidence on every poll, uses the sequential
:func:`paired_sequential_p_value` instead.

Example:
    >>> round(paired_worse_p_value(new_only=2, old_only=10), 4)  # 10 of 12 discordant rows favour the old version
    0.0193
    >>> paired_worse_p_value(new_only=5, old_only=5) > 0.5
    True
"""

from __future__ import annotations

import math

EXACT_TEST_MAX_N = 20_000  # Fisher's exact test up to this many judged in all, the z-test above


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def worse_p_value(new_ok: float, new_n: float, old_ok: float, old_n: float) -> float:
    """One-sided p-value of "the new rate of ok outcomes is lower than the old one".

    Fisher's exact test (lower tail of the hypergeometric law of ``new_ok`` given the
    margins) while ``new_n + old_n <= EXACT_TEST_MAX_N``, a pooled two-proportion z-test
    above. Counts are rounded (Prometheus sums are floats). Returns 1.0 without data.
    """
    a, n1, c, n2 = (int(round(x)) for x in (new_ok, new_n, old_ok, old_n))
    a, c = min(max(a, 0), n1), min(max(c, 0), n2)
    if n1 <= 0 or n2 <= 0:
        return 1.0
    total, ok = n1 + n2, a + c
    if total <= EXACT_TEST_MAX_N:
        lowest = max(0, n1 - (total - ok))
        denominator = _log_comb(total, n1)
        terms = [_log_comb(ok, k) + _log_comb(total - ok, n1 - k) - denominator for k in range(lowest, a + 1)]
        top = max(terms)
        return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))
    pooled = ok / total
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 1.0
    z = (a / n1 - c / n2) / se
    return 0.5 * math.erfc(-z / math.sqrt(2))


def paired_worse_p_value(new_only: float, old_only: float) -> float:
    """One-sided exact McNemar test of "the new version is right less often than the old one on the same requests".

    Only discordant pairs carry evidence: under no difference, ``old_only`` among the
    ``new_only + old_only`` discordant pairs is Binomial(n, 1/2); the p-value is its upper tail.
    """
    b, c = int(round(old_only)), int(round(new_only))
    return 1.0 if b + c == 0 else binomial_upper_p_value(b, b + c, 0.5)


def binomial_upper_p_value(successes: int, trials: int, rate: float) -> float:
    """One-sided exact binomial test of "the rate is higher than ``rate``": P(X >= successes), X ~ Binomial(trials, rate).

    Example:
        >>> f"{binomial_upper_p_value(9, 10, 0.2):.2g}"  # 9 of 10 where 2 in 10 is usual
        '4.2e-06'
        >>> binomial_upper_p_value(0, 10, 0.2)
        1.0
    """
    if trials <= 0 or successes <= 0:
        return 1.0
    if successes > trials:
        return 0.0
    rate = min(max(rate, 1e-12), 1 - 1e-12)
    log_p, log_q = math.log(rate), math.log1p(-rate)
    terms = [_log_comb(trials, k) + k * log_p + (trials - k) * log_q for k in range(successes, trials + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


# --- sequential: valid under continuous monitoring --------------------------------------------------
def discordant_log_lr(old_only: float, new_only: float) -> float:
    """Log mixture likelihood ratio of "the new version is worse" on the discordant pairs so far.

    Among discordant pairs (one version right, the other wrong), ``old_only`` is
    Binomial(n, p); "no worse" is ``p <= 1/2``. The mixture puts a uniform prior on the
    alternatives ``p`` in [1/2, 1] against the null's boundary ``p = 1/2``:

        LR = 2 ** (n + 1) * integral_{1/2}^{1} p ** b * (1 - p) ** c dp,   b = old_only, c = new_only

    Under any ``p <= 1/2`` this is a non-negative supermartingale in the pairs (each
    alternative's ratio has expectation ``1 - 2 (p' - 1/2)(1 - 2 p) <= 1``), so by Ville's
    inequality ``P(LR ever reaches 1 / alpha) <= alpha``, however often it is looked at and for
    however long: the mixture sequential probability ratio test (Robbins).

    Example:
        >>> round(discordant_log_lr(old_only=0, new_only=0), 6)  # no evidence
        0.0
        >>> discordant_log_lr(old_only=9, new_only=0) > math.log(100)  # 9 one-sided pairs reject at alpha 0.01
        True
        >>> discordant_log_lr(old_only=8, new_only=0) > math.log(100)  # 8 do not
        False
    """
    from scipy.special import betainc, betaln

    b, c = max(0, int(round(old_only))), max(0, int(round(new_only)))
    # integral_{1/2}^{1} p^b (1-p)^c dp = B(b+1, c+1) * (1 - I_{1/2}(b+1, c+1)) = B(b+1, c+1) * I_{1/2}(c+1, b+1)
    upper = float(betainc(c + 1, b + 1, 0.5))
    if upper <= 0.0:
        return -math.inf
    return (b + c + 1) * math.log(2.0) + float(betaln(b + 1, c + 1)) + math.log(upper)


def paired_sequential_p_value(new_only: float, old_only: float) -> float:
    """Always-valid p-value of "the new version is right less often than the old one on the same requests".

    ``min(1, 1 / LR)`` with LR the mixture ratio of :func:`discordant_log_lr`: rejecting at the
    first look where it falls below ``alpha`` keeps the false-rejection rate at most ``alpha``
    under continuous monitoring (unlike :func:`paired_worse_p_value` looked at repeatedly).

    Example:
        >>> paired_sequential_p_value(new_only=0, old_only=0)
        1.0
        >>> round(paired_sequential_p_value(new_only=2, old_only=10), 3)  # the fixed test says 0.0193 here
        0.106
    """
    log_lr = discordant_log_lr(old_only, new_only)
    return 1.0 if log_lr <= 0 else min(1.0, math.exp(-log_lr))

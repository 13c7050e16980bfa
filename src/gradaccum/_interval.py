"""The noise scale's error bar: a 90% interval for EMA(tr Σ) / EMA(|G|²) from the windows' spread.

Each measured window gives one pair (t_i, g_i) of unbiased estimates of (tr Σ, |G|²); the
noise scale is the ratio of their EMA means T/G. The windows are independent draws (given
the weights), so the spread of the pairs over the EMA's horizon says how far T and G may be
from what they estimate:

- EMA-weighted covariance of (t, g), with Bessel's correction for weights: the effective
  number of windows is n_eff = (Σw)² / Σw² (about 39 windows for decay 0.95 once warm,
  where the mean is over about 20), and Cov(T, G) = S / (n_eff − 1);
- Fieller's interval for a ratio of two means (Fieller 1954): every R with
  (T − R·G)² ≤ q² · Var(T − R·G), q the Student-t quantile at n_eff − 1 degrees of
  freedom. It is exact for normal means, and unlike the delta method it is skewed the
  way a ratio is, and it is unbounded above (high = inf) while G is not clearly above 0,
  i.e. while the measurement cannot yet rule out any large critical batch.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any

LEVEL = 0.90
"""Two-sided coverage of the interval."""
MIN_DOF = 2.0
"""Fewer effective windows than 3: the t quantile (and the spread itself) means nothing yet."""


def t_quantile(p: float, dof: float) -> float:
    """Student-t quantile for a (possibly fractional) ``dof`` >= 2: the Cornish-Fisher series
    (Abramowitz & Stegun 26.7.5), within 0.3% of the exact value from dof 2 on."""
    z = NormalDist().inv_cdf(p)
    g = ((z**3 + z) / 4, (5 * z**5 + 16 * z**3 + 3 * z) / 96,
         (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
         (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160)
    return z + sum(gi / dof ** (i + 1) for i, gi in enumerate(g))


class WindowMoments:
    """EMA-decayed sums of each window's (t, g), their squares and product, and the weights'.

    Kept apart from :class:`gradaccum.noise.NoiseScale`'s own sums so that a checkpoint from
    before the interval existed resumes its point estimate exactly and grows an interval afresh.
    """

    KEYS = ("w", "w2", "t", "g", "tt", "tg", "gg")

    def __init__(self, ema: float) -> None:
        self.ema = ema
        self.sums = dict.fromkeys(self.KEYS, 0.0)

    def add(self, trace: float, grad_sq: float) -> None:
        e, s = self.ema, self.sums
        new = {"w": 1.0, "w2": 1.0, "t": trace, "g": grad_sq, "tt": trace * trace,
               "tg": trace * grad_sq, "gg": grad_sq * grad_sq}
        for k, x in new.items():
            s[k] = (e * e if k == "w2" else e) * s[k] + x

    def interval(self, level: float = LEVEL) -> tuple[float, float] | None:
        """(low, high) for T/G, clamped at 0 (tr Σ >= 0); high may be inf. None before the
        windows' spread can be read (fewer than 3 effective windows)."""
        s = self.sums
        if s["w"] <= 0 or s["w2"] <= 0:
            return None
        n_eff = s["w"] ** 2 / s["w2"]
        if not n_eff - 1 >= MIN_DOF:
            return None
        t, g = s["t"] / s["w"], s["g"] / s["w"]
        # Var of a weighted mean: the weighted variance / (n_eff − 1) (Bessel for weights).
        scale = 1.0 / (n_eff - 1)
        vtt = max(s["tt"] / s["w"] - t * t, 0.0) * scale
        vgg = max(s["gg"] / s["w"] - g * g, 0.0) * scale
        vtg = (s["tg"] / s["w"] - t * g) * scale
        q2 = t_quantile(0.5 + level / 2, n_eff - 1) ** 2
        return fieller(t, g, vtt, vtg, vgg, q2)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.sums)

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """``None`` (a checkpoint without them): start the spread afresh."""
        self.sums = {k: float(state[k]) for k in self.KEYS} if state else dict.fromkeys(self.KEYS, 0.0)


def fieller(t: float, g: float, vtt: float, vtg: float, vgg: float, q2: float) -> tuple[float, float]:
    """Fieller's confidence set for t/g given the means' (co)variances and q²; clamped to R >= 0."""
    if not all(map(math.isfinite, (t, g, vtt, vtg, vgg, q2))):
        return 0.0, math.inf
    a = g * g - q2 * vgg
    b = t * g - q2 * vtg
    c = t * t - q2 * vtt
    if a <= 0:
        # G is not clearly above 0: no upper bound. The lower end is the conservative
        # (Bonferroni-style) one, T's lower end over G's upper end.
        g_hi, t_lo = g + math.sqrt(q2 * vgg), t - math.sqrt(q2 * vtt)
        return (max(t_lo, 0.0) / g_hi if g_hi > 0 else 0.0), math.inf
    root = math.sqrt(max(b * b - a * c, 0.0))  # >= 0 whenever a > 0: R = t/g is always inside
    return max((b - root) / a, 0.0), max((b + root) / a, 0.0)

"""Lines in the micro-batch size: the planner's fits of measured bytes.

Every cost the planner measures is affine in the micro-batch size n (the same ops run
with tensors whose sizes are affine in n), so each is fitted as a line, never below a
measured point; the in-flight peak is the upper envelope of one line per op.
Private: used by :mod:`gradaccum._memprofile`; :mod:`gradaccum.memory` re-exports LinearFit.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Iterable, Sequence

from gradaccum._livebytes import PeakTracker

Line = tuple[float, float]
"""``(intercept, slope)``: bytes = intercept + slope * micro_batch."""


@dataclasses.dataclass(frozen=True)
class LinearFit:
    """``bytes(n) = intercept + slope * n``, fitted so it is never below a measured point."""

    intercept: float
    slope: float
    max_rel_residual: float
    """Largest |measured - least-squares line| / measured over the points: linearity check."""

    def __call__(self, n: int | float) -> float:
        return self.intercept + self.slope * n

    @classmethod
    def conservative(cls, xs: Sequence[float], ys: Sequence[float]) -> LinearFit:
        """Least-squares slope (or the last segment's, if steeper), then the intercept raised
        until the line covers every point: extrapolation to larger n never undershoots a
        cost that grows faster at the top of the measured range."""
        if len(xs) < 2 or len(set(xs)) < 2:
            raise ValueError("a linear fit needs at least two distinct micro-batch sizes")
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        b_ls = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
        a_ls = my - b_ls * mx
        resid = max(abs(y - (a_ls + b_ls * x)) / max(abs(y), 1.0) for x, y in zip(xs, ys, strict=True))
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        i, j = order[-2], order[-1]
        b_last = (ys[j] - ys[i]) / (xs[j] - xs[i])
        slope = max(b_ls, b_last, 0.0)
        intercept = max(y - slope * x for x, y in zip(xs, ys, strict=True))
        return cls(intercept, slope, resid)


def envelope_value(lines: Sequence[Line], n: float) -> float:
    """The maximum of ``lines`` at ``n``."""
    return max(c + d * n for c, d in lines)


def upper_envelope(lines: Iterable[Line], start: float = 1.0) -> tuple[Line, ...]:
    """The few lines that are the maximum somewhere on ``[start, inf)``, by increasing slope."""
    best: dict[float, float] = {}
    for c, d in lines:
        best[d] = max(best.get(d, -math.inf), c)
    hull: list[Line] = []
    for d in sorted(best):
        c = best[d]
        while hull:
            c2, d2 = hull[-1]
            if c2 + d2 * start <= c + d * start:  # steeper and not lower at start: dominates
                hull.pop()
                continue
            if len(hull) >= 2:
                c1, d1 = hull[-2]
                # the new line overtakes hull[-2] before hull[-1] does: hull[-1] is never the max
                if (c1 - c) * (d2 - d1) <= (c1 - c2) * (d - d1):
                    hull.pop()
                    continue
            break
        hull.append((c, d))
    return tuple(hull)


def peak_lines(
    trackers: Sequence[PeakTracker], xs: Sequence[int], peaks: Sequence[int]
) -> tuple[Line, ...]:
    """The in-flight peak as a function of the micro-batch size, from the measured timelines.

    Running the same code at another micro-batch size runs the same ops with tensors
    whose sizes are affine in n, so the live bytes after op t are ``c_t + d_t * n`` and
    the peak is the maximum of those lines. Two aligned timelines give every line; the
    peak then follows the step's real profile (where in the step it occurs may move as
    n grows) instead of one straight line through a few peaks. Falls back to a linear
    fit of the peaks when the op sequences differ (size-dependent kernels). ``xs`` are the
    measured micro-batch sizes, ``peaks`` their peak bytes, one per tracker.
    """
    top = trackers[-1].ops
    same = [i for i, t in enumerate(trackers) if t.ops == top]
    if len(same) >= 2:
        i, j = same[-2], same[-1]
        n1, n2 = xs[i], xs[j]
        lines = []
        for y1, y2 in zip(trackers[i].timeline, trackers[j].timeline, strict=True):
            d = (y2 - y1) / (n2 - n1)
            lines.append((float(y2 - d * n2), d) if d >= 0 else (float(max(y1, y2)), 0.0))
        env = upper_envelope(lines)
    else:
        fit = LinearFit.conservative(xs, peaks)
        env = ((fit.intercept, fit.slope),)
    # never below any measured point (e.g. a size whose op sequence differed)
    short = max(0.0, max(p - envelope_value(env, x) for x, p in zip(xs, peaks, strict=True)))
    return tuple((c + short, d) for c, d in env)

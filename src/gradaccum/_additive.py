"""``ga.check``'s split test behind ``non-additive-loss``: is a batch's loss the sum of its parts?

Accumulation is exact only for a loss that is a sum over examples. A contrastive loss with
in-batch negatives is not: each row's loss changes with the rows around it, so the loss of
a batch differs from the sum of its micro-batches' losses by far more than rounding, and
accumulating micro-batch losses trains another objective. ``Accumulator.step_cached`` is
the exact way to train such a loss.
"""

from __future__ import annotations

import math

# How far from 1x / 2x a doubled batch's loss may be and still read as a mean / a sum
# (the bar of check's mean-reduced-loss test, which it must agree with).
RATIO_BAR = 1e-3


def non_additive(whole: float, parts: list[float], doubled: float | None, tol: float) -> str | None:
    """The finding's message when the loss couples the examples of a batch; None otherwise.

    ``whole``: loss_sum on the batch; ``parts``: loss_sum on each micro-batch; ``doubled``:
    (loss_sum on the batch twice over) / ``whole``; ``tol``: float rounding, relative. A loss
    whose parts do not add up but whose doubled batch gives exactly 1x (a MEAN) or 2x (each
    micro-batch divided by its own count) is a mistake of reduction, which the
    ``mean-reduced-loss`` and ``gradient-mismatch`` findings name with their fix; any other
    ratio means a row's loss depends on which rows share its batch.
    """
    total = math.fsum(parts)
    scale = abs(whole) + math.fsum(abs(p) for p in parts)
    if not (math.isfinite(whole) and math.isfinite(total)) or abs(whole - total) <= tol * scale:
        return None
    if doubled is None or min(abs(doubled - 1.0), abs(doubled - 2.0)) <= RATIO_BAR:
        return None
    return (
        f"the loss of the whole batch ({whole:.6g}) is not the sum of its {len(parts)} micro-batches' "
        f"losses ({total:.6g}), and doubling the batch scaled it {doubled:.3g}x: each example's loss "
        "depends on the others (in-batch negatives), so accumulated micro-batch losses train another "
        "objective; compute the loss once per window with Accumulator.step_cached(micro_batches, encode, "
        "window_loss) (e.g. ga.losses.info_nce)"
    )

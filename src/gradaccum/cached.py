"""``Accumulator.step_cached``: losses that couple a window's examples, made exact (GradCache).

A contrastive loss with in-batch negatives (InfoNCE, CLIP, MultipleNegativesRanking) is not
a sum over examples: each row's loss depends on every other row's representation, so
summing micro-batch losses trains another objective (fewer negatives per row). The
representation cache (Gao et al. 2021; sentence-transformers'
``CachedMultipleNegativesRankingLoss``) gives the full-batch gradient instead:

1. encode every micro-batch under ``torch.no_grad()``, recording the torch RNG state first;
2. gather the window's representations (micro-batch order, then rank order: ``sync.gather_rows``),
   compute the window's loss once and back-propagate it to the representations only, and to
   parameters the loss itself uses (a learnable temperature): they get their gradient here, once;
3. re-encode each micro-batch with grad under its recorded RNG state (dropout draws the same
   masks) and back-propagate the cached representation gradients into the encoder.

Across the window only the representations and their gradients are held, never the
activations; the price is a second forward per micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from gradaccum import sync
from gradaccum._grads import WindowGrads
from gradaccum._guards import check_loss, count_items

EncodeFn = Callable[[nn.Module, Any], Any]
"""``encode(model, micro_batch) -> Tensor | tuple[Tensor, ...]``: representations, rows along dim 0."""
WindowLossFn = Callable[[Any], "tuple[torch.Tensor, int | torch.Tensor]"]
"""``window_loss(reps) -> (loss_sum, num_items)`` on the whole window's representations."""


class RngState:
    """The torch generators' states (CPU, and every CUDA device once CUDA is initialised).

    Python's ``random`` and NumPy are not recorded: ``encode`` must draw its randomness from torch.
    """

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        self.cuda = torch.cuda.get_rng_state_all() if cuda else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


class CachedWindow:
    """One window of ``step_cached``: its micro-batches, the RNG state each was encoded under,
    their cached representations, then the loss's gradients with respect to them."""

    def __init__(self) -> None:
        self.micro: list[Any] = []
        self.rng: list[RngState] = []
        self.reps: list[tuple[torch.Tensor, ...]] = []
        """Per micro-batch, its representations (no graph); dropped once the loss has its gradient."""
        self.grads: list[tuple[torch.Tensor, ...]] = []
        """Per micro-batch, d(loss_sum)/d(representations) (times a GradScaler's scale)."""
        self.single = True  # encode returned one tensor, so window_loss gets one
        self.after: RngState | None = None  # where the generators stood after the first pass

    def __len__(self) -> int:
        return len(self.micro)

    def encode(self, model: nn.Module, micro_batches: Iterable[Any], encode: EncodeFn) -> None:
        """Step 1: every micro-batch's representations, without grad, and its RNG state."""
        with torch.no_grad():
            for mb in micro_batches:
                state = RngState()
                out = encode(model, mb)
                if not self.micro:
                    self.single = isinstance(out, torch.Tensor)
                reps = _as_reps(out, self.reps[0] if self.reps else None, "encode")
                self.micro.append(mb)
                self.rng.append(state)
                self.reps.append(tuple(r.detach() for r in reps))
        if not self.micro:
            raise ValueError("step_cached() got no micro-batches")
        self.after = RngState()

    def loss_backward(
        self, window_loss: WindowLossFn, grads: WindowGrads, grad_scaler: Any
    ) -> tuple[torch.Tensor, int | float | torch.Tensor]:
        """Step 2: the window's loss once; its gradient to the representations (kept) and to the
        parameters the loss uses (put in the window's gradients). Returns this rank's share of
        (loss_sum, num_items): all of it on rank 0, none on the others (each computed it all)."""
        width = len(self.reps[0])
        rows = [[r[j].shape[0] for r in self.reps] for j in range(width)]
        leaves = [torch.cat([r[j] for r in self.reps]).requires_grad_() for j in range(width)]
        self.reps = []  # the concatenated leaves hold them now
        gathered = sync.gather_rows(leaves)
        out = window_loss(gathered[0] if self.single else tuple(gathered))
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise TypeError(f"window_loss must return (loss_sum, num_items), got {type(out).__name__}")
        loss_sum, n = out
        check_loss(loss_sum)
        n = count_items(n)
        scaled = grad_scaler.scale(loss_sum) if grad_scaler is not None else loss_sum
        got = torch.autograd.grad(scaled, [*leaves, *grads.params], allow_unused=True)
        del gathered, scaled, out
        split = [(torch.zeros_like(x) if g is None else g).split(rows[j])
                 for j, (x, g) in enumerate(zip(leaves, got[:width], strict=True))]
        self.grads = [tuple(s[i] for s in split) for i in range(len(self.micro))]
        _place(grads, got[width:], sync.world_size())
        if sync.rank() == 0:  # every rank computed the same loss: one share reaches the sum
            return loss_sum.detach(), n
        return torch.zeros_like(loss_sum.detach()), 0

    def reencode(self, model: nn.Module, encode: EncodeFn, sync_every: bool) -> None:
        """Step 3: each micro-batch again, with grad, under its RNG state; back-propagate its cached
        gradients. The wrapper (DDP/FSDP2) syncs on the last one only, unless ``sync_every``."""
        last = len(self.micro) - 1
        for i, (mb, state) in enumerate(zip(self.micro, self.rng, strict=True)):
            state.restore()
            with sync.no_grad_sync(model, skip=not (i == last or sync_every)):
                reps = _as_reps(encode(model, mb), self.grads[i], "encode")
                if any(r.shape != g.shape for r, g in zip(reps, self.grads[i], strict=True)):
                    raise ValueError("encode returned other shapes when run again on the same micro-batch: "
                                     "it must be deterministic given the torch RNG state")
                pairs = [(r, g) for r, g in zip(reps, self.grads[i], strict=True) if r.requires_grad]
                if pairs:
                    torch.autograd.backward([r for r, _ in pairs], [g for _, g in pairs])
            self.grads[i] = ()  # this micro-batch's cached gradients are spent
            del reps, pairs
        if self.after is not None:
            self.after.restore()


def _as_reps(out: Any, like: tuple[torch.Tensor, ...] | None, who: str) -> tuple[torch.Tensor, ...]:
    """``encode``'s output as a tuple of tensors with rows, shaped like the first micro-batch's
    (``like``: same count, same trailing shape and dtype)."""
    reps = (out,) if isinstance(out, torch.Tensor) else out
    if not (isinstance(reps, (tuple, list)) and reps and all(isinstance(r, torch.Tensor) for r in reps)):
        raise TypeError(f"{who} must return a Tensor or a tuple of Tensors, got {type(out).__name__}")
    if any(r.dim() == 0 for r in reps):
        raise ValueError(f"{who} must return representations with rows (dim 0), got a 0-dim tensor")
    if like is not None and (len(reps) != len(like) or any(
            r.shape[1:] != x.shape[1:] or r.dtype != x.dtype for r, x in zip(reps, like, strict=False))):
        got = [(tuple(r.shape), r.dtype) for r in reps]
        want = [(("rows", *x.shape[1:]), x.dtype) for x in like]
        raise ValueError(f"{who} returned {got}, unlike the first micro-batch's {want}")
    return tuple(reps)


def _place(grads: WindowGrads, got: tuple[torch.Tensor | None, ...], world: int) -> None:
    """The loss's own parameters' gradients, as the window's first (grad_dtype buffers where kept).

    Every rank computed the whole gradient, so each keeps 1/world of it: summed over ranks
    (gradaccum's reduction) that is the gradient once, and averaged (DDP, which also leaves
    a parameter no rank's forward used as it is) it is what the window's divisor expects.
    """
    for p, g in zip(grads.params, got, strict=True):
        if g is not None:
            g = g / world if world > 1 else g
            buffered = grads.buffers.buffered(p)
            grads.buffers.set_grad(p, g.to(grads.buffers.dtype) if buffered else g)  # type: ignore[arg-type]

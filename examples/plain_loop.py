"""A plain PyTorch loop with gradaccum: effective batch 64 from micro-batches of 4.

Run: python examples/plain_loop.py   (CPU, a few seconds)

A tiny classifier on generated data, a SUM loss with its item count, one exact optimizer
step per 16 micro-batches, and ga.check once before training to make sure the loss
function is accumulation-safe.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import gradaccum as ga

torch.manual_seed(0)
x = torch.randn(2048, 20)
y = (x[:, :5].sum(1) > 0).long() + (x[:, 5] > 1).long()  # three classes
model = nn.Sequential(nn.Linear(20, 64), nn.GELU(), nn.Linear(64, 3))


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
    inputs, targets = batch
    # SUM over the items, and how many there were: gradaccum divides once per window.
    return F.cross_entropy(model(inputs), targets, reduction="sum"), targets.shape[0]


# Before spending compute: is this model + loss accumulation-safe?
report = ga.check(model, loss_fn, (x[:16], y[:16]), micro_batch_size=4)
print(report)
assert report.ok

optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
acc = ga.Accumulator(model, optimizer, accum_steps=16, max_grad_norm=1.0, measure_noise=True)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4, shuffle=True)
for _epoch in range(2):
    for micro in loader:
        with acc.micro_step():  # under DDP: gradients sync only on the window's last micro-batch
            result = acc.backward(*loss_fn(model, micro))
        if result is not None and result.step % 20 == 0:
            noise = f"{result.noise_scale:.0f}" if result.noise_scale is not None else "-"
            print(f"step {result.step}: loss {result.loss:.4f}, gradient noise scale {noise} examples")
    acc.flush()  # the partial last window, normalised by its real size
with torch.no_grad():
    accuracy = (model(x).argmax(1) == y).float().mean().item()
print(f"train accuracy {accuracy:.3f}")

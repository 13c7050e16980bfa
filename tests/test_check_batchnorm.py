"""``check`` and BatchNorm (issue 20, item 6): a train-mode gradient off beyond float rounding
is an error, whatever the cause; BatchNorm that measurably does not matter stays a warning.

Before, a BatchNorm model printed "off by 1.3" and then "OK: accumulation-safe", exit 0.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import gradaccum as ga
from gradaccum.cli import main


class Net(nn.Module):
    def __init__(self, use_bn: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(5, 8)
        self.bn = nn.BatchNorm1d(8)
        self.out = nn.Linear(8, 3)
        self.use_bn = use_bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.out(torch.relu(self.bn(h) if self.use_bn else h))


def ce_sum(model: nn.Module, mb: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
    x, y = mb
    return F.cross_entropy(model(x), y, reduction="sum"), y.shape[0]


def _data(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_batchnorm_off_beyond_rounding_is_an_error() -> None:
    report = ga.check(Net(), ce_sum, _data(), micro_batch_size=2)
    assert not report.ok and report.codes() == ["batchnorm"]
    finding = report.findings[0]
    assert finding.level == "error" and "'bn'" in finding.message and "off by" in finding.message
    # The bar is gradient-mismatch's own (float rounding of the parameters' dtype), and in eval
    # mode (running statistics) the loss itself accumulates exactly.
    assert report.tolerance is not None and report.gradient_rel_error is not None
    assert report.gradient_rel_error <= report.tolerance
    assert report.batchnorm_rel_error is not None and report.batchnorm_rel_error > 100 * report.tolerance
    verdict = str(report).splitlines()[-1]
    assert verdict.startswith("NOT OK: 1 error(s)") and "with BatchNorm in train mode" in verdict


def test_batchnorm_that_does_not_matter_here_is_a_warning() -> None:
    # Every micro-batch is the same rows: its batch statistics are the full batch's, so the
    # accumulated gradient matches to rounding though BatchNorm runs in train mode.
    # (Four rows each: two rows' variance is ill-conditioned, measured 1.6e-5 against the 1.2e-4 bar.)
    x, y = _data(n=4)
    same = (x.repeat(4, 1), y.repeat(4))
    report = ga.check(Net(), ce_sum, same, micro_batch_size=4)
    assert report.ok and report.codes() == ["batchnorm"] and report.findings[0].level == "warning"
    assert report.batchnorm_rel_error is not None and report.tolerance is not None
    assert report.batchnorm_rel_error <= report.tolerance
    assert "within float rounding" in report.findings[0].message


def test_a_batchnorm_layer_outside_the_forward_is_a_warning() -> None:
    model = Net(use_bn=False)
    model.bn.requires_grad_(False)  # else its weights are (rightly) unused-parameters too
    report = ga.check(model, ce_sum, _data(), micro_batch_size=2)
    assert report.ok and report.codes() == ["batchnorm"] and report.findings[0].level == "warning"
    assert report.batchnorm_rel_error is not None and report.tolerance is not None
    assert report.batchnorm_rel_error <= report.tolerance


def test_float64_batchnorm_is_held_to_float64_rounding() -> None:
    report = ga.check(Net().double(), ce_sum, tuple(t.double() if t.is_floating_point() else t
                                                  for t in _data()), micro_batch_size=4)
    assert not report.ok and report.tolerance is not None and report.tolerance < 1e-12


USER_CODE = '''
import torch
import torch.nn.functional as F

def bn_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                                torch.nn.Linear(8, 3))
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g))
    return model, lambda m, b: (F.cross_entropy(m(b[0]), b[1], reduction="sum"), b[1].shape[0]), batch
'''


def test_gradaccum_check_exits_1_on_a_batchnorm_model(tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "user_bn.py"
    path.write_text(textwrap.dedent(USER_CODE))
    assert main(["check", f"{path}:bn_model"]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("error: batchnorm:") and "off by" in out[0]
    assert out[-1].startswith("NOT OK") and not any(line.startswith("OK") for line in out)

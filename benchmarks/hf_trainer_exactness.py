"""HF Trainer comparison, exactness: the applied-gradient and logged-loss error of every step,
per contender, against a float64 full-batch reference at the same parameters.

Part of hf_trainer_peer.py, which runs it in float64 and in float32.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from hf_trainer_contenders import PREPARE, Config, quiet, run_alone
from hf_trainer_setup import Setup


def exactness(setup: Setup, cfg: Config, dtype: torch.dtype) -> dict[str, Any]:
    """Applied-gradient and logged-loss error of every step, per contender, no clipping."""
    cfg = Config(cfg.micro, cfg.k, cfg.steps, cfg.lr, cfg.weight_decay, None, cfg.seed)
    out: dict[str, Any] = {}
    for name, prepare in PREPARE.items():
        with quiet():
            r = run_alone(prepare(setup, cfg, dtype, True))
        exact = r.probe.exact_losses
        loss_err = [abs(v - x) / abs(x) for v, x in zip(r.logged, exact, strict=False)]
        out[name] = {
            "grad_rel_err": r.probe.grad_errors,
            "grad_rel_err_max": max(r.probe.grad_errors),
            "logged_loss": r.logged,
            "exact_loss": exact,
            "logged_loss_rel_err": loss_err,
            "logged_loss_rel_err_max": max(loss_err) if len(r.logged) == len(exact) else math.inf,
            "steps_logged": len(r.logged),
            "steps_taken": len(r.probe.grad_errors),
            "tokens_per_step": r.step_tokens,
        }
    return out

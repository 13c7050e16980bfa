"""Sizes in bytes: parsing ``"8GiB"``, printing ``"12.3 MiB"``, and the default memory budget.

Private: every name here is re-exported by :mod:`gradaccum.memory`, the module to import from.
"""

from __future__ import annotations

import contextlib
import decimal
import math
import os
import re
from typing import Any

CPU_BUDGET_SHARE = 0.5
"""Share of the available RAM (``MemAvailable``) used as the default budget on CPU."""


_UNITS = {
    "": 1, "b": 1,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
}
_SIZE_RE = re.compile(r"^\s*([+-]?)\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Bytes in a size like ``"1048576"``, ``"512MiB"``, ``"1.5 GiB"`` or ``"2GB"``.

    Binary units B, KiB, MiB, GiB, TiB and decimal units KB, MB, GB, TB are accepted,
    case-insensitive, with an optional space. A fractional size is rounded down to
    whole bytes. Raises ValueError (one line) for anything else, and for sizes < 1 byte.
    """
    if isinstance(text, bool):
        raise ValueError(f"invalid size {text!r}: expected e.g. 512MiB, 2GB or 1048576")
    if isinstance(text, int):
        if text < 1:
            raise ValueError(f"invalid size {text}: must be at least 1 byte")
        return text
    if not isinstance(text, str):
        raise ValueError(f"invalid size {text!r}: expected a string such as 512MiB")
    m = _SIZE_RE.match(text)
    if m is None:
        raise ValueError(f"invalid size {text!r}: expected a number with an optional unit, e.g. 512MiB")
    sign, number, unit = m.groups()
    if unit.lower() not in _UNITS:
        raise ValueError(
            f"invalid size {text!r}: unknown unit {unit!r} (use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB)"
        )
    value = decimal.Decimal(number) * _UNITS[unit.lower()]
    if sign == "-":
        raise ValueError(f"invalid size {text!r}: must be positive")
    if unit.lower() in ("", "b") and value != value.to_integral_value():
        raise ValueError(f"invalid size {text!r}: a byte count must be a whole number")
    out = int(value)  # floor: a budget is a ceiling, never round it up
    if out < 1:
        raise ValueError(f"invalid size {text!r}: must be at least 1 byte")
    return out


def format_bytes(n: int | float, round_up: bool = False) -> str:
    """``n`` bytes as a short human-readable string: ``"512 B"``, ``"12.3 MiB"``, ``"1.5 GiB"``.

    With ``round_up`` the one decimal shown is rounded up, for "needs at least" messages.
    """
    n = float(n)
    if abs(n) < 1024:
        return f"{int(math.ceil(n) if round_up else n)} B"
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            v = n / scale
            if round_up:
                v = math.ceil(v * 10 - 1e-9) / 10
            return f"{v:.1f} {unit}"
    raise AssertionError("unreachable")


def budget_or_default(budget: int | str | None, device: Any = None) -> int:
    """A given budget (bytes, or a size like "2GiB"), else :func:`default_budget_bytes` of ``device``."""
    return parse_size(budget) if budget is not None else default_budget_bytes(device)


def default_budget_bytes(device: Any = None) -> int:
    """The memory budget used when none is given.

    - CUDA: memory this process can still use on the device: the driver's free bytes
      (``torch.cuda.mem_get_info``) plus what PyTorch's caching allocator already holds
      (``memory_reserved``), because the plan's prediction counts the model that is
      already resident there.
    - CPU (and any other device): ``CPU_BUDGET_SHARE`` = 50% of the available RAM,
      read from ``MemAvailable`` in /proc/meminfo (falling back to ``os.sysconf``), so
      that the rest of the system keeps room.
    """
    # Imported here: the command line parses sizes before it imports torch.
    import torch

    from gradaccum._livebytes import normalize_device

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = normalize_device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free + torch.cuda.memory_reserved(dev))
    return int(_available_ram_bytes() * CPU_BUDGET_SHARE)


def _available_ram_bytes() -> int:
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the kernel reports kB (= KiB)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError) as e:
        raise RuntimeError("cannot determine available RAM: pass a memory budget explicitly") from e

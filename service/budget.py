"""More models than memory: the memory budget of one device and its least-recently-used policy.

A model's size is its files on disk once downloaded (``files_size``): known before its runtime loads
it, so a model that does not fit is never loaded, and the same on every machine. What a runtime takes
beyond its weights (ONNX Runtime's arena, torch's allocator cache, activations of a batch) is not
counted: leave that margin below the device's memory when choosing the budget. The budget holds what
is charged to each model, loaded or loading; ``plan`` picks which idle models to unload for a new one,
least recently used first. Pure bookkeeping: ``lifecycle.ModelSet`` does the loading and unloading.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from pathlib import Path

from service.errors import OverBudget


def files_size(root: Path) -> int:
    """Bytes of the regular files under ``root`` (or of ``root`` itself when it is a file); links are
    not followed."""
    if root.is_file():
        return root.stat().st_size
    total = 0
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            if not path.is_symlink():
                total += path.stat().st_size
    return total


def human(size: int) -> str:
    """``1,234,567 bytes (1.2 MiB)``: exact, and readable."""
    value, unit = float(size), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{size:,} bytes ({value:.1f} {unit})" if unit != "B" else f"{size:,} bytes"


class MemoryBudget:
    """Bytes charged to each model against ``limit`` (``None``: no budget), and when each was last used."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self._charged: dict[str, int] = {}
        self._used_at: dict[str, int] = {}
        self._clock = 0

    @property
    def enabled(self) -> bool:
        return self.limit is not None

    @property
    def used(self) -> int:
        return sum(self._charged.values())

    def charged(self, name: str) -> int:
        return self._charged.get(name, 0)

    def charges(self) -> Mapping[str, int]:
        return dict(self._charged)

    def touch(self, name: str) -> None:
        """``name`` was just used: it becomes the most recently used."""
        self._clock += 1
        self._used_at[name] = self._clock

    def charge(self, name: str, size: int) -> None:
        """``name`` takes ``size`` bytes from now on (in place of what it took before)."""
        self._charged[name] = size
        self._used_at.setdefault(name, 0)

    def release(self, name: str) -> int:
        """``name`` takes nothing any more; returns what it took."""
        return self._charged.pop(name, 0)

    def forget(self, name: str) -> None:
        """``name`` is no longer served at all."""
        self._charged.pop(name, None)
        self._used_at.pop(name, None)

    def plan(self, name: str, size: int, idle: Collection[str]) -> list[str]:
        """The models to unload, least recently used first, so that ``name`` fits at ``size`` bytes
        (replacing what it takes now); only models in ``idle`` may be chosen. ``OverBudget`` saying why
        when even unloading all of them would not make room."""
        if self.limit is None:
            return []
        limit = self.limit
        if size > limit:
            raise OverBudget(
                f"model {name!r} needs {human(size)}, more than the whole memory budget of "
                f"{human(limit)} (FERRY_MEMORY__BUDGET_BYTES)",
                model=name, size_bytes=size, budget_bytes=limit,
            )  # fmt: skip
        others = {n: b for n, b in self._charged.items() if n != name}
        excess = sum(others.values()) + size - limit
        victims: list[str] = []
        for candidate in sorted((n for n in idle if n in others), key=lambda n: self._used_at.get(n, 0)):
            if excess <= 0:
                break
            victims.append(candidate)
            excess -= others[candidate]
        if excess > 0:
            busy = ", ".join(f"{n} {human(b)}" for n, b in sorted(others.items()) if n not in victims)
            free = limit - sum(others.values())
            raise OverBudget(
                f"model {name!r} needs {human(size)} but {human(max(free, 0))} of the memory budget of "
                f"{human(limit)} (FERRY_MEMORY__BUDGET_BYTES) is free, and unloading every idle model "
                f"would not make room: in use or loading: {busy}; retry when they are idle",
                model=name, size_bytes=size, budget_bytes=limit,
            )  # fmt: skip
        return victims

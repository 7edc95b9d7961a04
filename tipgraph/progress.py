"""Progress bars for the CLI's long commands (simulate, export; tune has its own)."""

from __future__ import annotations

from tqdm import tqdm


def progress_bar(total: int | None, unit: str, *, enabled: bool = True) -> tqdm:
    """A bar on stderr; off with ``enabled=False`` and whenever stderr is not a terminal, so
    logs and pipes get the plain lines only."""
    # disable=None is tqdm's "only on a TTY".
    return tqdm(total=total, unit=f" {unit}", disable=None if enabled else True, leave=False)

"""Progress bars for moec's long loops (calibration runs, per-unit error measurements, GPTQ rounding).

A bar is transient and drawn on rich's global console, so it shows below a spinner the ``moec`` CLI has
running there instead of taking turns with it on one line; off a terminal it draws nothing (in a log a bar
is noise: a blank line).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

Item = TypeVar("Item")


def progress_bar(items: Sequence[Item], label: str, show: bool = True) -> Iterator[Item]:
    """``items``, one at a time, with a bar named ``label`` that advances after each (when ``show``)."""
    if not show:
        yield from items
        return
    import rich
    from rich.progress import Progress

    console = rich.get_console()
    with Progress(console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(label, total=len(items))
        for item in items:
            yield item
            bar.advance(task)

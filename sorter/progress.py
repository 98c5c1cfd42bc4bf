"""Progress bars for long work (training, data generation, benchmarks), on stderr.

stdout is kept for results and JSON logs, so a pipe such as ``sorter evaluate --json | jq`` works
while a person at a terminal still sees the bars.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

_console = Console(stderr=True)


def make_progress(transient: bool = False) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=_console,
        transient=transient,
    )


@contextlib.contextmanager
def progress_bar(total: int, description: str) -> Iterator[callable]:
    """``with progress_bar(n, "decoding") as advance: ... advance()``"""
    with make_progress() as progress:
        task = progress.add_task(description, total=total, info="")
        yield lambda n=1: progress.advance(task, n)

"""Progress bars and output lines shared by the commands (tqdm on stderr, hidden when it is not a terminal)."""

from __future__ import annotations

from typing import Any, List

from medautolabel.text import printable


def bar(desc: str):
    """A tqdm bar over 0..100 % (hidden when stderr is not a terminal)."""
    from tqdm import tqdm

    return tqdm(total=100, desc=desc, unit="%", leave=False, disable=None,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")


class CaseBars:
    """Progress of one case after another, created lazily so that an early error prints nothing else."""

    def __init__(self, names: List[str], quiet: bool) -> None:
        self.names, self.quiet = names, quiet
        self.bar: Any = None
        self.index = -1

    def __call__(self, index: int, count: int, fraction: float, stage: str) -> None:
        if self.quiet:
            return
        if index != self.index:
            self.close()
            self.index = index
            self.bar = bar(f"[{index + 1}/{count}] {self.names[index]}")
        self.bar.n = round(100 * fraction)
        self.bar.set_postfix_str(stage, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def say(line: str) -> None:
    """Print one line of output that quotes untrusted text (card names, labels, file names) inertly."""
    print(printable(line))


def fraction_bar(desc: str, quiet: bool):
    """(progress(fraction, stage) callback, close) for one long step; silent when ``quiet``."""
    shown = None if quiet else bar(desc)

    def progress(fraction: float, stage: str) -> None:
        if shown is not None:
            shown.n = round(100 * fraction)
            shown.set_postfix_str(stage, refresh=False)
            shown.refresh()

    return progress, (shown.close if shown is not None else (lambda: None))

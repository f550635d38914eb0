"""The progress bar that generation and the trainer share.

tqdm draws it where installed (an optional dependency); otherwise one plain line on stderr is
redrawn in place. Disabled, it prints nothing at all, so callers never branch on `enabled`.
"""
from __future__ import annotations

import sys
from typing import Callable


class Progress:
    """`total` units of work, `initial` of them already done (a resumed run).

    update(k, postfix) marks k more units done and shows `postfix` (a loss, say) after the count;
    close() ends the line. `unit` names one unit of work ("prompt", "step").
    """

    _WIDTH = 30  # characters in the plain bar

    def __init__(self, total: int, *, enabled: bool = True, initial: int = 0, desc: str = "",
                 unit: str = "it", leave: bool = True):
        self.total, self.done, self.desc, self.unit = total, initial, desc, unit
        self.postfix = ""
        self._tqdm = None
        self._plain = False
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            self._plain = True
            self._draw()
            return
        self._tqdm = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave,
                          dynamic_ncols=True, file=sys.stderr)

    def update(self, k: int = 1, postfix: str | None = None) -> None:
        self.done += k
        if postfix is not None:
            self.postfix = postfix
        if self._tqdm is not None:
            if postfix is not None:
                self._tqdm.set_postfix_str(postfix, refresh=False)
            self._tqdm.update(k)
        elif self._plain:
            self._draw()

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
        elif self._plain:
            sys.stderr.write("\n")
            sys.stderr.flush()
        self._tqdm, self._plain = None, False  # a second close prints nothing

    def _draw(self) -> None:
        filled = self._WIDTH * min(self.done, self.total) // max(self.total, 1)
        postfix = f" {self.postfix}" if self.postfix else ""
        sys.stderr.write(f"\r{self.desc} [{'#' * filled}{'.' * (self._WIDTH - filled)}] "
                         f"{self.done}/{self.total} {self.unit}s{postfix}")
        sys.stderr.flush()


def step_progress(total: int, done: int, label: str, enabled: bool) -> Callable[[str | None], None]:
    """The trainer's form of the bar, one optimizer step at a time: advance(text) marks a step
    done and shows `text`; advance(None) closes the bar."""
    bar = Progress(total, enabled=enabled, initial=done, desc=label, unit="step", leave=False)

    def advance(text: str | None) -> None:
        if text is None:
            bar.close()
        else:
            bar.update(1, postfix=text)

    return advance

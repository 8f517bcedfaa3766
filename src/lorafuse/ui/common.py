"""What the tabs share: running a quick CLI command in the page's process, and small formatting helpers.

Quick commands (inspect, convert, merge, resize, `train --dry-run`, `world dataset`) run in the page's helper
process (`helper.py`) through `lorafuse.cli.main.main`, exactly as typed in a terminal; long ones go to the job
queue (`jobs.py`).
Either way the page shows the CLI's own output and its one-line error.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from lorafuse.errors import UserInputError


@dataclass(frozen=True)
class CliResult:
    argv: list[str]
    code: int
    out: str
    error: str  # the CLI's one-line error ("lorafuse inspect: error: ..."), "" on success

    @property
    def ok(self) -> bool:
        return self.code == 0

    @property
    def command(self) -> str:
        return "lorafuse " + shlex.join(self.argv)

    def markdown(self) -> str:
        shown = f"`{self.command}`"
        if not self.ok:
            return f"{shown}\n\n{error_md(self.error or 'failed')}"
        return shown


def run_cli(argv: list[str], cwd: Path) -> CliResult:
    """`lorafuse ARGV` with `cwd` as working folder, run in the page's helper process (which has torch loaded,
    so the page's own process need not): its stdout and its one-line error."""
    from lorafuse.ui import tasks
    from lorafuse.ui.helper import HELPER

    argv = [str(a) for a in argv]
    try:
        code, out, err = HELPER.call(tasks.run_cli, argv, str(cwd))
    except (UserInputError, RuntimeError) as e:  # the helper died or hit a bug: one line, as the CLI would say it
        return CliResult(argv, 1, "", f"lorafuse {argv[0]}: error: {e}")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    error = next((ln for ln in reversed(lines) if ": error:" in ln), lines[-1] if lines else "")
    return CliResult(argv, code, out, error if code else "")


def error_md(text: object) -> str:
    """An error line for a Markdown component: bold, HTML-escaped (a message quoting '<c>', '<s>' or a file
    name in angle brackets would otherwise be read as a tag and vanish)."""
    import html

    line = str(text)
    return f"**{html.escape(line if line.startswith(('error', 'lorafuse')) else 'error: ' + line)}**"


def split_list(text: str, kind: type = str) -> list:
    """'0, 0.5 1' -> [0.0, 0.5, 1.0]: the page's list fields take commas or spaces."""
    items = [t for t in text.replace(",", " ").split() if t]
    try:
        return [kind(t) for t in items]
    except ValueError:
        raise UserInputError(f"{text!r}: expected a list of {kind.__name__} values, e.g. 0.5, 1") from None


def number(value: object, label: str, *, kind: type = int, minimum: float | None = None,
           maximum: float | None = None) -> int | float:  # fmt: skip
    """A gr.Number's value as `kind`, checked: a cleared field arrives as None, and int(None) would end the click
    in gradio's own "Error" popup instead of this one line naming the field."""
    import math

    if value is None or (isinstance(value, str) and not value.strip()):
        raise UserInputError(f"{label}: give a number")
    try:
        got = float(value)
    except (TypeError, ValueError):
        raise UserInputError(f"{label}: expected a number, got {value!r}") from None
    if not math.isfinite(got) or (kind is int and not got.is_integer()):
        raise UserInputError(f"{label}: expected {'a whole number' if kind is int else 'a finite number'}, got {value!r}")
    if minimum is not None and got < minimum:
        raise UserInputError(f"{label}: must be at least {minimum:g}, got {got:g}")
    if maximum is not None and got > maximum:
        raise UserInputError(f"{label}: must be at most {maximum:g}, got {got:g}")
    return int(got) if kind is int else got


def choices_or(values: list[str], value: str | None = None) -> dict:
    """gr.update(...) kwargs for a dropdown: new choices, keeping the current value if it is still there."""
    import gradio as gr

    keep = value if value in values else (values[0] if values else None)
    return gr.update(choices=values, value=keep)


def grid_pages(pages: list[str], shown: list[str] | None):
    """A grid-page gallery's update from a timer tick: the pages opened at the first in the large preview, since a
    wide grid page in gallery's square thumbnail shows only its blank margin and caption; and nothing sent while
    the pages are the ones already shown, so the tick neither flickers nor undoes the page the user chose."""
    import gradio as gr

    if pages == shown:
        return gr.skip()
    return gr.Gallery(value=pages, selected_index=0 if pages else None)

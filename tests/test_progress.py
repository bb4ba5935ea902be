"""Progress lines appear on a terminal and nowhere else."""

from __future__ import annotations

import io

from cfsdeploy.util.progress import Progress, human_bytes


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_silent_when_not_a_terminal() -> None:
    out = io.StringIO()
    bar = Progress("scan", out)
    bar.update("1 entry", force=True)
    bar.done("done")
    assert out.getvalue() == ""


def test_progress_rewrites_one_line_on_a_terminal() -> None:
    out = Tty()
    bar = Progress("scan", out, interval=0)
    bar.update("10 entries")
    bar.update("2 entries")
    bar.done("finished")
    text = out.getvalue()
    assert text.startswith("\rscan: 10 entries") and text.endswith("\n")
    assert text.rstrip().endswith("\rscan: finished")
    assert "\rscan: 2 entries " in text  # padded over the longer line before it


def test_human_bytes() -> None:
    assert (human_bytes(5), human_bytes(2048), human_bytes(3 << 30)) == ("5 B", "2.0 KiB", "3.0 GiB")

"""relayctl's progress bar and summary line."""

from __future__ import annotations

import io

import pytest

from relayd.ctl.progress import (
    BAR_CELLS,
    Progress,
    format_bytes,
    render_bar,
    render_summary,
)


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (3 * 2**20, "3.0 MiB"),
        (5 * 2**40, "5.0 TiB"),
    ],
)
def test_format_bytes(count: int, text: str) -> None:
    assert format_bytes(count) == text


def test_render_bar_half_way() -> None:
    line = render_bar(2**20, 2**21, 2.0)
    half = BAR_CELLS // 2
    assert line.startswith("[" + "#" * half + "-" * (BAR_CELLS - half) + "]")
    assert " 50.0%" in line
    assert "1.0 MiB / 2.0 MiB" in line
    assert line.endswith("512.0 KiB/s")


def test_render_bar_ends_full_and_survives_empty_files_and_no_time() -> None:
    assert render_bar(10, 10, 1.0).startswith("[" + "#" * BAR_CELLS + "]")
    assert "100.0%" in render_bar(0, 0, 0.0)
    assert render_bar(0, 100, 0.0).endswith("0 B/s")


def test_progress_redraws_at_most_every_tenth_of_a_second() -> None:
    now = [0.0]
    stream = io.StringIO()
    progress = Progress(1000, stream, clock=lambda: now[0], interactive=True)
    progress.update(100)
    progress.update(200)  # same instant: skipped
    now[0] = 0.2
    progress.update(300)
    progress.update(1000)  # the end is always drawn
    progress.finish()
    text = stream.getvalue()
    assert text.count("\r") == 4  # 100, 300, 1000, final
    assert " 30.0%" in text and " 20.0%" not in text
    assert text.endswith("\n")


def test_progress_end_line_leaves_a_half_drawn_bar_on_its_own_line() -> None:
    stream = io.StringIO()
    progress = Progress(1000, stream, clock=lambda: 0.0, interactive=True)
    progress.end_line()
    assert stream.getvalue() == ""  # nothing drawn, nothing to end
    progress.update(300)
    progress.end_line()
    progress.end_line()
    assert stream.getvalue() == "\r" + render_bar(300, 1000, 0.0) + "\n"


def test_progress_finish_ends_the_line_once() -> None:
    stream = io.StringIO()
    progress = Progress(10, stream, clock=lambda: 0.0, interactive=True)
    progress.update(10)
    progress.finish()
    progress.end_line()
    assert stream.getvalue().count("\n") == 1


def test_progress_off_a_terminal_writes_one_summary_line() -> None:
    now = [0.0]
    stream = io.StringIO()
    progress = Progress(2048, stream, clock=lambda: now[0], interactive=False)
    progress.update(1024)
    now[0] = 2.0
    progress.update(2048)
    progress.finish()
    assert stream.getvalue() == render_summary(2048, 2.0) + "\n"
    assert stream.getvalue() == "sent 2048 bytes (2.0 KiB) in 2.00 s, 1.0 KiB/s\n"

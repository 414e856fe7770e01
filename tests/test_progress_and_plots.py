"""Progress of long work (a bar on a terminal, lines in a log, nothing when off) and the PNG pictures of a run."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import pytest

from peft_backattn.workbench import plots
from peft_backattn.workbench.progress import Progress, is_terminal


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_tqdm_bar_with_count_rate_and_figures():
    stderr, stdout = Terminal(), io.StringIO()
    with Progress(4, "generating", unit="problem", stderr=stderr, stdout=stdout) as progress:
        for _ in range(4):
            progress.update(1, tokens_per_s=12.5)
    bar = stderr.getvalue()
    assert "generating" in bar and "4/4" in bar and "tokens/s 12.5" in bar
    assert stdout.getvalue() == ""


def test_a_log_gets_plain_lines_with_the_time_left_and_no_carriage_returns():
    stderr, stdout = io.StringIO(), io.StringIO()
    with Progress(3, "perplexity", stderr=stderr, stdout=stdout, interval=0) as progress:
        progress.update(1)
        progress.update(1)
        progress.update(1)
    lines = stdout.getvalue().splitlines()
    assert stderr.getvalue() == ""
    assert [line.split(" in ")[0].strip() for line in lines] == [
        "perplexity: 1/3 batches",
        "perplexity: 2/3 batches",
        "perplexity: 3/3 batches",
    ]
    assert "s left" in lines[0] and "s left" not in lines[-1]
    assert "\r" not in stdout.getvalue()


def test_work_that_ends_within_the_interval_stays_quiet_in_a_log():
    stdout = io.StringIO()
    with Progress(50, "perplexity", stderr=io.StringIO(), stdout=stdout, interval=3600) as progress:
        for _ in range(50):
            progress.update(1)
    assert stdout.getvalue() == ""


def test_the_default_interval_is_read_when_the_progress_starts(monkeypatch):
    monkeypatch.setattr("peft_backattn.workbench.progress.LINE_INTERVAL_SECONDS", 0)
    stdout = io.StringIO()
    with Progress(2, "generating", unit="problem", stderr=io.StringIO(), stdout=stdout) as progress:
        progress.update(1)
        progress.update(1)
    assert "generating: 1/2 problems" in stdout.getvalue() and "generating: 2/2 problems" in stdout.getvalue()


@pytest.mark.parametrize("stderr", [Terminal(), io.StringIO()], ids=["terminal", "log"])
def test_no_progress_shows_nothing(stderr):
    stdout = io.StringIO()
    with Progress(3, "perplexity", enabled=False, stderr=stderr, stdout=stdout, interval=0) as progress:
        for _ in range(3):
            progress.update(1)
    assert stderr.getvalue() == "" and stdout.getvalue() == ""


def test_a_stream_without_isatty_or_none_is_no_terminal(monkeypatch):
    """`is_terminal` is the one test of bars (the Trainer's included): a stand-in stream, or none, draws none."""
    assert is_terminal(Terminal()) and not is_terminal(io.StringIO())
    monkeypatch.setattr("sys.stderr", None)  # pythonw
    assert not is_terminal()
    monkeypatch.setattr("sys.stderr", object())  # a stand-in without isatty
    stdout = io.StringIO()
    with Progress(2, "perplexity", stdout=stdout, interval=0) as progress:
        progress.update(1)
        progress.update(1)
    assert progress.mode == "lines" and "perplexity: 2/2 batches" in stdout.getvalue()


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's header, after checking its signature and the header chunk's CRC."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR"
    header = data[16 : 16 + length]
    (crc,) = struct.unpack(">I", data[16 + length : 20 + length])
    assert zlib.crc32(kind + header) == crc
    assert data.endswith(b"IEND\xaeB`\x82"), f"{path} is truncated"
    return struct.unpack(">II", header[:8])


needs_matplotlib = pytest.mark.skipif(not plots.plots_available(), reason="matplotlib (the plots extra) is absent")


@needs_matplotlib
def test_loss_curve_is_a_valid_png(tmp_path):
    path = plots.plot_loss_curve([2.5, 2.1, 1.9, 1.7], tmp_path / "loss.png", steps=[1, 2, 3, 4])
    width, height = png_size(path)
    assert (width, height) == (720, 432)  # 6 x 3.6 inches at 120 dpi
    assert not list(tmp_path.glob(".*partial"))


@needs_matplotlib
def test_comparison_is_a_valid_png_and_skips_missing_metrics(tmp_path):
    results = {
        "base": {"perplexity": 3.9, "exact_match": 0.1, "rmse": None, "f1": 0.4},
        "math": {"perplexity": 3.1, "exact_match": 0.2, "rmse": float("nan"), "f1": 0.5},
    }
    width, height = png_size(plots.plot_comparison(results, tmp_path / "nested" / "metrics.png"))
    assert width > height > 0


def test_without_matplotlib_the_plots_say_how_to_get_them(monkeypatch, tmp_path):
    monkeypatch.setattr(plots, "Figure", None)
    assert not plots.plots_available()
    with pytest.raises(RuntimeError, match=r'pip install "peft-backattn\[plots\]"'):
        plots.plot_loss_curve([1.0], tmp_path / "loss.png")
    assert not (tmp_path / "loss.png").exists()

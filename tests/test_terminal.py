"""What a person sees: progress bars only on a terminal and never on a log line's line, each result once,
no INFO chatter without -v, --help with groups, defaults and examples (sdrt/progress.py, sdrt/cli_help.py)."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
import time
from collections import Counter

import pytest

from sdrt.cli import build_parser

SDRT = [sys.executable, "-m", "sdrt.cli"]
BAR_FRAGMENTS = ("\r", "%|", "it/s", "component/s", "engine/s", "step/s", "\u2588", "\x1b[")
LOG_LINE = re.compile(r"^(DEBUG|INFO|WARNING|ERROR) [\w.]+: ")


def run_piped(*args: str) -> tuple[str, str]:
    """Run sdrt with stdout and stderr on pipes (as in CI logs); return both."""
    proc = subprocess.run([*SDRT, *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, proc.stderr


def assert_clean(stdout: str, stderr: str) -> list[str]:
    """No progress-bar fragment and no line printed twice; return the non-empty lines."""
    text = stdout + stderr
    for fragment in BAR_FRAGMENTS:
        assert fragment not in text, f"{fragment!r} in output:\n{text}"
    lines = [line for line in text.splitlines() if line.strip()]
    twice = [line for line, n in Counter(lines).items() if n > 1]
    assert not twice, f"printed more than once: {twice}\n{text}"
    return lines


@pytest.mark.slow
def test_demo_like_runs_print_no_bars_and_nothing_twice(tmp_path):
    """make demo's four commands with their output captured (no terminal): no bar fragments, no duplicate
    lines, no INFO chatter by default, and each command's result sentence on stdout."""
    model, engines = tmp_path / "model", tmp_path / "engines"
    out, err = run_piped("make-model", str(model), "--arch", "tiny", "--seed", "0")
    assert_clean(out, err)
    assert out.strip() == f"wrote a random-weight tiny model (seed 0) to {model}" and not err

    out, err = run_piped("export", "--model", str(model), "--out", str(engines), "--min-size", "64",
                         "--max-size", "128", "--max-batch", "1")
    assert_clean(out, err)
    assert re.fullmatch(rf"exported {re.escape(str(model))} to {re.escape(str(engines))} in [\d.]+ s\n", out)
    assert not LOG_LINE.search(err), err  # per-component INFO lines only with -v

    out, err = run_piped("build-engines", "--model", str(model), "--out", str(engines), "--backend", "ort-cpu")
    assert_clean(out, err)
    assert out.startswith("built 4 ort-cpu engine(s) (text_encoder, unet, vae_decoder, vae_encoder)"), out
    assert not LOG_LINE.search(err), err

    # -v shows the library's INFO lines, and the result is still printed once (not logged as well)
    out, err = run_piped("-v", "build-engines", "--model", str(model), "--out", str(engines), "--backend", "ort-cpu",
                         "--force")
    lines = assert_clean(out, err)
    assert sum("built ort-cpu engine in" in line for line in err.splitlines()) == 4, err
    assert sum(line.startswith("built 4 ") for line in lines) == 1

    png = tmp_path / "cat.png"
    out, err = run_piped("txt2img", "--engines", str(engines), "--prompt", "a photo of a cat", "--steps", "3",
                         "--seed", "42", "--width", "64", "--height", "64", "--out", str(png))
    lines = assert_clean(out, err)
    assert lines[0] == f"saved {png} (seed 42)" and png.is_file() and not err


def render(raw: str) -> list[str]:
    """What a terminal shows for ``raw``: each ``\\r`` returns to column 0 and overwrites (escape
    sequences dropped)."""
    raw = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw)
    shown = []
    for line in raw.split("\n"):
        screen = ""
        for segment in line.split("\r"):
            screen = segment + screen[len(segment):]
        shown.append(screen.rstrip())
    return [line for line in shown if line]


def run_on_terminal(*args: str, timeout: float = 300) -> tuple[int, str]:
    """Run sdrt with stdout and stderr on a pseudo-terminal (160 columns); return its exit code and output."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    env = {**os.environ, "COLUMNS": "160", "TERM": "xterm"}
    proc = subprocess.Popen([*SDRT, *args], stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return proc.wait(timeout=30), b"".join(chunks).decode(errors="replace")


def test_bar_and_log_lines_never_share_a_line_on_a_terminal(tiny_model_dir, tiny_engine_dir, tmp_path):
    """On a terminal the bar is drawn, and with -v every INFO line logged while it is open starts its own
    line and carries no bar residue (before logging went through tqdm they shared one)."""
    engines = tmp_path / "engines"
    shutil.copytree(tiny_engine_dir, engines)
    code, raw = run_on_terminal("-v", "build-engines", "--model", str(tiny_model_dir), "--out", str(engines),
                                "--backend", "ort-cpu")
    assert code == 0, raw
    assert "build ort-cpu:" in raw and "%|" in raw, f"no bar drawn on the terminal:\n{raw!r}"
    shown = render(raw)
    built = [line for line in shown if "built ort-cpu engine in" in line]
    assert len(built) == 4, shown
    for line in shown:
        if LOG_LINE.search(line) or "built ort-cpu engine" in line:
            assert LOG_LINE.match(line), f"log line does not start its line: {line!r}"
            assert not any(f in line for f in ("%|", "engine/s", "it/s", "\u2588")), f"bar residue: {line!r}"
    assert re.fullmatch(r"INFO sdrt_export\.build_engines: \w+: built ort-cpu engine in [\d.]+ s \([\d.]+ MB\)",
                        built[0])
    assert shown[-1].startswith("built 4 "), shown  # the result, on its own line; the bar is gone
    assert not any("%|" in line for line in shown), "a bar was left on the screen"


def test_json_on_a_terminal_has_no_bar(tiny_engine_dir, tmp_path):
    code, raw = run_on_terminal("txt2img", "--engines", str(tiny_engine_dir), "--prompt", "a cat", "--steps", "2",
                                "--seed", "1", "--width", "64", "--height", "64", "--json",
                                "--out", str(tmp_path / "cat.png"))
    assert code == 0, raw
    assert "%|" not in raw and "\r" not in raw.replace("\r\n", "\n"), raw
    assert json.loads(raw.replace("\r\n", "\n"))["seed"] == 1


LONG = ("export", "build-engines", "txt2img", "img2img", "inpaint", "verify", "bench", "info", "make-model")


@pytest.mark.parametrize("command", LONG)
def test_help_has_groups_defaults_and_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "\nexamples:\n  sdrt " + command in text, text
    assert "-v, --verbose" in text
    if command not in ("info", "make-model"):
        assert text.count(":\n  --") >= 2, f"no argument groups:\n{text}"  # e.g. "input and output:"
    expected = {"txt2img": "(default: 30)", "export": "(default: 256)", "build-engines": "(default: 3)",
                "bench": "(default: 5)", "make-model": "(default: tiny)", "verify": "(default: 4)"}
    if command in expected:
        assert expected[command] in text
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: )" not in text


def test_top_level_help_lists_every_command(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = capsys.readouterr().out
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name in commands:
        assert f"\n    {name}" in text
    assert "--version" in text and "examples:" in text


def test_verbose_after_the_command_name():
    args = build_parser().parse_args(["info", "x", "-vv"])
    assert args.verbose == 2
    assert build_parser().parse_args(["-v", "info", "x"]).verbose == 1
    assert build_parser().parse_args(["info", "x"]).verbose == 0

"""Command-line edges of ``sdrt`` and ``sdrt serve``: --threads is capped with a one-line error (exit 2) before
anything loads, and output into a pipe whose reader has gone ends quietly (exit 141, as SIGPIPE; no traceback)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SDRT = [sys.executable, "-m", "sdrt.cli"]


def run(*args, **kwargs):
    return subprocess.run([*SDRT, *map(str, args)], capture_output=True, text=True, timeout=300, **kwargs)


@pytest.mark.parametrize("command", [["serve", "--engines", "{e}"], ["txt2img", "--engines", "{e}", "--prompt", "x",
                                                                     "--out", "{o}"]])
@pytest.mark.parametrize("threads", [0, -2, 100000])
def test_threads_out_of_range_is_one_line_exit_2(tiny_engine_dir, tmp_path, command, threads):
    args = [a.format(e=tiny_engine_dir, o=tmp_path / "x.png") for a in command]
    proc = run(*args, "--threads", threads)
    assert proc.returncode == 2 and proc.stdout == "", proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"--threads must be an integer in 1..{os.cpu_count()}" in lines[0], lines
    assert str(threads) in lines[0] and not (tmp_path / "x.png").exists()


def test_ray_app_builder_takes_threads_beyond_this_machine():
    """``serve run sdrt.serve.ray_app:app_builder`` on a cluster: replicas may have more CPUs than the head."""
    import argparse

    from sdrt.errors import InputError
    from sdrt.serve.cli import options_from_args

    ns = argparse.Namespace(threads=(os.cpu_count() or 1) + 8, ray=True, api_auth=None, token_file=None,
                            host="127.0.0.1", max_queue=16, max_steps=150, replicas=1, job_ttl=600.0,
                            drain_timeout=30.0, lora_dir=None)
    assert options_from_args(ns).max_queue == 16
    with pytest.raises(InputError, match="--threads must be an integer >= 1"):
        options_from_args(argparse.Namespace(**{**vars(ns), "threads": 0}))
    with pytest.raises(InputError, match=r"--threads must be an integer in 1\.\."):
        options_from_args(argparse.Namespace(**{**vars(ns), "ray": False}))


def test_json_into_a_closed_pipe_exits_quietly(tiny_engine_dir):
    """`sdrt info DIR --json | head -0`: the reader is gone before sdrt writes; no BrokenPipeError traceback."""
    read, write = os.pipe()
    os.close(read)  # no reader left: sdrt's first write gets EPIPE
    try:
        proc = subprocess.run([*SDRT, "info", str(tiny_engine_dir), "--json"], stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=300)
    finally:
        os.close(write)
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr
    ok = run("info", tiny_engine_dir, "--json")  # and into a reader that stays: the whole JSON, exit 0
    assert ok.returncode == 0 and ok.stdout.lstrip().startswith("{") and ok.stderr == ""

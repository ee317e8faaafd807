"""Bad input to the CLI: one line naming the value and the fix, status 2, no change."""

import os
import subprocess
import sys

import pytest


def cli(*args: str, state: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the CLI; with ``state``, on a state folder of the test's own."""
    env = {**os.environ, "SANDBOX_KERNEL_STATE_DIR": state} if state else None
    return subprocess.run(
        [sys.executable, "-m", "sandbox_kernel.cli", *args],
        capture_output=True, text=True, check=False, timeout=60, env=env,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["install", "--name", "k", "--memory", "lots"],
         "memory limit 'lots' is not a size; use a number with K, M or G, e.g. 2G"),
        (["install", "--name", "k", "--cpus", "0"], "cpu limit '0' must be at least 0.01 cores"),
        (["install", "--name", "k", "--pids", "x"], "pids limit 'x' is not a whole number"),
        (["install", "--name", "k", "--disk", "1K"], "disk size '1K' is too small"),
        (["install", "--name", "k", "--disk", "100T"],
         "disk size '100T' is larger than the volume that holds every kernel's files"),
        (["restore", "no-such-kernel", "s1"], "no sandboxed kernel with id 'no-such-kernel'"),
        (["snapshot", "no-such-kernel", "s1"], "no sandboxed kernel with id 'no-such-kernel'"),
        (["reset", "no-such-kernel"], "no sandboxed kernel with id 'no-such-kernel'"),
        (["snapshots", "--delete", "nope"], "snapshot 'nope' is not kept"),
        (["snapshots", "--delete", "nope", "--owner", "me"], "--owner 'me' is not a uid"),
        (["install", "--name", "k", "--network", "wide"], "network mode 'wide' is not known"),
        (["install", "--name", "k", "--image", "nope"], "image 'nope' does not exist"),
        (["install", "--name", "bad name!"], "kernel name 'bad name!' is not valid"),
        (["install", "--name", "k", "--bogus"], "unrecognized arguments: --bogus"),
        (["install", "--name", "k", "--pool", "9"], "pool 9 must be a whole number from 0 to 8"),
        (["install", "--name", "k", "--pool", "1", "--no-pristine"],
         "--pool 1 keeps kernels restored from the pristine base; drop --no-pristine"),
        (["install", "--name", "k", "--pool", "two"], "argument --pool: invalid int value"),
        (["install", "--name", "k", "--user", "--sys-prefix"], "not allowed with argument"),
        (["install", "--name", "k", "--base-owner", "1000"],
         "--base-owner '1000' needs --base SNAPSHOT too"),
        (["bases", "--delete", "nope"], "base 'nope' is not a base id"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)  # fmt: skip
def test_bad_input(args: list[str], message: str, tmp_path) -> None:
    done = cli(*args, state=str(tmp_path / "state"))
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert message in lines[0]

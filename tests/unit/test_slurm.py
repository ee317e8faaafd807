"""The Slurm backend's pure parts: a kernel's limits as a job's resources, and the
install flags that go with it."""

from __future__ import annotations

import pytest

from sandbox_kernel.cli import main
from sandbox_kernel.runtime import Limits
from sandbox_kernel.slurm import sbatch_args


def test_a_kernels_limits_become_its_jobs_resources() -> None:
    limits = Limits.parse(memory="1536M", cpus="1.5", pids="256", disk="2G").to_dict()
    assert sbatch_args(limits, "kernels", "physics", "8:00:00") == [
        "--no-requeue", "--cpus-per-task=2", "--mem=1536M", "--partition=kernels",
        "--account=physics", "--time=8:00:00",
    ]  # fmt: skip
    # Never requeued by Slurm: a requeue would start the kernel from scratch.
    assert sbatch_args(Limits.parse(memory="", cpus="").to_dict(), "", "", "") == ["--no-requeue"]


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--partition", "p"], "are for --backend slurm; add it or drop them"),
        (["--backend", "slurm", "--pool", "2"], "--pool and --base are not for it yet"),
        (["--backend", "batch"], "invalid choice: 'batch'"),
    ],
)
def test_slurm_flags_out_of_place_are_refused_with_the_fix(
    args: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["install", "--name", "x", "--user", *args])
    assert code == 2
    assert said in capsys.readouterr().err

"""Fixtures of the security tier: the integration tier's, plus two kernels shared by a
module's probes (started once; each test still checks it leaves nothing behind).

The server's environment holds made-up secrets while the kernels start, so a probe
can look for them inside.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from jupyter_client.kernelspec import KernelSpecManager

from tests.integration import conftest as integration
from tests.integration import leftovers

# The integration tier's fixtures, for this tier too.
spec_prefix = integration.spec_prefix
ksm = integration.ksm
make_spec = integration.make_spec
workdir = integration.workdir
kernels = integration.kernels
no_leftovers = integration.no_leftovers
names = integration.names
daemon = integration.daemon
users = integration.users

#: Made-up secrets in the server's environment (what a hub or a cloud sets).
SECRETS = {
    "JUPYTERHUB_API_TOKEN": "sk-probe-hub-token",
    "AWS_SECRET_ACCESS_KEY": "sk-probe-aws-secret",
    "SK_PROBE_SECRET": "sk-probe-plain-secret",
}


@dataclass
class Folders:
    """The probe kernels' notebook folder, and a host secret beside it."""

    root: Path

    @property
    def cwd(self) -> Path:
        return self.root / "notebooks"

    @property
    def secret_file(self) -> Path:
        return self.root / "host-secret.txt"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pair(
    tmp_path_factory: pytest.TempPathFactory, make_spec: Any, ksm: KernelSpecManager
) -> AsyncIterator[tuple[Folders, Any, Any, Any, Any]]:
    """(folders, km_a, kc_a, km_b, kc_b): two kernels of a 512 MB, 1 CPU, 128 pids,
    network=none kernelspec, started in a folder whose parent holds a host secret."""
    root = tmp_path_factory.mktemp("probes")
    probes = Folders(root)
    probes.cwd.mkdir()
    probes.secret_file.write_text("host secret\n")
    for part in [probes.cwd, *probes.cwd.parents]:
        if part == Path("/"):
            break
        part.chmod(part.stat().st_mode | 0o005)
    spec = make_spec(memory="512M", cpus="1", pids="128")
    before = leftovers.snapshot()
    pool = integration.Kernels(ksm, probes.cwd)
    saved = {k: os.environ.get(k) for k in SECRETS}
    os.environ.update(SECRETS)
    try:
        km_a, kc_a = await pool.start(spec)
        km_b, kc_b = await pool.start(spec)
    except BaseException:
        await pool.close()
        raise
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    try:
        yield probes, km_a, kc_a, km_b, kc_b
    finally:
        await pool.close()
    left = {k: v - before[k] for k, v in leftovers.snapshot().items() if v - before[k]}
    assert not left, f"the probe kernels left {left}"

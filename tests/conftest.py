from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run through Triton's interpreter (numpy on CPU); it must be switched on
# before the kernels are defined, so before anything imports mta_lab.kernels (mta_lab.model does).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from mta_lab.config import GateKind, HeadMixConfig, MTAConfig, OutNormConfig, QKConvConfig, RuntimeConfig  # noqa: E402
from mta_lab.model import Attention, plan_layers  # noqa: E402
from mta_lab.model.execution import choose_execution  # noqa: E402
from mta_lab.model.layers import rope_tables  # noqa: E402


def build_attention(
    config, layer_id: int = 0, dtype=torch.float64, runtime: RuntimeConfig | None = None, device=None
) -> Attention:
    """The attention module of one layer of ``config``, executed as ``runtime`` says on ``device``
    (default CPU), in ``dtype`` on CPU."""
    plan = plan_layers(config)[layer_id]
    execution = choose_execution(config, plan, runtime or RuntimeConfig(), device or torch.device("cpu"))
    return Attention(config, plan, execution).to(dtype)


def run_attention(layer: Attention, x_btd: torch.Tensor, rope_theta: float) -> torch.Tensor:
    cos, sin = rope_tables(x_btd.shape[1], layer.head_dim, rope_theta, x_btd.device)
    return layer(x_btd, cos, sin)


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int, scale: float = 0.5) -> None:
    """Give every parameter random values (kernels and mixing weights far from identity)."""
    generator = torch.Generator().manual_seed(seed)
    for parameter in module.parameters():
        parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * scale)


def every_stage_mta(conv: QKConvConfig, gate: GateKind = GateKind.scalar) -> MTAConfig:
    """Every MTA stage on: grouped (c_h=2) mixing before softmax, full mixing after, norm and gate."""
    return MTAConfig(
        pre_qk_conv=conv,
        pre_head_mix=HeadMixConfig(group_size=2),
        post_qk_conv=conv,
        post_head_mix=HeadMixConfig(),
        out_norm=OutNormConfig(gate=gate),
    )


class MadeTensors(TorchDispatchMode):
    """Records the shape of every tensor that an op returns, forward and backward alike."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, tuple | list) else [out]:
            if isinstance(x, torch.Tensor):
                self.shapes.append((str(func), tuple(x.shape)))
        return out


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Tokenized corpora and trained tokenizers go to a per-session cache, not the user's."""
    os.environ["MTA_LAB_CACHE"] = str(tmp_path_factory.mktemp("cache"))


def sweep_command(path: Path, *args: str) -> list[str]:
    """``mta-lab sweep PATH`` (full budget) in a fresh interpreter, its MLflow store and runs beside the file."""
    store = ["--tracking-uri", f"sqlite:///{path.parent}/mlflow.db", "--runs-dir", str(path.parent / "runs")]
    return [sys.executable, "-m", "mta_lab.cli", "sweep", str(path), "--profile", "full", *store, *args]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


PG_PASSWORD = "Pg-P4ssw0rd-fault"


@pytest.fixture(params=[False], ids=["trust"])
def postgres(request):
    """A throwaway PostgreSQL cluster on 127.0.0.1 (Debian's postgresql package); with the param True
    it asks for the password ``PG_PASSWORD`` over TCP, and the URL carries it."""
    password = request.param

    def unavailable(reason: str):
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required in CI: {reason}")
        pytest.skip(reason)

    initdb = shutil.which("initdb") or next(iter(glob.glob("/usr/lib/postgresql/*/bin/initdb")), None)
    if initdb is None:
        unavailable("no PostgreSQL server binaries (apt-get install postgresql)")
    pg_ctl = str(Path(initdb).with_name("pg_ctl"))
    base = Path(tempfile.mkdtemp(prefix="mta-lab-pg-"))  # under /tmp: the postgres user must reach it
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        if shutil.which("runuser") is None:
            unavailable("running as root without runuser")
        shutil.chown(base, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    data = base / "data"
    auth = ["-A", "trust"]
    if password:
        (base / "pw").write_text(PG_PASSWORD)
        if os.geteuid() == 0:
            shutil.chown(base / "pw", "postgres")
        auth = ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={base / 'pw'}"]
    subprocess.run(
        [*as_user, initdb, "-D", str(data), *auth, "-U", "postgres"], check=True, capture_output=True
    )
    options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1"
    subprocess.run(
        [*as_user, pg_ctl, "-D", str(data), "-o", options, "-l", str(base / "log"), "-w", "start"],
        check=True,
        capture_output=True,
    )
    try:
        user = f"postgres:{PG_PASSWORD}" if password else "postgres"
        yield f"postgresql://{user}@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)

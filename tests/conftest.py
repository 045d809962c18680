from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
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


SLURM_CONF = """\
ClusterName=mtalab
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={base}/munge/socket
CredType=cred/munge
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/slurmd.pid
SlurmctldLogFile={base}/slurmctld.log
SlurmdLogFile={base}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
KillWait=30
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=60 State=UP
"""


@pytest.fixture
def slurm_cluster():
    """A single-node Slurm cluster on 127.0.0.1 (Debian's slurm-wlm and munge), its configuration and
    state in a temporary directory; SLURM_CONF points this process and its children at it. CPU only:
    one node with this machine's cores (Debian's slurmd runs one node per host)."""

    def unavailable(reason: str):
        if os.environ.get("CI"):
            pytest.fail(f"Slurm is required in CI: {reason}")
        pytest.skip(reason)

    daemons = {
        name: shutil.which(name, path=f"/usr/sbin:{os.environ['PATH']}")
        for name in ("munged", "slurmctld", "slurmd")
    }
    missing = [name for name, path in daemons.items() if path is None]
    if missing:
        unavailable(f"no {', '.join(missing)} (apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        unavailable("a single-node Slurm is started here as root (slurmd launches the jobs)")
    import psutil

    base = Path(tempfile.mkdtemp(prefix="mta-lab-slurm-"))
    for folder in ("munge", "state", "spool"):
        (base / folder).mkdir()
    (base / "munge").chmod(0o755)
    key = base / "munge" / "key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    host = socket.gethostname().split(".")[0]
    conf = base / "slurm.conf"
    conf.write_text(
        SLURM_CONF.format(
            host=host,
            base=base,
            ctld_port=_free_port(),
            slurmd_port=_free_port(),
            cpus=os.cpu_count(),
            memory=psutil.virtual_memory().total // 2**20 // 2,
        )
    )
    environment = {**os.environ, "SLURM_CONF": str(conf)}
    munge = [f"--socket={base}/munge/socket", f"--key-file={key}", f"--pid-file={base}/munge/pid"]
    munge += [f"--log-file={base}/munge/log", f"--seed-file={base}/munge/seed", "--force"]
    started = [
        subprocess.run([daemons["munged"], *munge], capture_output=True, text=True, env=environment),
        subprocess.run([daemons["slurmctld"], "-c", "-i"], capture_output=True, text=True, env=environment),
        subprocess.run([daemons["slurmd"]], capture_output=True, text=True, env=environment),
    ]
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    try:
        problems = [f"{p.args[0]}: {p.stderr.strip()[-300:]}" for p in started if p.returncode]
        if problems:
            unavailable("; ".join(problems))
        deadline = time.time() + 60
        while (
            "idle" not in subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout
        ):
            if time.time() > deadline:
                unavailable(f"the node did not come up: {(base / 'slurmd.log').read_text()[-500:]}")
            time.sleep(0.5)
        yield base
    finally:
        subprocess.run(["scancel", "--full", "--user", "root"], capture_output=True)
        for pid_file in ("slurmd.pid", "slurmctld.pid", "munge/pid"):
            try:
                os.kill(int((base / pid_file).read_text()), signal.SIGTERM)
            except (OSError, ValueError):
                pass
        time.sleep(1)
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        shutil.rmtree(base, ignore_errors=True)

"""One run trained by several processes (DDP, ``runtime.devices``), of which rank 0 owns the run.

Rank 0 is the process that called :func:`mta_lab.train.run.fit_run`: it records the run in MLflow, writes
the run's files and checkpoints, and starts ranks 1..n-1. Lightning would start them by running rank 0's
command line again, which trains this run only when that command is ``mta-lab train`` (a sweep's
launcher pretrains in its own process; a test runs under pytest); so ranks > 0 run
``python -m mta_lab.train.ddp_rank`` instead, and learn which run they train from the environment
(:data:`RUN_ENV`: the run id, its directory and the checkpoint rank 0 resumes from). They read the
config from the run directory and record nothing.

Stopping: a rank dies with rank 0 (PR_SET_PDEATHSIG, so a SIGKILLed rank 0 leaves no rank waiting in a
collective), rank 0 kills them when it stops (they hold nothing the run needs), and rank 0 stops when
one of them fails. Lightning's own watcher of the ranks would SIGKILL rank 0 instead, before it records
how the run ended.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.fabric.utilities.distributed import _set_num_threads_if_needed
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

from mta_lab.infra.processes import die_with_parent

logger = logging.getLogger(__name__)

RUN_ENV = "MTA_LAB_DDP_RUN"
"""JSON of :class:`SharedRun`, set by rank 0 for the ranks it starts."""
RANK_COMMAND = (sys.executable, "-m", "mta_lab.train.ddp_rank")
LAUNCH_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""What Lightning's launcher sets in rank 0's environment (and reads there: a ``LOCAL_RANK`` left from
an earlier run would make the next one wait for ranks nobody starts)."""
POLL_S = 0.5
FINISH_WAIT_S = 60.0
"""How long a finished rank 0 waits for the others to exit (they only return) before killing them."""
STOP_GRACE_S = 60.0
"""How long rank 0 has to record a failed rank's run before it is killed (stuck in a collective)."""


class RankFailed(RuntimeError):
    """A rank > 0 exited while the run trained: the run failed (its traceback, if any, is in the output
    of rank 0, which the ranks share)."""


@dataclass(frozen=True)
class SharedRun:
    """What a rank > 0 needs from rank 0 to train the same run."""

    run_id: str
    run_dir: str
    checkpoint: str | None
    """The checkpoint rank 0 resumes from (it set aside damaged ones), or None: from step 0."""
    rank0_pid: int

    @classmethod
    def from_env(cls) -> SharedRun:
        return cls(**json.loads(os.environ[RUN_ENV]))


def is_rank_zero() -> bool:
    """Whether this process owns its run: not a rank > 0 started by :class:`RankLauncher`."""
    return RUN_ENV not in os.environ or os.environ.get("LOCAL_RANK", "0") == "0"


def strategy(devices: int):
    """Lightning's strategy for ``devices`` processes: DDP with :class:`RankLauncher` (gloo on CPU,
    NCCL on CUDA), or Lightning's default for one. The cluster environment is Lightning's own: the
    processes of one run are this machine's, also inside a Slurm allocation or under torchrun."""
    return RankStrategy(cluster_environment=LightningEnvironment()) if devices > 1 else "auto"


def leave_sigterm_alone(trainer) -> None:
    """Keep Lightning from handling SIGTERM in a run on several processes: its handler broadcasts to the
    other ranks from inside the handler, and rank 0 hangs there when they are in another collective
    (seen: 1 of 6 SIGTERMs mid-run left rank 0 in that broadcast for good). Rank 0's own handler
    (:func:`mta_lab.infra.signals.stop_once`) stops the run, and Lightning then kills the other ranks."""
    if trainer.world_size > 1:
        trainer._signal_connector.register_signal_handlers = lambda: None


class RankStrategy(DDPStrategy):
    def _configure_launcher(self) -> None:
        self._launcher = RankLauncher(self.cluster_environment, self.num_processes, self.num_nodes)


class RankLauncher(_SubprocessScriptLauncher):
    """Lightning's launcher of ranks > 0, starting :data:`RANK_COMMAND` with PR_SET_PDEATHSIG and watching
    the ranks itself: a failed rank stops rank 0 with SIGTERM, so that it records the failure."""

    def __init__(self, cluster_environment, num_processes: int, num_nodes: int) -> None:
        super().__init__(cluster_environment, num_processes, num_nodes)
        self.failed: tuple[int, int] | None = None
        """(rank, exit code) of the first rank that exited on its own with an error."""
        self._stopping = False
        self._lock = threading.Lock()  # the watcher's look at the ranks, and the decision to stop them

    def launch(self, function, *args, trainer=None, **kwargs):
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        if not self.cluster_environment.creates_processes_externally:  # rank 0
            self._call_children_scripts()
            threading.Thread(target=self._watch, daemon=True, name="ddp-ranks").start()
        _set_num_threads_if_needed(num_processes=self.num_processes)
        return function(*args, **kwargs)

    def _call_children_scripts(self) -> None:
        self._check_can_spawn_children()
        environment = self.cluster_environment
        os.environ["MASTER_ADDR"] = environment.main_address
        os.environ["MASTER_PORT"] = str(environment.main_port)
        os.environ["NODE_RANK"] = str(environment.node_rank())
        os.environ["LOCAL_RANK"] = str(environment.local_rank())
        os.environ["WORLD_SIZE"] = str(self.num_processes * self.num_nodes)
        for local_rank in range(1, self.num_processes):
            env = {**os.environ, "LOCAL_RANK": str(local_rank)}
            self.procs.append(subprocess.Popen(RANK_COMMAND, env=env, preexec_fn=_die_with_parent))

    def kill(self, signum) -> None:
        """Lightning's call: with SIGTERM from its signal handler (which then broadcasts to the ranks, so
        they must live on), with SIGKILL when it stops after an interruption."""
        if signum == signal.SIGKILL:
            self.stop(wait_s=0)

    def stop(self, wait_s: float) -> None:
        """Wait up to ``wait_s`` for the ranks to exit, then kill those that have not."""
        with self._lock:
            self._note_failure()
            self._stopping = True  # what exits from now on was stopped
        deadline = time.monotonic() + wait_s
        for proc in self.procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def _note_failure(self) -> None:
        if self._stopping:
            return
        for rank, proc in enumerate(self.procs, start=1):
            if self.failed is None and proc.poll() not in (None, 0):
                self.failed = (rank, proc.returncode)

    def _watch(self) -> None:
        while not self._stopping:
            time.sleep(POLL_S)
            with self._lock:
                self._note_failure()
                failed = None if self._stopping else self.failed
            if failed is not None:
                rank, code = failed
                logger.error("rank %d exited with code %d: stopping the run", rank, code)
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(STOP_GRACE_S)
                if not self._stopping:  # stuck in a collective that waits for the dead rank
                    os.kill(os.getpid(), signal.SIGKILL)
                return


@contextmanager
def ranks_of(trainer, run: SharedRun) -> Iterator[None]:
    """Around rank 0's ``trainer.fit``: the ranks it starts learn ``run``; every way out leaves none of
    them running and this process ready for another run (the process group closed, the environment
    as it was). A rank that failed on its own is the error."""
    launcher = trainer.strategy.launcher
    if not isinstance(launcher, RankLauncher) or not is_rank_zero():
        yield
        return
    saved = {key: os.environ.get(key) for key in (RUN_ENV, *LAUNCH_ENV)}
    for key in LAUNCH_ENV:
        os.environ.pop(key, None)
    os.environ[RUN_ENV] = json.dumps(asdict(run))
    try:
        yield
    except BaseException:
        launcher.stop(wait_s=0)
        if launcher.failed is not None:
            rank, code = launcher.failed
            raise RankFailed(
                f"rank {rank} of {launcher.num_processes} exited with code {code} (what it said is in "
                "this run's output)"
            ) from None
        raise
    else:
        launcher.stop(wait_s=FINISH_WAIT_S)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _die_with_parent() -> None:
    """In a rank > 0, before it runs: Linux kills it when rank 0 dies."""
    die_with_parent(signal.SIGKILL)


def check_parent(run: SharedRun) -> None:
    """A rank whose rank 0 died before PR_SET_PDEATHSIG took hold exits at once."""
    if os.getppid() != run.rank0_pid:
        sys.exit(f"rank {os.environ.get('LOCAL_RANK')}: rank 0 (pid {run.rank0_pid}) is gone")

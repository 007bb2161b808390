"""Grid cells as submitit jobs: on a Slurm cluster, or with submitit's local executor here.

Each cell is one job of `nodes` x `tasks_per_node` processes (one per GPU; one on a node
without GPUs). Every process joins one torch process group from the job's environment,
as torchrun's processes would (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK), so the
cell trains exactly as `torchrun --nnodes N --nproc_per_node G ... train` would.

A scheduler that preempts a job, or is about to end it at its time limit, sends the job
submitit's signal (USR2 unless $SUBMITIT_PREEMPT_SIGNAL says otherwise). A training loop
then saves a checkpoint after its current step on every rank and stops (distributed's stop
requests); outside the loop the signal is submitit's at once. Either way submitit's
checkpointing protocol requeues the job: it calls `Requeueable.checkpoint()`, which hands
back the same call, and the requeued job resumes from the run directory's last checkpoint.

What the job does for a cell, and the leases, are the grid's (ocl_bench.run.grid); this
module knows submitit only. submitit is an optional dependency (the `slurm` extra): it is
imported where it is used.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ocl_bench.api.errors import ConfigError, UserError
from ocl_bench.run import distributed


@dataclass(frozen=True)
class JobResources:
    """What each cell's job asks its scheduler for (`ocl-bench grid` options, grid keys)."""

    cluster: str | None = None  # submitit's: None detects Slurm, "local" runs jobs here
    partition: str | None = None
    time: int = 60  # minutes, the job's time limit
    gpus: int = 0  # per node
    nodes: int = 1
    cpus_per_task: int = 0  # per process; 0: the cluster's default
    mem_gb: float = 0.0  # per node; 0: the cluster's default
    # How often a job that reaches its time limit is requeued (submitit's max_num_timeout;
    # a preempted job is requeued however often it is preempted).
    timeout_requeues: int = 3
    # Any other sbatch option submitit knows (account, qos, constraint, exclude, ...), as
    # (name, value) pairs; True for a flag such as exclusive.
    sbatch: tuple[tuple[str, str | bool], ...] = ()

    @property
    def tasks_per_node(self) -> int:
        """One process per GPU; one on a node without GPUs."""
        return max(1, self.gpus)

    @property
    def tasks(self) -> int:
        return self.nodes * self.tasks_per_node

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> JobResources:
        """From run_grid's `slurm` dict (cluster, partition, time, gpus, nodes,
        cpus_per_task, mem_gb, timeout_requeues, sbatch), checked."""
        found = cls(
            cluster=settings.get("cluster"),
            partition=settings.get("partition"),
            time=int(settings.get("time") or 60),
            gpus=int(settings.get("gpus") or 0),
            nodes=int(settings.get("nodes") or 1),
            cpus_per_task=int(settings.get("cpus_per_task") or 0),
            mem_gb=float(settings.get("mem_gb") or 0),
            timeout_requeues=int(settings.get("timeout_requeues", 3)),
            sbatch=tuple(dict(settings.get("sbatch") or {}).items()),
        )
        if min(found.gpus, found.cpus_per_task, found.mem_gb, found.timeout_requeues) < 0:
            raise ConfigError(
                f"gpus, cpus_per_task, mem_gb and timeout_requeues cannot be negative; got"
                f" {found.gpus}, {found.cpus_per_task}, {found.mem_gb}, {found.timeout_requeues}"
            )
        if found.nodes < 1 or found.time < 1:
            raise ConfigError(
                f"a job needs nodes >= 1 and a time limit >= 1 minute; got nodes {found.nodes},"
                f" time {found.time}"
            )
        _check_sbatch(found.sbatch)
        if found.cluster == "local" and found.nodes > 1:
            raise ConfigError(
                f"--nodes {found.nodes}: submitit's local executor runs on this machine only;"
                " use --nodes 1 there (several nodes need a Slurm cluster)"
            )
        return found

    def parameters(self) -> dict[str, Any]:
        """submitit's update_parameters for this job (sbatch options as slurm_NAME)."""
        params: dict[str, Any] = {
            "timeout_min": self.time,
            "nodes": self.nodes,
            "tasks_per_node": self.tasks_per_node,
        }
        if self.partition:
            params["slurm_partition"] = self.partition
        if self.gpus:
            params["gpus_per_node"] = self.gpus
        if self.cpus_per_task:
            params["cpus_per_task"] = self.cpus_per_task
        if self.mem_gb:
            params["mem_gb"] = self.mem_gb
        params.update({f"slurm_{name}": value for name, value in self.sbatch})
        return params


def _check_sbatch(options: tuple[tuple[str, Any], ...]) -> None:
    """Refuse an sbatch option submitit does not know before anything is submitted."""
    if not options:
        return
    try:
        from submitit.slurm.slurm import SlurmExecutor
    except ImportError:
        return  # executor() says how to install it
    known = SlurmExecutor._valid_parameters()
    unknown = [name for name, _ in options if name not in known]
    if unknown:
        raise ConfigError(
            f"--sbatch {unknown[0]}: not an sbatch option submitit knows; known:"
            f" {', '.join(sorted(known))}"
        )


def executor(folder: Path, resources: JobResources) -> Any:
    """A submitit executor submitting one job of `resources` per call, logs in `folder`."""
    try:
        import submitit
    except ImportError:
        raise UserError(
            "--executor submitit needs the 'submitit' package: pip install submitit"
            " (or the 'slurm' extra)"
        ) from None
    requeues = resources.timeout_requeues
    found = submitit.AutoExecutor(
        folder=folder,
        cluster=resources.cluster,
        slurm_max_num_timeout=requeues,
        local_max_num_timeout=requeues,
    )
    found.update_parameters(**resources.parameters())
    return found


def job_name(grid: str, cell: str) -> str:
    """The name `squeue` shows for a cell's job: grid and cell label, in the characters a
    job name keeps unquoted in an sbatch script."""
    return re.sub(r"[^A-Za-z0-9_.+:=-]+", "-", f"{grid}:{cell}").strip("-")[:128]


def job_key(submitter: Any, job: Any) -> str:
    """A job `submitter` submitted, as the store names it: Slurm's job id, or local:PID for
    submitit's local executor (store.this_job gives the same inside the job)."""
    return f"local:{job.job_id}" if submitter.cluster == "local" else str(job.job_id)


def join_job_group() -> None:
    """Set what torchrun would (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK) from the
    submitit job's environment, so that distributed.setup joins the job's process group;
    nothing in a one-task job."""
    from submitit import JobEnvironment
    from submitit.helpers import TorchDistributedEnvironment

    if JobEnvironment().num_tasks == 1:
        return
    # Every process keeps every GPU visible and takes cuda:LOCAL_RANK, as under torchrun.
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


def _usr_signal() -> signal.Signals:
    from submitit import JobEnvironment

    return getattr(signal, f"SIG{JobEnvironment.USR_SIG}")


class Requeueable:
    """fn(*args) on every task of a submitit job, requeued when preempted or out of time.

    submitit's checkpointing protocol: on its signal, submitit calls `checkpoint()` on rank
    0, dumps the call it returns, requeues the job and exits; the requeued job calls it
    again. `fn` must resume where it stopped (train() resumes from its last checkpoint)."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self.fn, self.args = fn, args

    def __call__(self) -> Any:
        join_job_group()
        distributed.take_stops()
        usr = _usr_signal()
        submitits = signal.getsignal(usr)
        task = os.getpid()

        def asked(signum: int, frame: Any) -> None:
            if os.getpid() != task:  # a forked DataLoader worker: its task handles the stop
                return
            # In the training loop the stop waits for the end of the step and its checkpoint;
            # anywhere else submitit checkpoints and requeues now (rank 0; the others wait).
            if not distributed.ask_stop() and callable(submitits):
                submitits(signum, frame)

        signal.signal(usr, asked)
        try:
            return self.fn(*self.args)
        except distributed.Preempted as stop:
            print(f"preempted after step {stop.step}: requeueing", file=sys.stderr, flush=True)
            if callable(submitits) and distributed.current().main:
                submitits(usr, None)  # requeues and exits, or raises when it may not requeue
            return f"preempted after step {stop.step}"  # ranks > 0: rank 0 requeues the job

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """The call the requeued job makes: this one again (its state is on disk)."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


def finished(jobs: dict[str, Any], poll: float = 1.0) -> Iterator[tuple[str, Any, str | None]]:
    """(label, rank 0's return value, None) for each of `jobs` as it ends, or (label, None,
    what ended it) for a job that ended without one (cancelled, killed, an exception)."""
    pending = dict(jobs)
    while pending:
        for label, job in list(pending.items()):
            if job.done():
                del pending[label]
                yield (label, *_outcome(job))
        if pending:
            time.sleep(poll)


def _outcome(job: Any) -> tuple[Any, str | None]:
    from submitit.core.utils import UncompletedJobError

    first = job.task(0)  # rank 0 reports the cell; the other ranks only train
    error = first.exception()
    if error is None:
        return first.result(), None
    if isinstance(error, UncompletedJobError):  # no result file: nothing ran to the end
        what = "it ended without a result (cancelled or killed)"
    else:  # the job's traceback: its last error line says what went wrong
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        failing = [ln for ln in lines if ln.split(":", 1)[0].endswith(("Error", "Exception"))]
        what = failing[-1] if failing else (lines[0] if lines else type(error).__name__)
    return None, f"job {job.job_id} ({job.state}): {what[:300]}; log: {first.paths.stderr}"


def cancel(job: Any) -> None:
    """Cancel a job, whatever state it is in (a finished one is left as it is)."""
    try:
        job.cancel(check=False)
    except Exception:  # noqa: BLE001 - the scheduler may already have forgotten it
        pass

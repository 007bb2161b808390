"""Grid cells as submitit jobs, through submitit's local executor on CPU (gloo): a cell of
2 tasks, signalled mid-training as the local executor does at a time limit (and Slurm on
preemption), checkpoints, requeues itself and ends with exactly the weights of
`torchrun --nproc_per_node=2`, its lease never taken by another copy of the grid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ocl_bench.api.errors import ConfigError
from ocl_bench.cli import main
from ocl_bench.run.grid import _job_ended, _start, load_grid, run_grid
from ocl_bench.run.store import ResultStore
from tests.conftest import TINY

pytest.importorskip("submitit")

# Enough steps that a signal sent after step 10 lands mid-training on a fast machine too
# (24 did not: a quiet CI machine ran the last 14 before the signal came); the default slot
# initialisation draws noise every step, so each rank's random stream must resume too.
STEPS = 200
ARGS = [*TINY, f"train.steps={STEPS}", "train.checkpoint_every=10", "eval.num_images=8"]
BASE = "[base]\ntasks = { object_discovery = {} }\n"
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoint" / "model.safetensors"))


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ: {different[:5]}"


@pytest.fixture(scope="module")
def torchrun_weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The cell trained by `torchrun --standalone --nproc_per_node=2 ... train`."""
    out = tmp_path_factory.mktemp("torchrun") / "run"
    torchrun = str(Path(sys.executable).parent / "torchrun")
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "ocl_bench.cli", "train"]
    cmd += ["--out", str(out), "--no-eval", "-q", *ARGS]
    subprocess.run(cmd, check=True, env=ENV, capture_output=True, timeout=600)
    return _weights(out)


def _one_cell_grid(tmp_path: Path):  # noqa: ANN202 - a Grid
    path = tmp_path / "one.toml"
    path.write_text('name = "one"\n' + BASE)
    return load_grid(path, ARGS)


def _job_tasks(folder: Path) -> list[int]:
    """The pids of the task processes submitit's local controller started for `folder`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if any(b"SUBMITIT_LOCAL_GLOBALID=" in e for e in environ) and any(
            str(folder).encode() in e for e in environ
        ):
            found.append(int(proc.name))
    return found


COMPETITOR = """
import sys, time
from ocl_bench.run.store import ResultStore
store, digest = ResultStore(sys.argv[1]), sys.argv[2]
while True:  # another copy of the grid, trying to take the cell all along
    claim = store.claim(digest, 1.5)
    if claim.lease is not None:
        store.release(claim.lease, "taken by the competitor")
        print("taken"); break
    if claim.status == "complete":
        print("never taken"); break
    time.sleep(0.05)
"""


def test_a_two_task_job_preempted_mid_training_ends_with_torchruns_weights(
    tmp_path: Path, torchrun_weights: dict[str, torch.Tensor]
) -> None:
    """One test for both claims (each job start costs seconds): the job's 2 tasks train
    as torchrun's 2 processes, and the preemption, its checkpoint and the requeue change
    nothing (torchrun's run is uninterrupted)."""
    grid = _one_cell_grid(tmp_path)
    digest = grid.cells[0].config.digest()
    db, runs = tmp_path / "r.sqlite", tmp_path / "runs"
    ResultStore(db)
    statuses: dict[str, str] = {}
    # A lease timeout of 1.5 s: the requeue takes longer, so the lease lives only if it is
    # kept alive meanwhile (a dead holder pid on this host would lose it at once).
    driver = threading.Thread(
        target=lambda: statuses.update(
            run_grid(
                grid,
                db,
                runs,
                executor="submitit",
                slurm={"cluster": "local", "gpus": 2, "time": 10},
                lease_timeout=1.5,
            )
        )
    )
    driver.start()
    competitor = subprocess.Popen(
        [sys.executable, "-c", COMPETITOR, str(db), digest], env=ENV, stdout=subprocess.PIPE
    )
    log = runs / digest / "train_log.jsonl"
    deadline = time.monotonic() + 300
    while not (log.exists() and len(log.read_text().splitlines()) >= 10):  # flushed at step 10
        assert time.monotonic() < deadline and driver.is_alive(), "the job never trained"
        time.sleep(0.02)
    time.sleep(0.25)  # a step or two on: the stop then saves a checkpoint of its own
    tasks = _job_tasks(runs / "submitit")
    assert len(tasks) == 2
    for pid in tasks:  # what the local controller sends at the time limit, and Slurm on preemption
        os.kill(pid, signal.SIGUSR2)
    driver.join(300)
    assert statuses == {"base": "complete"}
    assert competitor.communicate(timeout=60)[0].decode().strip() == "never taken"
    _assert_same_weights(_weights(runs / digest), torchrun_weights)
    stopped = [
        line
        for path in (runs / "submitit").glob("*_0_log.err")
        for line in path.read_text().splitlines()
        if "preempted after step" in line
    ]
    assert len(stopped) == 1 and int(stopped[0].split("step ")[1].split(":")[0]) < STEPS, stopped
    # one lease all along, released once, by the cell's end
    (lease,) = ResultStore(db).leases(digest)
    assert lease.outcome == "complete"
    # both tasks ran (each attempt); rank 0 alone wrote the store
    assert {p.name.split("_")[1] for p in (runs / "submitit").glob("*_log.out")} == {"0", "1"}
    (cell,) = ResultStore(db).cells()
    assert cell.status == "complete" and cell.value("object_discovery", "fg_ari") is not None


@pytest.mark.parametrize(
    ("options", "error"),
    [
        (["--gpus", "2"], "--gpus need --executor submitit"),
        (["--executor", "submitit", "--cluster", "local", "--nodes", "2"], "--nodes 2:"),
        (["--executor", "submitit", "--cluster", "local", "--gpus", "3"], "does not split"),
    ],
)
def test_job_options_that_cannot_run_fail_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], error: str
) -> None:
    (tmp_path / "one.toml").write_text('name = "one"\n')
    argv = ["grid", str(tmp_path / "one.toml"), *TINY, "--db", str(tmp_path / "r.sqlite")]
    assert main([*argv, "--runs", str(tmp_path / "runs"), *options]) == 2
    err = capsys.readouterr().err
    assert error in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()


def test_a_job_that_ended_without_a_result_fails_its_cell_and_frees_its_lease(
    tmp_path: Path,
) -> None:
    """What the grid does when a cell's job is cancelled for good or killed: the cell is
    failed with why (a rerun resumes it), its lease released at once for other copies."""
    grid = _one_cell_grid(tmp_path)
    cell = grid.cells[0]
    store = ResultStore(tmp_path / "r.sqlite")
    lease = store.claim(cell.config.digest(), 60.0).lease
    assert lease is not None
    _start(cell, grid.name, tmp_path / "runs", store)
    why = "job 7 (CANCELLED): it ended without a result (cancelled or killed)"
    assert _job_ended(store, lease, None, why) == "failed"
    stored = store.get(cell.config.digest())
    assert stored is not None and stored.status == "failed"
    assert stored.error_line == f"JobEnded: {why}"
    (released,) = store.leases(cell.config.digest())
    assert released.released is not None and why in (released.outcome or "")
    # a job that reported its cell leaves the status it reported
    assert _job_ended(store, lease, "complete", None) == "complete"


def test_a_grid_file_sets_gpus_and_nodes(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text('name = "g"\ngpus = 4\nnodes = 2\n')
    grid = load_grid(path)
    assert (grid.gpus, grid.nodes) == (4, 2)
    path.write_text('name = "g"\nnodes = 0\n')
    with pytest.raises(ConfigError, match="nodes must be a number >= 1"):
        load_grid(path)


def _parsed_grid_args(argv: list[str]):  # noqa: ANN202 - argparse's Namespace
    from ocl_bench.cli import build_parser

    return build_parser().parse_args(["grid", "g.toml", *argv])


def test_job_options_reach_the_sbatch_script(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a Slurm user asks for on the command line (or in the grid file) is what the
    job's sbatch script books: CPUs, memory, account/qos/flags, the timeout requeues."""
    from submitit.slurm.slurm import SlurmExecutor

    from ocl_bench.cli import _job_settings
    from ocl_bench.run import cluster

    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # no srun here
    path = tmp_path / "g.toml"
    path.write_text('name = "g"\ngpus = 4\ncpus_per_task = 6\n')
    grid = load_grid(path)
    args = _parsed_grid_args(
        ["--executor", "submitit", "--cluster", "slurm", "--partition", "gpu", "--nodes", "2"]
        + ["--mem-gb", "64", "--timeout-requeues", "7", "--time", "1440"]
        + ["--sbatch", "account=lab", "--sbatch", "qos=high", "--sbatch", "exclusive"]
    )
    resources = cluster.JobResources.from_settings(_job_settings(args, grid))
    submitter = cluster.executor(tmp_path / "submitit", resources)
    submitter.update_parameters(name=cluster.job_name(grid.name, "attention prior / seed 0"))
    script = submitter._executor._make_submission_file_text("true", "uid")
    booked = {line for line in script.splitlines() if line.startswith("#SBATCH")}
    expected = {
        "--account=lab", "--qos=high", "--exclusive", "--partition=gpu", "--nodes=2",
        "--gpus-per-node=4", "--ntasks-per-node=4", "--cpus-per-task=6", "--mem=64GB",
        "--time=1440", "--job-name=g:attention-prior-seed-0",
    }  # fmt: skip
    assert {f"#SBATCH {option}" for option in expected} <= booked, script
    assert submitter._executor.max_num_timeout == 7
    # --cpus-per-task replaces the grid file's
    args = _parsed_grid_args(["--executor", "submitit", "--cpus-per-task", "2"])
    assert _job_settings(args, grid)["cpus_per_task"] == 2


def test_an_sbatch_option_submitit_does_not_know_fails_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "one.toml").write_text('name = "one"\n')
    argv = ["grid", str(tmp_path / "one.toml"), *TINY, "--db", str(tmp_path / "r.sqlite")]
    argv += ["--executor", "submitit", "--cluster", "local", "--sbatch", "acount=lab"]
    assert main([*argv, "--runs", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--sbatch acount: not an sbatch option submitit knows" in err, err
    assert "account," in err, err
    assert len(err.splitlines()) == 1, err
    assert ResultStore(tmp_path / "r.sqlite").leases() == []  # nothing was claimed


@pytest.mark.parametrize(
    ("settings", "error"),
    [
        ({"cpus_per_task": -1}, "cannot be negative"),
        ({"timeout_requeues": -2}, "cannot be negative"),
        ({"mem_gb": -1.0}, "cannot be negative"),
    ],
)
def test_job_resources_refuse_impossible_requests(settings: dict, error: str) -> None:
    from ocl_bench.run.cluster import JobResources

    with pytest.raises(ConfigError, match=error):
        JobResources.from_settings(settings)


def test_a_grid_file_sets_cpus_per_task(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text('name = "g"\ncpus_per_task = 8\n')
    assert load_grid(path).cpus_per_task == 8
    path.write_text('name = "g"\ncpus_per_task = -1\n')
    with pytest.raises(ConfigError, match="cpus_per_task must be a number >= 0"):
        load_grid(path)


@pytest.mark.parametrize(
    ("option", "error"),
    [
        (["--mem-gb", "nan"], "argument --mem-gb: must be finite, got nan"),
        (["--mem-gb", "-1"], "argument --mem-gb: must be at least 0, got -1"),
        (["--lease-timeout", "inf"], "argument --lease-timeout: must be finite, got inf"),
        (["--time", "0"], "argument --time: must be positive, got 0"),
        (["--cpus-per-task", "two"], "argument --cpus-per-task: not an int: 'two'"),
    ],
)
def test_job_numbers_out_of_range_are_refused_by_the_parser(
    capsys: pytest.CaptureFixture[str], option: list[str], error: str
) -> None:
    with pytest.raises(SystemExit) as stopped:
        _parsed_grid_args(["--executor", "submitit", *option])
    assert stopped.value.code == 2 and error in capsys.readouterr().err

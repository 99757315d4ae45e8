"Sweeps through submitit: local processes for real, the Slurm job array as sbatch would receive it (no cluster)."
import json
import os
import pickle
from pathlib import Path

import nbformat
import pytest
import submitit

from jepa_lab.runner import SweepExecutor, collect_runs, main, slurm_parameters, slurm_script

# a grid point that sleeps long enough for two of them to overlap when they run in parallel
BODY = """import time
from jepa_lab.core import Run
t0 = time.time()
run = Run.start('probe', {'lr': lr, 'steps': steps})
for s in range(steps): run.log(s, loss=1 / (1 + lr * s), lr=lr)
time.sleep(nap)
run.summary(final_loss=1 / (1 + lr * (steps - 1)), t0=t0, t1=time.time(), pid=os.getpid())"""


@pytest.fixture
def probe(tmp_path, monkeypatch):
    monkeypatch.setenv("JEPA_LAB_RUNS_PATH", str(tmp_path / "runs"))
    monkeypatch.setenv("TQDM_DISABLE", "1"); monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "language": "python", "display_name": "Python 3"}})
    nb.cells = [nbformat.v4.new_code_cell("lr = 0.1\nsteps = 5\nnap = 2.5", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("import os\n" + BODY)]
    path = tmp_path / "nbs" / "probe.ipynb"
    path.parent.mkdir(); nbformat.write(nb, path)
    return path


def test_local_executor_runs_the_grid_points_in_parallel_processes(probe, tmp_path, capsys):
    out = tmp_path / "sweep"
    code = main(["sweep", str(probe), "--grid", "lr=0.5,2.0", "-p", "steps", "8", "--executor", "local", "--parallel", "2",
                 "--time", "5", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    runs = {folder.name: record for folder, record in collect_runs(out)}
    assert set(runs) == {"lr=0.5", "lr=2.0"} and all(r["status"] == "ok" for r in runs.values())
    assert runs["lr=2.0"]["params"] == {"steps": 8, "lr": 2.0}                      # typed grid value, -p kept
    a, b = (json.loads((out / name / "summary.json").read_text()) for name in ("lr=0.5", "lr=2.0"))
    assert a["pid"] != b["pid"] != os.getpid()                                         # each in its own process
    assert max(a["t0"], b["t0"]) < min(a["t1"], b["t1"])                               # ... at the same time
    assert b["final_loss"] == pytest.approx(1 / 15)
    assert "2 notebooks, 2 ok, 0 failed" in (out / "report.md").read_text() and (out / "report.html").exists()
    assert list((out / "submitit").glob("*_log.out")) and "2 local jobs" in printed    # submitit's logs in the sweep
    # two small real runs, compared: a panel per shared metric, both runs and the parameter that differs
    assert main(["compare", str(out), "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "curves.png").stat().st_size > 5000
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| run | lr=0.5 | lr=2.0 |" in table and "| status | ok | ok |" in table and "| -p lr | 0.5 | 2 |" in table
    assert "| final_loss | 0.2222 | 0.06667 |" in table and "-p steps" not in table


def test_local_executor_records_a_job_killed_by_its_time_limit(probe, tmp_path, monkeypatch):
    "A grid point that outlives --time is stopped by submitit and reported as failed; the report is still written."
    from jepa_lab import runner
    out = tmp_path / "sweep"
    update = submitit.LocalExecutor.update_parameters  # --time counts in minutes: make this one 3 s
    monkeypatch.setattr(submitit.LocalExecutor, "update_parameters", lambda self, **kw: update(self, **{**kw, "timeout_min": 0.05}))
    runner.sweep(probe, {"nap": [120.0]}, out=out, executor=SweepExecutor("local", time_min=1))
    (record,) = [r for _, r in collect_runs(out)]
    assert record["status"] == "failed" and "ended without a result: over its --time limit" in record["error"]
    assert "\n" not in record["error"] and Path(record["error"].split("its log: ")[1]).exists()
    assert "failed" in (out / "report.html").read_text()


def test_slurm_job_spec_without_a_cluster(tmp_path, monkeypatch):
    executor = SweepExecutor("slurm", gpus=2, partition="h100", time_min=90, array_parallelism=3)
    params = slurm_parameters(executor, "jepa-lab-tiny_mlp")
    text = slurm_script(tmp_path / "submitit", params, 5)
    for line in ["#SBATCH --gpus-per-node=2", "#SBATCH --partition=h100", "#SBATCH --time=90", "#SBATCH --array=0-4%3",
                 "#SBATCH --job-name=jepa-lab-tiny_mlp", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1"]:
        assert line in text.splitlines(), line
    assert f"-m submitit.core._submit {tmp_path / 'submitit'}" in text
    # submitit's own SlurmExecutor takes these parameters and writes the same script (srun faked: no cluster here)
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))
    slurm = submitit.SlurmExecutor(folder=tmp_path / "submitit")
    slurm.update_parameters(**params)
    slurm.parameters["map_count"] = 5
    assert slurm._make_submission_file_text(slurm._submitit_command_str, "uid") == text
    single = slurm_script(tmp_path / "submitit", slurm_parameters(SweepExecutor("slurm"), "x"), 1)
    assert "--array" not in single and "#SBATCH --time=60" in single and "--gpus-per-node" not in single


def test_slurm_sweep_submits_one_array_of_plain_calls(probe, tmp_path, monkeypatch, capsys):
    "Through fake sbatch/srun: the script sbatch receives, and each pickled job runs its grid point as a node would."
    bin_ = tmp_path / "bin"; bin_.mkdir()
    (bin_ / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {bin_}/received.sh\necho "Submitted batch job 4242"\n')
    (bin_ / "srun").write_text("#!/bin/sh\nexit 1\n")
    for tool in ("sbatch", "srun"): (bin_ / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "sweep"
    assert main(["sweep", str(probe), "--grid", "lr=0.5,2.0", "--executor", "slurm", "--gpus", "1", "--partition", "debug",
                 "--time", "10", "--array-parallelism", "1", "--no-wait", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 slurm jobs (4242_0, 4242_1)" in printed and f"jepa-lab report {out}" in printed
    script = (bin_ / "received.sh").read_text().splitlines()
    for line in ["#SBATCH --array=0-1%1", "#SBATCH --gpus-per-node=1", "#SBATCH --partition=debug", "#SBATCH --time=10"]:
        assert line in script, line
    pickles = sorted((out / "submitit").glob("4242_*_submitted.pkl"))
    assert len(pickles) == 2
    for path in pickles:  # what a node unpickles: our module-level function and plain arguments
        with open(path, "rb") as f: job = pickle.load(f)
        assert job.function.__module__ == "jepa_lab.runner" and job.function.__name__ == "run_grid_point"
        assert all(isinstance(a, (str, dict, list)) for a in job.args)
        job.result()  # run the grid point here, as the node would
    assert main(["report", str(out)]) == 0 and "2 notebooks, 2 ok, 0 failed" in capsys.readouterr().out

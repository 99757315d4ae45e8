"The jepa-lab CLI: run, sweep, course, report, list — through the installed console script."
import json
import subprocess
from pathlib import Path

import nbformat
import pytest

from jepa_lab.runner import RunnerError, parse_parameters, strip_flagged_cells


def cli(jepa_lab, env, *args, cwd=None):
    return subprocess.run([jepa_lab, *map(str, args)], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


def notebook(path: Path, params: str, *cells: str):
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "language": "python", "display_name": "Python 3"}})
    nb.cells = [nbformat.v4.new_code_cell(params, metadata={"tags": ["parameters"]})]
    nb.cells += [nbformat.v4.new_code_cell(c) for c in cells]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


@pytest.fixture
def scratch_nbs(tmp_path):
    nbs = tmp_path / "nbs"
    notebook(nbs / "01_good.ipynb", "n = 3\nscale = 1.5\nlabel = 'x'",
             "from jepa_lab.core import Run\nrun = Run.start('good', {'n': n})",
             "assert isinstance(n, int) and isinstance(scale, float)\nrun.summary(n_times_scale=n * scale, label=label)")
    notebook(nbs / "02_broken.ipynb", "n = 3", "raise ValueError('deliberate failure in 02_broken')")
    notebook(nbs / "experiments" / "flags.ipynb", "n = 1", "#| slow\nraise RuntimeError('slow cell ran')",
             "from jepa_lab.core import Run\nRun.start('flags').summary(ran=1)")
    return nbs


def test_run_with_a_good_parameter_records_it(jepa_lab, cli_env, tmp_path):
    out = tmp_path / "tiny"
    res = cli(jepa_lab, cli_env, "run", "experiments/tiny_mlp", "-p", "steps", "150", "-p", "lr", "0.01", "--out", out)
    assert res.returncode == 0, res.stdout + res.stderr
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "ok" and record["params"] == {"steps": 150, "lr": 0.01}
    params = json.loads((out / "params.json").read_text())["params"]
    assert params["steps"] == 150 and params["lr"] == 0.01
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 149 and (out / "checkpoints" / "step-00000150.safetensors").exists()
    assert (out / "figures" / "loss_and_surface.png").stat().st_size > 1000
    # running again into the same folder with more steps resumes from the checkpoint
    res = cli(jepa_lab, cli_env, "run", "experiments/tiny_mlp", "-p", "steps", "200", "-p", "lr", "0.01", "--out", out)
    assert res.returncode == 0, res.stdout + res.stderr
    executed = (out / "executed.ipynb").read_text()
    assert "resumed from step-00000150.safetensors at step 150" in executed
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 199


def test_a_relative_out_folder_is_where_the_command_runs(jepa_lab, cli_env, scratch_nbs, tmp_path):
    "The kernel runs in the notebook's folder: a relative --out must still name a folder under the caller's cwd."
    res = cli(jepa_lab, cli_env, "run", scratch_nbs / "01_good.ipynb", "--out", "rel/good", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads((tmp_path / "rel" / "good" / "summary.json").read_text())["n_times_scale"] == 4.5
    assert not (scratch_nbs / "rel").exists()


def test_undeclared_parameter_is_refused_listing_declared_ones(jepa_lab, cli_env, tmp_path):
    res = cli(jepa_lab, cli_env, "run", "experiments/tiny_mlp", "-p", "step", "10")
    assert res.returncode == 2
    assert "declares no parameter 'step'" in res.stderr and "steps=600" in res.stderr and "lr=" in res.stderr
    assert not (tmp_path / "runs").exists()  # nothing was run, nothing written


def test_badly_typed_parameter_is_refused(jepa_lab, cli_env):
    res = cli(jepa_lab, cli_env, "run", "experiments/tiny_mlp", "-p", "steps", "many")
    assert res.returncode == 2 and "parameter 'steps' must be int, got 'many'" in res.stderr


def test_missing_notebook_is_refused_listing_available(jepa_lab, cli_env):
    res = cli(jepa_lab, cli_env, "run", "experiments/no_such_thing")
    assert res.returncode == 2
    assert "no notebook 'experiments/no_such_thing'" in res.stderr and "experiments/tiny_mlp" in res.stderr


def test_list_shows_notebooks_and_defaults(jepa_lab, cli_env):
    res = cli(jepa_lab, cli_env, "list")
    assert res.returncode == 0
    lines = {line.split()[0]: line for line in res.stdout.splitlines()}
    assert "00_core" in lines and "steps=600" in lines["experiments/tiny_mlp"]


def test_course_marks_the_failing_notebook_and_runs_the_rest(jepa_lab, cli_env, scratch_nbs, tmp_path):
    out = tmp_path / "course"
    res = cli(jepa_lab, cli_env, "course", "--nbs", scratch_nbs, "--out", out)
    assert res.returncode == 1, res.stdout + res.stderr
    report = (out / "report.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in report.splitlines() if line.startswith("| ") and "---" not in line}
    assert "❌ failed" in rows["02_broken"] and "deliberate failure in 02_broken" in report
    assert "✅ ok" in rows["01_good"] and "n_times_scale=4.5" in rows["01_good"]
    assert "✅ ok" in rows["experiments/flags"]  # its `#| slow` cell was skipped
    assert "[notebook](01_good/executed.ipynb)" in rows["01_good"]
    assert "3 notebooks, 2 ok, 1 failed" in report
    page = (out / "report.html").read_text()  # the same table as a web page, each executed notebook rendered beside it
    assert page.count('<td class="ok">ok</td>') == 2 and "failed: cell " in page and "deliberate failure in 02_broken" in page
    assert (out / "02_broken" / "executed.html").exists() and f"html: {out / 'report.html'}" in res.stdout


def test_sweep_runs_the_grid_and_reports_it(jepa_lab, cli_env, scratch_nbs, tmp_path):
    out = tmp_path / "sweep"
    res = cli(jepa_lab, cli_env, "sweep", scratch_nbs / "01_good.ipynb", "--grid", "n=1,2", "scale=2.0", "--out", out)
    assert res.returncode == 0, res.stdout + res.stderr
    results = sorted(json.loads(p.read_text())["n_times_scale"] for p in out.glob("*/summary.json"))
    assert results == [2.0, 4.0]
    res = cli(jepa_lab, cli_env, "report", out)
    assert res.returncode == 0 and "2 notebooks, 2 ok, 0 failed" in res.stdout


def test_parse_parameters_types_values_like_their_defaults(scratch_nbs):
    from jepa_lab.runner import declared_parameters
    nb = scratch_nbs / "01_good.ipynb"
    declared = declared_parameters(nb)
    assert parse_parameters([("n", "4"), ("scale", "2"), ("label", "y")], declared, nb) == {"n": 4, "scale": 2.0, "label": "y"}
    with pytest.raises(RunnerError, match="declared parameters: n=3, scale=1.5, label='x'"):
        parse_parameters([("nn", "4")], declared, nb)


def test_strip_flagged_cells_keeps_the_others():
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(s) for s in ["a = 1", "#| slow\nb = 2", "#|gpu\nc = 3", "# | export\nd = 4"]]
    kept = [c.source for c in strip_flagged_cells(nb, ["slow", "gpu"]).cells]
    assert kept == ["a = 1", "# | export\nd = 4"]


def test_train_ddp_runs_the_notebook_on_two_ranks_and_records_a_failing_rank(jepa_lab, cli_env, tmp_path):
    nb = notebook(tmp_path / "nbs" / "ddp_probe.ipynb", "n = 3",
                  "import torch\nfrom jepa_lab.core import Run\nfrom jepa_lab.distributed import context, gather_features\n"
                  "ctx = context()\ngathered = gather_features(torch.full((2, 1), float(ctx.rank)))\n"
                  "Run.start('probe', {'n': n}).summary(rank=ctx.rank, world=ctx.world_size, gathered=gathered.sum().item(), n=n)",
                  "torch.distributed.barrier()\nif n < 0 and ctx.rank == 1: raise ValueError('rank 1 refuses')")
    out = tmp_path / "ddp"
    res = cli(jepa_lab, cli_env, "train-ddp", nb, "--nproc", "2", "-p", "n", "-1", "--out", out)
    assert res.returncode == 1, res.stdout + res.stderr
    rank0, rank1 = (json.loads((f / "summary.json").read_text()) for f in (out, out / "ranks" / "rank-1"))
    assert (rank0["rank"], rank1["rank"], rank0["world"], rank0["n"]) == (0, 1, 2, -1)      # typed -p, two real ranks
    assert rank0["gathered"] == rank1["gathered"] == 2.0                                      # 0 + 0 + 1 + 1: features crossed ranks
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "failed" and record["nproc"] == 2 and "rank 1: " in record["error"] and "rank 1 refuses" in record["error"]
    assert (out / "executed.ipynb").exists() and (out / "ranks" / "rank-1" / "executed.ipynb").exists()


def test_train_ddp_refuses_an_undeclared_parameter_before_starting_ranks(jepa_lab, cli_env, tmp_path):
    res = cli(jepa_lab, cli_env, "train-ddp", "experiments/tiny_mlp", "--nproc", "2", "-p", "step", "10", "--out", tmp_path / "x")
    assert res.returncode == 2 and "declares no parameter 'step'" in res.stderr and not (tmp_path / "x").exists()

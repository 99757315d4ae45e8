"Every runner error is one line on stderr, `jepa-lab: error: …`, naming the file or parameter; exit status 2; nothing written."
import json
from pathlib import Path

import nbformat
import pytest

from jepa_lab import runner
from jepa_lab.runner import main, run_notebook


@pytest.fixture(autouse=True)
def runs_path(tmp_path, monkeypatch):
    monkeypatch.setenv("JEPA_LAB_RUNS_PATH", str(tmp_path / "runs"))
    return tmp_path / "runs"


@pytest.fixture
def good(tmp_path):
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "language": "python", "display_name": "Python 3"}})
    nb.cells = [nbformat.v4.new_code_cell("n = 3\ndims = [1, 2]", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("print(n)")]
    path = tmp_path / "nbs" / "good.ipynb"
    path.parent.mkdir(); nbformat.write(nb, path)
    return path


def refused(capsys, argv, *expected):
    "Run `main(argv)`: exit status 2, one line on stderr naming what is wrong, no traceback, nothing under runs/."
    code = main(list(map(str, argv)))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("jepa-lab: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for text in expected: assert text in err, (text, err)
    return err


def nothing_written(runs_path, *folders):
    assert not runs_path.exists() and not any(Path(f).exists() for f in folders)


def test_a_notebook_that_is_not_json(capsys, tmp_path, runs_path):
    bad = tmp_path / "bad.ipynb"
    bad.write_text('{"cells": [],\n "metadata": {}\n "nbformat": 4}')
    refused(capsys, ["run", bad], str(bad), "is not valid JSON", "line 3, column 2", "git checkout")
    refused(capsys, ["sweep", bad, "--grid", "n=1,2"], str(bad), "is not valid JSON")
    nothing_written(runs_path)


def test_json_that_is_not_a_notebook(capsys, tmp_path, runs_path):
    bad = tmp_path / "bad.ipynb"
    bad.write_text('{"a": 1}')
    refused(capsys, ["run", bad], str(bad), "is not a Jupyter notebook")
    nothing_written(runs_path)


def test_a_corrupt_notebook_in_a_course_is_a_failed_run_on_one_line(tmp_path):
    bad = tmp_path / "nbs" / "01_bad.ipynb"
    bad.parent.mkdir(); bad.write_text("{ truncated")
    record = run_notebook(bad, {}, tmp_path / "out", nbs=tmp_path / "nbs")
    assert record["status"] == "failed" and "01_bad.ipynb is not valid JSON" in record["error"] and "\n" not in record["error"]
    assert json.loads((tmp_path / "out" / "run.json").read_text())["status"] == "failed"


def test_a_missing_kernel(capsys, good, tmp_path, runs_path):
    refused(capsys, ["run", good, "--kernel", "julia-9", "--out", tmp_path / "out"],
            "no Jupyter kernel named 'julia-9'", "installed: ", "python3", "--kernel", "ipykernel install")
    refused(capsys, ["sweep", good, "--grid", "n=1,2", "--kernel", "julia-9"], "no Jupyter kernel named 'julia-9'")
    nothing_written(runs_path, tmp_path / "out")


def test_papermills_no_such_kernel_is_recorded_on_one_line(good, tmp_path, monkeypatch):
    "The kernel vanishing between the check and the start: papermill's NoSuchKernel becomes a one-line failed run."
    from jupyter_client.kernelspec import NoSuchKernel
    def no_kernel(*args, **kwargs): raise NoSuchKernel("python3")
    monkeypatch.setattr(runner.papermill, "execute_notebook", no_kernel)
    record = run_notebook(good, {}, tmp_path / "out", nbs=good.parent)
    assert record["status"] == "failed" and record["error"] == "no Jupyter kernel named 'python3'; install it or pass --kernel"


def test_parameters_of_the_wrong_type_or_unknown(capsys, good, runs_path):
    refused(capsys, ["run", good, "-p", "n", "three"], "parameter 'n' must be int, got 'three'")
    refused(capsys, ["run", good, "-p", "dims", "[1, 2"], "parameter 'dims' must be list, got '[1, 2'")
    refused(capsys, ["sweep", good, "--grid", "n=1,x"], "parameter 'n' must be int, got 'x'")
    refused(capsys, ["run", good, "-p", "m", "3"], "good.ipynb declares no parameter 'm'", "declared parameters: n=3, dims=[1, 2]")
    refused(capsys, ["sweep", good, "--grid", "m=1,2"], "declares no parameter 'm'")
    refused(capsys, ["sweep", good, "--grid", "n"], "--grid expects key=v1,v2,...; got 'n'")
    nothing_written(runs_path)


def test_a_notebook_that_does_not_exist(capsys, runs_path):
    refused(capsys, ["run", "experiments/no_such_thing"], "no notebook 'experiments/no_such_thing'", "experiments/tiny_mlp")
    refused(capsys, ["sweep", "no_such.ipynb", "--grid", "n=1"], "no notebook 'no_such.ipynb'")
    nothing_written(runs_path)


def test_compare_or_report_on_a_folder_without_runs(capsys, tmp_path, runs_path):
    (tmp_path / "a").mkdir(); (tmp_path / "b" / "deeper").mkdir(parents=True)
    refused(capsys, ["compare", tmp_path / "a", tmp_path / "b"], f"{tmp_path / 'a'} has no run.json", "jepa-lab run")
    refused(capsys, ["compare", tmp_path / "nowhere", tmp_path / "a"], "nowhere is not a folder")
    refused(capsys, ["report", tmp_path / "b"], "no runs (no run.json) under")
    (tmp_path / "a" / "run.json").write_text('{"status": ')
    refused(capsys, ["report", tmp_path / "a"], "a/run.json is not valid JSON")
    nothing_written(runs_path)


def test_sweep_options_that_do_not_fit_the_executor(capsys, good, runs_path):
    refused(capsys, ["sweep", good, "--grid", "n=1,2", "--parallel", "2"], "--parallel applies to --executor local, not none")
    refused(capsys, ["sweep", good, "--grid", "n=1,2", "--executor", "local", "--partition", "gpu"],
            "--partition applies to --executor slurm, not local")
    refused(capsys, ["sweep", good, "--grid", "n=1,2", "--executor", "local", "--parallel", "0"], "--parallel must be at least 1")
    refused(capsys, ["sweep", good, "--grid", "n=1,2", "--executor", "pbs"], "--executor must be none, local or slurm")
    refused(capsys, ["sweep", good, "--grid", "n=1,2", "--executor", "local", "--no-wait"], "--no-wait applies to --executor slurm")
    nothing_written(runs_path)


def test_slurm_without_sbatch_is_refused_before_anything_is_written(capsys, good, tmp_path, monkeypatch, runs_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    refused(capsys, ["sweep", good, "--grid", "n=1,2", "--executor", "slurm", "--out", tmp_path / "sw"],
            "--executor slurm needs `sbatch` on PATH", "--executor local")
    nothing_written(runs_path, tmp_path / "sw")


def test_argparse_errors_are_one_line_too(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["sweep", "experiments/tiny_mlp"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1
    assert err.startswith("jepa-lab: error: the following arguments are required: --grid") and "jepa-lab sweep --help" in err


def test_an_out_folder_that_cannot_be_made(capsys, good, tmp_path):
    (tmp_path / "file").write_text("x")
    refused(capsys, ["run", good, "--out", tmp_path / "file" / "run"], "file/run", "check the path")

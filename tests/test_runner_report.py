"report.html beside report.md, and `jepa-lab compare`: hand-made run folders, no kernel started."
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import nbformat
import pytest

from jepa_lab.runner import RunnerError, compare_runs, differing_params, load_run, main, shared_metrics, write_report

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGP4z8DwHwAFAAH/iZk9HQAAAABJRU5ErkJggg=="


def run_folder(folder: Path, notebook="tiny", status="ok", error="", summary=None, params=None, declared=None,
               metrics=(), started="2026-01-01T00:00:00", executed=True):
    "A run folder as run_notebook leaves it, written by hand."
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"notebook": notebook, "params": params or {}, "status": status,
                                                 "error": error, "wall_s": 2.25, "started": started}))
    if declared is not None: (folder / "params.json").write_text(json.dumps({"name": notebook, "params": declared}))
    if summary: (folder / "summary.json").write_text(json.dumps(summary))
    if metrics: (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    if executed:
        cell = nbformat.v4.new_code_cell("plot()", outputs=[nbformat.v4.new_output("display_data", {"image/png": PNG})])
        nbformat.write(nbformat.v4.new_notebook(cells=[cell]), folder / "executed.ipynb")
    return folder


class Hrefs(HTMLParser):
    def __init__(self):
        super().__init__(); self.found = []
    def handle_starttag(self, tag, attrs):
        self.found += [v for k, v in attrs if k == "href" and v]


def links(page: Path) -> list[Path]:
    "Files the hrefs of `page` point to; absolute URLs and in-page anchors are not files."
    parser = Hrefs(); parser.feed(page.read_text())
    return [(page.parent / unquote(h)).resolve() for h in parser.found if "://" not in h and not h.startswith("#")]


@pytest.fixture
def runs(tmp_path):
    base = tmp_path / "course"
    ok = run_folder(base / "01_good", "01_good", summary={"acc": 0.91}, started="2026-01-01T00:00:01")
    (ok / "figures").mkdir(); (ok / "figures" / "loss curve.png").write_bytes(b"png")
    run_folder(base / "02_broken", "02_broken", "failed", "cell 3: ValueError: loss is NaN", started="2026-01-01T00:00:02")
    run_folder(base / "sweep" / "lr=0.1,n=2", "experiments/tiny", params={"lr": 0.1, "n": 2}, started="2026-01-01T00:00:03")
    return base


def test_report_html_has_every_status_and_only_links_that_resolve(runs, tmp_path):
    write_report(runs, "course")
    page = runs / "report.html"
    rows = {r.split("</td>")[0].removeprefix("<tr><td>"): r for r in page.read_text().splitlines() if r.startswith("<tr><td>")}
    assert set(rows) == {"01_good", "02_broken", "experiments/tiny"}
    assert '<td class="ok">ok</td>' in rows["01_good"] and "acc=0.91" in rows["01_good"] and "2.2" in rows["01_good"]
    assert '<td class="failed">failed: cell 3: ValueError: loss is NaN</td>' in rows["02_broken"]
    found = links(page)
    assert len(found) == 5 and all(p.exists() for p in found), found   # report.md, 1 figure, 3 executed pages
    assert {p.name for p in found} == {"report.md", "loss curve.png", "executed.html"}
    for executed in runs.rglob("executed.html"):
        text = executed.read_text()
        assert "data:image/png;base64," in text                             # the figure is in the page
        assert links(executed) == [page.resolve()]                           # and its one link goes back to the report
    # relative links only: the folder still works once moved
    moved = Path(shutil.move(runs, tmp_path / "elsewhere" / "copy"))
    assert all(p.exists() for p in links(moved / "report.html") + links(moved / "sweep" / "lr=0.1,n=2" / "executed.html"))


def test_a_sub_report_then_a_report_above_it_repoints_the_pages(runs):
    sweep_page = runs / "sweep" / "lr=0.1,n=2" / "executed.html"
    write_report(runs / "sweep")
    assert links(sweep_page) == [(runs / "sweep" / "report.html").resolve()]
    rendered = sweep_page.stat().st_mtime_ns
    write_report(runs)
    assert links(sweep_page) == [(runs / "report.html").resolve()]
    assert sweep_page.read_text().count('class="jepa-lab-nav"') == 1 and sweep_page.stat().st_mtime_ns >= rendered


def test_an_unreadable_executed_notebook_does_not_sink_the_report(runs):
    (runs / "02_broken" / "executed.ipynb").write_text("{ not json")
    write_report(runs)
    text = (runs / "report.html").read_text()
    assert "not rendered (RunnerError:" in text and all(p.exists() for p in links(runs / "report.html"))


def loss_rows(rate, n=6, extra=None):
    return [{"step": s, "time": 1.0, "loss": 1 / (1 + rate * s), **(extra or {})} for s in range(0, 10 * n, 10)]


def test_compare_plots_shared_metrics_and_tabulates_what_differs(tmp_path, capsys):
    a = run_folder(tmp_path / "a", declared={"lr": 0.1, "steps": 60, "hidden": 64}, params={"lr": 0.1},
                   summary={"acc": 0.8, "device": "cpu"}, metrics=loss_rows(0.1, extra={"only_a": 1.0}))
    b = run_folder(tmp_path / "b", declared={"lr": 0.3, "steps": 60, "hidden": 64}, params={"lr": 0.3},
                   summary={"acc": 0.9, "device": "cpu"}, metrics=loss_rows(0.3))
    sweep = tmp_path / "sweep"
    run_folder(sweep / "hidden=32", declared={"lr": 0.1, "steps": 60, "hidden": 32}, params={"hidden": 32},
               summary={"acc": 0.7}, metrics=loss_rows(0.2, extra={"grad": 2.0}))
    run_folder(sweep / "hidden=128", declared={"lr": 0.1, "steps": 60, "hidden": 128}, params={"hidden": 128},
               summary={"acc": 0.95}, metrics=loss_rows(0.2, extra={"grad": 1.0}))
    out = tmp_path / "cmp"
    assert main(["compare", str(a), str(b), str(sweep), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"table: {out / 'compare.md'}" in printed and f"figure: {out / 'curves.png'}" in printed
    assert (out / "curves.png").stat().st_size > 5000
    rows = [l for l in (out / "compare.md").read_text().splitlines() if l.startswith("| ")]
    assert rows == ["| run | a | b | hidden=128 | hidden=32 |", "| notebook | tiny | tiny | tiny | tiny |",
                    "| status | ok | ok | ok | ok |", "| -p lr | 0.1 | 0.3 | 0.1 | 0.1 |",   # steps: the same everywhere
                    "| -p hidden | 64 | 64 | 128 | 32 |", "| acc | 0.8 | 0.9 | 0.95 | 0.7 |", "| device | cpu | cpu | – | – |"]
    runs = [load_run(f) for f in (a, b, sweep / "hidden=32", sweep / "hidden=128")]
    assert shared_metrics(runs) == ["loss", "grad"]           # only_a is logged by one run: no panel
    assert differing_params(runs) == ["lr", "hidden"]


def test_compare_needs_two_runs_with_run_json(tmp_path):
    a = run_folder(tmp_path / "a")
    with pytest.raises(RunnerError, match="at least two runs, got 1"):
        compare_runs([a, a], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunnerError, match=r"empty has no run.json \(nor runs below it\)"):
        compare_runs([a, tmp_path / "empty"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_compare_without_shared_metrics_says_so_and_flattens_nested_summaries(tmp_path):
    a = run_folder(tmp_path / "a", summary={"x": 1, "probe": {"linear": {"acc": 0.5}, "knn": 0.4}})
    b = run_folder(tmp_path / "b", summary={"x": 2, "probe": {"linear": {"acc": 0.75}}})
    table, figure = compare_runs([a, b], tmp_path / "out")
    text = table.read_text()
    assert figure is None and "No metric in metrics.jsonl is shared by two runs." in text
    assert "| probe/linear/acc | 0.5 | 0.75 |" in text and "| probe/knn | 0.4 | – |" in text

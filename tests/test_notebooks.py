"House rules for notebooks: lessons export a module, experiments export nothing and take parameters, all are clean."
import re

import nbformat
import pytest

from jepa_lab.runner import declared_parameters, list_notebooks

EXPORT = re.compile(r"^\s*#\s*\|\s*export", re.M)


def notebooks(root):
    return list_notebooks(root / "nbs")


def test_there_are_lessons_and_experiments(root):
    names = [p.name for p in notebooks(root)]
    assert "00_core.ipynb" in names and any(p.parent.name == "experiments" for p in notebooks(root))


def test_lessons_export_a_module(root):
    for nb in (p for p in notebooks(root) if p.parent.name != "experiments"):
        cells = nbformat.read(nb, as_version=4).cells
        assert any("#| default_exp" in c.source for c in cells if c.cell_type == "code"), f"{nb.name} has no default_exp"
        assert cells[0].cell_type == "markdown" and cells[0].source.startswith("# "), f"{nb.name} must open with prose"


def test_experiments_take_parameters_and_export_nothing(root):
    for nb in (p for p in notebooks(root) if p.parent.name == "experiments"):
        cells = nbformat.read(nb, as_version=4).cells
        assert any("parameters" in c.metadata.get("tags", []) for c in cells), f"{nb.name} has no `parameters` cell"
        assert declared_parameters(nb), f"{nb.name}: papermill finds no parameters"
        assert not any(EXPORT.search(c.source) for c in cells if c.cell_type == "code"), f"{nb.name} exports code"
        assert not any("nbdev_export" in c.source for c in cells), f"{nb.name} calls nbdev_export"


def test_notebooks_are_clean(root):
    for nb in notebooks(root):
        for cell in nbformat.read(nb, as_version=4).cells:
            if cell.cell_type != "code":
                continue
            assert cell.get("execution_count") is None, f"{nb.name}: run nbdev-clean (execution counts)"
            assert set(cell.metadata) <= {"tags"}, f"{nb.name}: stray cell metadata {set(cell.metadata)}"
            for out in cell.outputs:  # only small teaching figures may stay
                assert out.get("output_type") == "display_data" and "image/png" in out.get("data", {}), \
                    f"{nb.name}: outputs other than figures are not committed"
                assert len(out["data"]["image/png"]) < 200_000, f"{nb.name}: figure over 150 kB"

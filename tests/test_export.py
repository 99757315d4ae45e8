"jepa_lab/ must be exactly what `nbdev-export` makes of nbs/ (rule 1: notebooks are the source)."
import filecmp
import shutil
import subprocess
import sys
from pathlib import Path


def test_package_matches_notebook_export(root, tmp_path):
    copy = tmp_path / "repo"
    copy.mkdir()
    for name in ["pyproject.toml", "settings.ini", "README.md"]:
        shutil.copy(root / name, copy / name)
    shutil.copytree(root / "nbs", copy / "nbs")
    shutil.copytree(root / "jepa_lab", copy / "jepa_lab", ignore=shutil.ignore_patterns("__pycache__"))
    for py in (copy / "jepa_lab").glob("*.py"):
        if py.name != "__init__.py":
            py.unlink()  # exported modules must all be regenerated from the notebooks
    exporter = Path(sys.executable).parent / "nbdev-export"
    subprocess.run([str(exporter)], cwd=copy, check=True, capture_output=True)
    ours = sorted(p.name for p in (root / "jepa_lab").glob("*.py"))
    fresh = sorted(p.name for p in (copy / "jepa_lab").glob("*.py"))
    assert ours == fresh, f"modules differ: committed {ours}, exported {fresh}"
    differing = [n for n in ours if not filecmp.cmp(root / "jepa_lab" / n, copy / "jepa_lab" / n, shallow=False)]
    assert not differing, f"{differing} differ from nbdev-export of nbs/: edit the notebook, run `make export`"

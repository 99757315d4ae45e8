"A lesson imports only earlier lessons: every `jepa_lab` import, top-level or inside a function, points backwards."
import ast
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_lessons() -> dict:
    "{module: notebook stem} from each lesson's `#| default_exp`."
    out = {}
    for nb in sorted((ROOT / "nbs").glob("*.ipynb")):
        for cell in json.loads(nb.read_text())["cells"]:
            m = re.match(r"#\| default_exp (\w+)", "".join(cell["source"]))
            if m: out[m.group(1)] = nb.stem; break
    return out


def lab_imports(path: Path) -> set:
    "Names of jepa_lab modules that `path` imports anywhere (relative or absolute)."
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 1 and mod: found.add(mod.split(".")[0])
            elif mod.startswith("jepa_lab."): found.add(mod.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("jepa_lab.")}
    return found


def test_modules_import_only_earlier_lessons():
    lessons = module_lessons()
    assert {"jepa", "jepa_eval", "jepa_speed", "distributed"} <= set(lessons)
    backwards = []
    for module, stem in lessons.items():
        for used in lab_imports(ROOT / "jepa_lab" / f"{module}.py") - {module, "_modidx"}:
            assert used in lessons, f"{module} imports jepa_lab.{used}, which no notebook exports"
            if lessons[used] >= stem: backwards.append(f"{module} ({stem}) imports {used} ({lessons[used]})")
    assert not backwards, "imports of later (or the same) lessons: " + "; ".join(backwards)


def test_the_check_sees_a_backward_import(tmp_path):
    p = tmp_path / "m.py"
    p.write_text("def f():\n    from jepa_lab.hrm import HRM\n    from .jepa import JEPA\n")
    assert lab_imports(p) == {"hrm", "jepa"}

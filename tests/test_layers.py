"""The layering (docs/design.md §2): each file imports only files below it, so there is no cycle and a file
reads with only what lies below it; importing any of them has no side effects."""
import ast
import json
import subprocess
import sys

from conftest import ROOT

# bottom to top: each file imports only files before it here
ORDER = ["config", "data", "phantom", "mcam", "model", "retrieve", "llm", "pool", "checkpoint", "test",
         "train", "bench"]
LAYER = {name: i for i, name in enumerate(ORDER)}


def project_modules():
    return sorted(p.stem for p in ROOT.glob("*.py"))


def imports_of(name, known):
    """The project modules a file imports, at its top or inside a function alike."""
    tree = ast.parse((ROOT / f"{name}.py").read_text(), filename=f"{name}.py")
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & known


def test_every_file_imports_only_from_lower_layers():
    """A strict order of layers: no import cycle can pass this."""
    known = set(project_modules())
    graph = {name: imports_of(name, known) for name in known}
    unplaced = sorted(set(graph) - set(LAYER))
    assert not unplaced, f"place these files in ORDER (tests/test_layers.py): {unplaced}"
    upward = [f"{a}.py imports {b}" for a in sorted(graph) for b in sorted(graph[a]) if LAYER[b] >= LAYER[a]]
    assert not upward, "imports that do not go down a layer: " + "; ".join(upward)


def test_importing_has_no_side_effects(tmp_path):
    """Nothing printed, no file written, no CUDA initialised, no plotting library loaded."""
    modules = project_modules()
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
            f"import {', '.join(modules)}\n"
            "import json, torch\n"
            "print(json.dumps([torch.cuda.is_initialized(), 'matplotlib' in sys.modules]))")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stderr == "" and json.loads(run.stdout) == [False, False]
    assert list(tmp_path.iterdir()) == []

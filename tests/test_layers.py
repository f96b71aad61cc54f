"""The layering (docs/design.md §2): each file imports only files below it (no cycle: a file reads with only what
lies below it), and importing any of them has no side effects."""
import ast
import json
import subprocess
import sys

from conftest import ROOT

# bottom to top: each file imports only files before it here
ORDER = ["config", "files", "data", "phantom", "mcam", "model", "retrieve", "pool", "checkpoint", "test", "train",
         "bench"]
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


def import_graph():
    known = set(project_modules())
    return {name: imports_of(name, known) for name in known}


def find_cycle(graph):
    """One import cycle as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(node):
        state[node], _ = "open", stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node], _ = "done", stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_file_imports_only_from_lower_layers():
    graph = import_graph()
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

"""The package's shape, as a newcomer should find it: one owner per concept, no import cycle,
functions that fit on a screen, small modules, a docstring on every module and public function."""

import ast

from qlora_lab import paths

PACKAGE = paths.REPO_ROOT / "qlora_lab"
MODULES = {p.stem: ast.parse(p.read_text()) for p in sorted(PACKAGE.glob("*.py"))}

# concept -> the one module that defines it (a def, a class or a module-level assignment)
OWNERS = {
    "ARCHITECTURES": "shapes", "Arch": "shapes", "LINEARS": "shapes", "linears": "shapes", "lora_parameter_count": "shapes",
    "logical_numel": "shapes", "count_parameters": "shapes", "parameter_counts": "shapes",
    "OPTIMIZERS": "recipe", "make_optimizer": "recipe", "DTYPES": "recipe", "DTYPE_BYTES": "recipe",
    "FOUR_BIT": "recipe", "LOAD_QUANTS": "recipe", "CODEBOOKS": "recipe", "default_device": "recipe",
    "default_compute_dtype": "recipe", "cache_dir": "paths", "REPO_ROOT": "paths", "atomic_write_text": "paths",
    "MemoryMeter": "measure", "GPUS": "budget", "LABS_DIR": "paths", "GENERAL_QUESTION": "data", "wilson": "stats",
    "evaluate": "evals", "generate_answers": "evals", "answer_logits": "evals", "perplexity": "evals",
}
GONE = ["QUANT_TYPES", "QUANTS", "Shape", "linear_shapes", "arch_config", "REPO_DATA_DIR"]


def _defined(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
    return names


def _imports(tree: ast.Module) -> set[str]:
    """qlora_lab modules this module imports, anywhere in it (functions included)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qlora_lab"):
            found |= {a.name for a in node.names} if node.module == "qlora_lab" else {node.module.split(".")[1]}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("qlora_lab.")}
    return found & set(MODULES)


def test_each_concept_has_one_owner():
    defined = {name: _defined(tree) for name, tree in MODULES.items()}
    for concept, owner in OWNERS.items():
        assert [m for m, names in defined.items() if concept in names] == [owner], concept
    for gone in GONE:
        assert not [m for m, names in defined.items() if gone in names], f"{gone} is defined again"


def test_no_import_cycle():
    graph = {name: _imports(tree) - {name} for name, tree in MODULES.items() if name != "__main__"}
    state = {}

    def visit(node, trail):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", "import cycle: " + " -> ".join(trail + [node])
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, trail + [node])
        state[node] = "done"

    for node in graph:
        visit(node, [])


def test_functions_fit_on_a_screen_and_modules_stay_small():
    for name, tree in MODULES.items():
        assert len((PACKAGE / f"{name}.py").read_text().splitlines()) <= 600, name
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= 80, f"{name}.{node.name} has {length} lines"
    checker = next(n for n in ast.walk(MODULES["checks"]) if getattr(n, "name", "") == "check_only_lora_trains")
    assert checker.end_lineno - checker.lineno + 1 < 40


def test_every_module_and_public_function_says_what_it_does():
    for name, tree in MODULES.items():
        assert ast.get_docstring(tree), f"{name} has no module docstring"
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                assert ast.get_docstring(node), f"{name}.{node.name} has no docstring"

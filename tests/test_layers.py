"""The package's layers point one way: errors/sharding <- ops, kernels <- parallel <- models <- the rest
(training, CLI, checkpoints, drop-in, planner). Walks every import (module level and inside functions)
with ``ast``: an import of a higher layer, or an import cycle between modules, fails with its place."""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")

LAYERS = {  # module prefix -> layer; the longest matching prefix wins
    "gptpar.errors": 0,
    "gptpar.sharding": 0,
    "gptpar._native": 0,
    "gptpar._C": 0,  # the compiled extension
    "gptpar.kernels": 1,
    "gptpar.ops": 1,
    "gptpar.parallel": 2,
    "gptpar.models": 3,
    "gptpar": 4,
}


def layer(mod: str) -> int:
    best = max((p for p in LAYERS if mod == p or mod.startswith(p + ".")), key=len)
    return LAYERS[best]


def modules() -> dict[str, str]:
    out = {}
    for pkg, base in (("gptpar", os.path.join(ROOT, "gptpar")), ("gptpar.kernels", os.path.join(ROOT, "kernels"))):
        for dirpath, _, files in os.walk(base):
            for f in files:
                if not f.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, f), base)[:-3].replace(os.sep, ".")
                name = pkg if rel == "__init__" else f"{pkg}.{rel.removesuffix('.__init__')}"
                if pkg == "gptpar" and name.startswith("gptpar.kernels"):
                    continue
                out[name] = os.path.join(dirpath, f)
    out["gptpar._C"] = ""  # compiled, imports nothing of gptpar
    return out


def imports_of(name: str, path: str, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported gptpar module, line, at module level) for every import in the file."""
    if not path:
        return []
    tree = ast.parse(open(path).read())
    top = {id(n) for n in tree.body}
    found = []
    is_pkg = path.endswith("__init__.py")
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = name.split(".")
                base = parts if is_pkg else parts[:-1]
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            if t == "gptpar" or t.startswith("gptpar."):
                while t not in known and "." in t:
                    t = t.rsplit(".", 1)[0]
                found.append((t, node.lineno, id(node) in top))
    return found


def test_no_module_imports_a_higher_layer():
    mods = modules()
    bad = []
    for name, path in mods.items():
        for target, line, _ in imports_of(name, path, set(mods)):
            if layer(target) > layer(name):
                bad.append(
                    f"{os.path.relpath(path, ROOT)}:{line} ({name}, layer {layer(name)}) imports {target} "
                    f"(layer {layer(target)})"
                )
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_cycles_between_modules():
    mods = modules()
    graph = {
        n: {t for t, _, _ in imports_of(n, p, set(mods)) if t != n and not n.startswith(t + ".")}
        for n, p in mods.items()
    }  # a package's own __init__ is not a cycle
    cycles = []
    state: dict[str, int] = {}

    def visit(n, stack):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if m not in graph or (n == "gptpar" or m == "gptpar"):
                continue
            if state.get(m) == 1:
                cycles.append(" -> ".join(stack[stack.index(m) :] + [m]))
            elif m not in state:
                visit(m, stack)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("mod", ["gptpar"])
def test_import_gptpar_is_cheap(mod):
    import subprocess
    import sys

    code = (
        f"import sys, {mod}; heavy = [m for m in ('transformers', 'triton', 'safetensors', 'numpy.f2py') "
        "if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_the_reference_model_is_free_of_parallel_code():
    mods = modules()
    for name in ("gptpar.models.gpt", "gptpar.sharding"):
        got = [t for t, _, _ in imports_of(name, mods[name], set(mods)) if t.startswith("gptpar.parallel")]
        assert not got, f"{name} imports {got}"

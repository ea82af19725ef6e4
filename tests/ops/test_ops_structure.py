"""The ops layer's shape: importing it leaves transformers out, its modules import one way (no
cycle, none hidden in a function), `cur_linear` is one thing, and each file says its job."""

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import curkernels.ops
from curkernels.ops import cur_linear

OPS = Path(curkernels.ops.__file__).parent
FILES = sorted(OPS.rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = ("curkernels", "ops", *path.relative_to(OPS).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path) for path in FILES}


def _imported(path: Path, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The curkernels modules an import statement of `path` names."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.startswith("curkernels")]
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    if node.level:
        package = package[:len(package) - node.level + 1]
        base = ".".join(package + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    if not base.startswith("curkernels"):
        return []
    # `from package import module` names a module; `from module import name` the module
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
            for alias in node.names]


def test_importing_ops_leaves_transformers_unimported():
    code = ("import sys, curkernels.ops; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, check=True)
    assert result.stdout.strip() == "[]"


def test_cur_linear_is_the_function_not_also_a_module():
    assert callable(cur_linear) and cur_linear.__module__ == "curkernels.ops.op"
    assert importlib.util.find_spec("curkernels.ops.cur_linear") is None


def test_ops_modules_import_without_cycles_and_at_module_level():
    graph, hidden = {}, []
    for path in FILES:
        tree = ast.parse(path.read_text())
        name = _module_name(path)
        graph[name] = {target for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)
                       for target in _imported(path, node)
                       if target.startswith("curkernels.ops.") and target != name}
        for function in ast.walk(tree):
            if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                hidden += [f"{name}.{function.name}" for node in ast.walk(function)
                           if isinstance(node, ast.Import | ast.ImportFrom)
                           and _imported(path, node)]
    assert not hidden, f"curkernels imported inside functions: {hidden}"
    done, stack = set(), []

    def visit(module: str) -> None:
        assert module not in stack, f"import cycle: {' -> '.join([*stack, module])}"
        if module in done or module not in graph:
            return
        stack.append(module)
        for target in sorted(graph[module]):
            visit(target)
        stack.pop()
        done.add(module)
    for module in graph:
        visit(module)


def test_every_ops_file_says_its_job_on_its_first_line():
    for path in FILES:
        first = path.read_text().splitlines()[0]
        assert first.startswith('"""') and len(first) > 12, f"{path}: {first!r}"

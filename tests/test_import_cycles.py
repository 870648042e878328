"""The package's imports go one way: no cycles (imports inside functions included), imports inside
functions only of optional dependencies, and the library never imports the commands."""
import ast
import os
from typing import Dict, List, Set, Tuple

import dynamixer

PACKAGE_DIR = os.path.dirname(dynamixer.__file__)
# what may be imported inside a function: the optional dependencies (ground rules) and modules
# that are slow to import for a command that rarely needs them
OPTIONAL = {'onnx', 'onnxruntime', 'onnxscript', 'triton', 'huggingface_hub', 'matplotlib', 'sklearn',
            'torchvision', 'tensorboard', 'torch.utils.tensorboard', 'PIL', 'importlib'}


def _modules() -> Dict[str, str]:
    mods = {}
    for root, _, files in os.walk(PACKAGE_DIR):
        for f in files:
            if f.endswith('.py'):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, os.path.dirname(PACKAGE_DIR))[:-3].replace(os.sep, '.')
                mods[rel[:-len('.__init__')] if rel.endswith('.__init__') else rel] = path
    return mods


def _imports(name: str, path: str, mods: Dict[str, str]) -> List[Tuple[str, bool, str]]:
    """(imported package module or external name, inside a function?, the import's text) per import."""
    package = name if path.endswith('__init__.py') else name.rpartition('.')[0]
    tree = ast.parse(open(path).read())
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append((alias.name, inner, ast.unparse(child)))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package
                    for _ in range(child.level - 1):
                        base = base.rpartition('.')[0]
                    module = f'{base}.{child.module}' if child.module else base
                else:
                    module = child.module or ''
                # `from .pkg import name`: the name may itself be a module
                targets = [f'{module}.{a.name}' for a in child.names if f'{module}.{a.name}' in mods]
                found.extend((t, inner, ast.unparse(child)) for t in targets or [module])
            visit(child, inner)
    visit(tree, False)
    return found


def _graph() -> Tuple[Dict[str, Set[str]], List[Tuple[str, str]]]:
    mods = _modules()
    graph: Dict[str, Set[str]] = {m: set() for m in mods}
    in_functions = []
    for name, path in mods.items():
        for target, inner, text in _imports(name, path, mods):
            while target and target not in mods and '.' in target:
                target = target.rpartition('.')[0]
            if target in mods:
                # a package's __init__ only re-exports: an import of it from inside that package is
                # an import of the submodule it names, resolved above
                if target != name and not (name.startswith(target + '.') and mods[target].endswith('__init__.py')):
                    graph[name].add(target)
                if inner:
                    in_functions.append((name, text))
            elif inner and target.split('.')[0] not in {o.split('.')[0] for o in OPTIONAL} and target not in OPTIONAL:
                in_functions.append((name, text))
    return graph, in_functions


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            connect(v)
    return out


def test_resolves_relative_and_function_level_imports():
    graph, _ = _graph()
    assert 'dynamixer.ops.dispatch' in graph['dynamixer.model'] and 'dynamixer.layout' in graph['dynamixer.model']
    assert 'dynamixer.ops.mixing' in graph['dynamixer.ops.dispatch']
    assert 'dynamixer.files' in graph['dynamixer.checkpoint']


def test_no_import_cycles():
    graph, _ = _graph()
    assert not _cycles(graph)


def test_imports_inside_functions_are_optional_dependencies_only():
    _, in_functions = _graph()
    assert not in_functions, in_functions


def test_the_library_never_imports_the_commands():
    """Commands (dynamixer.commands.*) use the library, never the other way round; only the command
    line (cli.py, __main__.py) loads them."""
    graph, _ = _graph()
    commands = {m for m in graph if m == 'dynamixer.commands' or m.startswith('dynamixer.commands.')}
    assert 'dynamixer.commands.train' in commands
    wrong = sorted((m, t) for m in graph if m not in commands and m not in ('dynamixer.cli', 'dynamixer.__main__')
                   for t in graph[m] if t in commands)
    assert not wrong, wrong

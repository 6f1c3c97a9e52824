"""The package's imports run one way (docs/DESIGN.md, "Layers"), checked from the source.

Each module belongs to a layer; it may import its own layer and the layers below,
never above, and no import of the package hides inside a function (a lazy import is
how a cycle gets dodged). Parsed with `ast`, so nothing is imported to check it.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'rustgpt_jax'

# Lowest first. A name is a module or package under rustgpt_jax; the longest match wins.
LAYERS = [
    ('leaves', ['masks', 'axes', 'config', 'param_counts', 'data']),
    ('ops', ['ops', 'quant']),
    ('kernels', ['kernels', 'native']),
    ('runtime', ['runtime']),
    ('adaptive', ['adaptive']),
    ('nn', ['nn']),
    ('models', ['arch', 'models', 'summary', 'sharding']),
    ('services', ['training', 'decoding', 'interop']),
    ('entry points', ['train', 'demo', 'export', 'cli_errors', 'decoding.cli', 'experiments',
                      '__init__']),
]
RANK = {name: rank for rank, (_, names) in enumerate(LAYERS) for name in names}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix('').parts
    if parts[-1] == '__init__' and len(parts) > 1:
        parts = parts[:-1]
    return '.'.join(parts)


def _rank(module: str) -> int:
    parts = module.split('.')
    for end in range(len(parts), 0, -1):
        name = '.'.join(parts[:end])
        if name in RANK:
            return RANK[name]
    raise AssertionError(f'rustgpt_jax.{module} is in no layer of tests/test_import_layers.py')


def _imports(tree: ast.AST, module: str, is_package: bool):
    """(imported module under rustgpt_jax, node) for every import of the package."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith('rustgpt_jax.'):
                    yield alias.name[len('rustgpt_jax.'):], node
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:  # relative: resolve against this module's package
                here = module.split('.') if is_package else module.split('.')[:-1]
                here = here[:len(here) - node.level + 1]
                base = '.'.join(here + ([base] if base else []))
            elif base == 'rustgpt_jax':
                base = ''
            elif base.startswith('rustgpt_jax.'):
                base = base[len('rustgpt_jax.'):]
            else:
                continue
            for alias in node.names:  # `from rustgpt_jax.ops import blocked` -> ops.blocked
                target = f'{base}.{alias.name}' if base else alias.name
                yield target, node


def _sources():
    return sorted(p for p in PACKAGE.rglob('*.py'))


def _parsed():
    for path in _sources():
        module = _module_name(path)
        yield path, module, ast.parse(path.read_text(), str(path))


def test_every_module_is_in_a_layer():
    for path, module, _ in _parsed():
        _rank(module)


def test_imports_never_reach_a_higher_layer():
    wrong = []
    for path, module, tree in _parsed():
        own = _rank(module)
        for target, node in _imports(tree, module, path.name == '__init__.py'):
            if _rank(target) > own:
                wrong.append(f'{path.relative_to(PACKAGE.parent)}:{node.lineno}: '
                             f'{module} ({LAYERS[own][0]}) imports {target} '
                             f'({LAYERS[_rank(target)][0]})')
    assert not wrong, 'imports against the layer order:\n' + '\n'.join(wrong)


def test_no_import_of_the_package_inside_a_function():
    lazy = []
    for path, module, tree in _parsed():
        for func in ast.walk(tree):
            if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for target, node in _imports(func, module, path.name == '__init__.py'):
                    lazy.append(f'{path.relative_to(PACKAGE.parent)}:{node.lineno}: {target}')
    assert not lazy, 'imports inside functions:\n' + '\n'.join(lazy)


def test_module_graph_has_no_cycle():
    modules = {module: (path, tree) for path, module, tree in _parsed()}
    graph = {}
    for module, (path, tree) in modules.items():
        deps = set()
        for target, _ in _imports(tree, module, path.name == '__init__.py'):
            while target and target not in modules:  # `from pkg import name` -> pkg
                target = target.rpartition('.')[0]
            if target and target != module:
                deps.add(target)
        graph[module] = deps
    state = {}

    def visit(node, trail):
        if state.get(node) == 'done':
            return
        if state.get(node) == 'open':
            cycle = trail[trail.index(node):] + [node]
            pytest.fail('import cycle: ' + ' -> '.join(cycle))
        state[node] = 'open'
        for dep in sorted(graph[node]):
            visit(dep, trail + [node])
        state[node] = 'done'

    for module in sorted(graph):
        visit(module, [])


def test_the_checker_sees_violations():
    # The parser on a known-bad snippet: an upward import and a lazy one.
    tree = ast.parse('from rustgpt_jax.training import loop\n'
                     'def f():\n    from rustgpt_jax import decoding\n')
    found = [target for target, _ in _imports(tree, 'nn.attention', False)]
    assert found == ['training.loop', 'decoding']
    assert _rank('training.loop') > _rank('nn.attention')

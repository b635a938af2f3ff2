"""The package's rooms: no import cycle, arrows pointing down only, no hidden function-level imports."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / 'src' / 'crossformer'
OPTIONAL = ('matplotlib', 'sklearn', 'transformers', 'peft')  # extras, imported where they are used


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _imports(path: Path):
    """(imported crossformer module, at module level?) for every import statement of a file."""
    name = _module_name(path)
    package = name if path.name == '__init__.py' else name.rpartition('.')[0]
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                anchor = package.split('.')[:len(package.split('.')) - node.level + 1]
                base = '.'.join(anchor + ([base] if base else []))
            targets = [base] + [f'{base}.{a.name}' for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        yield targets, id(node) in top_level, node


MODULES = {_module_name(p): p for p in PACKAGE.rglob('*.py')}


def _graph():
    graph = {}
    for name, path in MODULES.items():
        graph[name] = {t for targets, _, _ in _imports(path) for t in targets if t in MODULES and t != name}
    return graph


def test_no_import_cycles():
    graph, state, stack = _graph(), {}, []

    def visit(node):
        state[node] = 'open'
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 'open':
                raise AssertionError('import cycle: ' + ' -> '.join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 'done'

    for node in graph:
        if node not in state:
            visit(node)


def _reaches(graph, start):
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


@pytest.mark.parametrize('lower, never', [
    ('crossformer.layers', ('crossformer.models', 'crossformer.train', 'crossformer.cli', 'crossformer.predict')),
    ('crossformer.models', ('crossformer.train', 'crossformer.cli', 'crossformer.predict', 'crossformer.hub')),
    ('crossformer.weights', ('crossformer.models', 'crossformer.layers', 'crossformer.train')),
    ('crossformer.readers', ('crossformer.models', 'crossformer.layers', 'crossformer.weights')),
    # inside the readers: the zip parser knows nothing of pickles, the pickle machine nothing of files or tensors
    ('crossformer.readers.zip_archive', ('crossformer.readers.values', 'crossformer.readers.pickle_machine',
                                         'crossformer.readers.tensors')),
    ('crossformer.readers.pickle_machine', ('crossformer.readers.zip_archive', 'crossformer.readers.tensors',
                                            'crossformer.readers.torch_file')),
    ('crossformer.predict', ('crossformer.train', 'crossformer.cli')),
    ('crossformer.detection', ('crossformer.train', 'crossformer.cli')),
    # inside the speed-ups, from the bottom: gates, caches, tuning, products, mixins, switch
    ('crossformer.layers.speedups.gates', ('crossformer.layers.speedups.caches', 'crossformer.layers.speedups.tuning',
                                           'crossformer.layers.speedups.products', 'crossformer.layers.speedups.mixins')),
    ('crossformer.layers.speedups.tuning', ('crossformer.layers.speedups.products', 'crossformer.layers.speedups.mixins',
                                            'crossformer.layers.speedups.caches', 'crossformer.layers.speedups.gates')),
    ('crossformer.layers.speedups.products', ('crossformer.layers.speedups.mixins', 'crossformer.layers.speedups.switch')),
])
def test_arrows_point_down(lower, never):
    graph = _graph()
    for name in [m for m in graph if m == lower or m.startswith(lower + '.')]:
        reached = _reaches(graph, name)
        bad = sorted(m for m in reached if m.startswith(never))
        assert not bad, f'{name} imports {bad}'


def test_function_level_imports_only_for_optional_extras():
    hidden = []
    for name, path in MODULES.items():
        for targets, top, node in _imports(path):
            if not top and targets[0].split('.')[0] not in OPTIONAL:
                hidden.append(f'{name}:{node.lineno} {targets[0]}')
    assert not hidden, hidden


def test_speedup_modules_stay_small():
    """One room per concern: no module of the speed-ups package over 520 lines."""
    sizes = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()
             if name.startswith('crossformer.layers.speedups')}
    assert len(sizes) >= 6 and max(sizes.values()) <= 520, sizes

"""The layering the README promises: the support packages import nothing from the top level, and
the imports between packages run one way (runs <- sources <- pretrained, metrics, decoding)."""
import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP_LEVEL = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, '*.py'))}
MAY_IMPORT = {'runs': set(), 'sources': {'runs'}, 'pretrained': {'runs', 'sources'},
              'metrics': {'runs', 'sources'}, 'decoding': {'runs', 'sources'}}


def imported_modules(path):
    for node in ast.walk(ast.parse(open(path, encoding='utf-8').read())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module


def test_packages_import_nothing_from_the_top_level_and_only_the_packages_below_them():
    assert TOP_LEVEL >= {'prior_loss', 'reference', 'model', 'data', 'train'} and len(TOP_LEVEL) <= 10
    for package, allowed in MAY_IMPORT.items():
        for path in glob.glob(os.path.join(ROOT, package, '*.py')):
            for module in imported_modules(path):
                first = module.split('.')[0]
                assert first not in TOP_LEVEL, f"{path} imports the top-level {module}"
                assert first not in MAY_IMPORT or first in allowed | {package}, f"{path} imports {module}"

"""The package as installed: every package folder listed, configs by name, no import cycle."""

import ast
import os
import subprocess
import sys
import tomllib

from absl import flags
import pytest

from vpr_jax import errors
from vpr_jax.cli import common

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_package_folder_is_listed_in_pyproject():
  with open(os.path.join(REPO_ROOT, 'pyproject.toml'), 'rb') as f:
    listed = set(tomllib.load(f)['tool']['setuptools']['packages'])
  found = {'vpr_jax.configs'}
  for folder, _, files in os.walk(os.path.join(REPO_ROOT, 'vpr_jax')):
    if '__init__.py' in files:
      found.add(os.path.relpath(folder, REPO_ROOT).replace(os.sep, '.'))
  assert listed == found


def test_configs_by_name_from_any_folder(tmp_path):
  assert {'default', 'demo', 'mixvpr', 'gem'} <= set(common.packaged_config_names())
  path = common.resolve_config_path('mixvpr')
  assert path.endswith(os.path.join('configs', 'mixvpr.py')) and os.path.isfile(path)
  # A packaged config imports the default one through the package, not through the cwd.
  code = ('from vpr_jax.cli import common; import runpy; '
          'print(runpy.run_path(common.resolve_config_path("mixvpr_r50"))["get_config"]()'
          '.model.backbone)')
  out = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True,
                       text=True, check=True)
  assert out.stdout.strip() == 'resnet50'


def test_unknown_config_name_lists_the_packaged_ones(tmp_path):
  with pytest.raises(errors.ConfigError, match='did you mean mixvpr'):
    common.resolve_config_path('mixvrp')
  with pytest.raises(errors.ConfigError, match='packaged configs: .*demo'):
    common.resolve_config_path('nothing_like_it')
  own = tmp_path / 'mine.py'
  own.write_text('def get_config():\n  return None\n')
  assert common.resolve_config_path(str(own)) == str(own)
  registry = flags.FlagValues()
  flags.DEFINE_string('config', None, 'a config', flag_values=registry)
  argv = common.rewrite_argv(['train', '--config', 'demo', '--config.seed=3'], registry)
  assert argv[2].endswith(os.path.join('configs', 'demo.py')) and argv[3] == '--config.seed=3'


def _module_imports(path: str, package_modules: set[str]) -> tuple[set[str], list[str]]:
  """(vpr_jax modules imported at the top level, imports made inside functions)."""
  tree = ast.parse(open(path).read())
  top, inner = set(), []

  def names(node):
    if isinstance(node, ast.Import):
      return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.module:
      return [f'{node.module}.{a.name}' if f'{node.module}.{a.name}' in package_modules
              else node.module for a in node.names]
    return []

  for node in tree.body:
    top.update(n for n in names(node) if n.startswith('vpr_jax'))
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      for inner_node in ast.walk(node):
        inner.extend(names(inner_node))
  return top, inner


def test_no_import_cycle_and_no_import_inside_functions():
  modules = {}
  for folder, _, files in os.walk(os.path.join(REPO_ROOT, 'vpr_jax')):
    for name in files:
      if name.endswith('.py'):
        rel = os.path.relpath(os.path.join(folder, name), REPO_ROOT)[:-3].replace(os.sep, '.')
        modules[rel.removesuffix('.__init__')] = os.path.join(folder, name)
  graph, inner_imports = {}, {}
  for module, path in modules.items():
    top, inner = _module_imports(path, set(modules))
    graph[module] = {m for m in top if m in modules and m != module}
    if inner:
      inner_imports[module] = inner
  # Imports inside functions only for optional dependencies (none of vpr_jax's own modules).
  assert not {m: [n for n in names if n.startswith('vpr_jax')]
              for m, names in inner_imports.items()
              if any(n.startswith('vpr_jax') for n in names)}
  # Depth-first search for a cycle (package __init__ modules import nothing of their own).
  state = {}

  def visit(module, trail):
    state[module] = 'open'
    for dep in sorted(graph[module]):
      if state.get(dep) == 'open':
        raise AssertionError('import cycle: ' + ' -> '.join(trail + [module, dep]))
      if dep not in state:
        visit(dep, trail + [module])
    state[module] = 'done'

  for module in sorted(graph):
    if module not in state:
      visit(module, [])


# Documented public APIs whose names start with an underscore.
_PUBLIC_UNDERSCORE_NAMES = frozenset({'os._exit'})


def test_no_private_name_used_across_modules():
  pattern_hits = []
  for folder, _, files in os.walk(os.path.join(REPO_ROOT, 'vpr_jax')):
    for name in files:
      if not name.endswith('.py'):
        continue
      tree = ast.parse(open(os.path.join(folder, name)).read())
      imported = {a.asname or a.name.split('.')[-1] for node in ast.walk(tree)
                  if isinstance(node, (ast.Import, ast.ImportFrom)) for a in node.names}
      for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith('_')
            and not node.attr.startswith('__') and isinstance(node.value, ast.Name)
            and node.value.id in imported
            and f'{node.value.id}.{node.attr}' not in _PUBLIC_UNDERSCORE_NAMES):
          pattern_hits.append(f'{name}: {node.value.id}.{node.attr}')
        if isinstance(node, ast.ImportFrom) and any(a.name.startswith('_') for a in node.names):
          pattern_hits.append(f'{name}: from {node.module} import a private name')
  assert not pattern_hits

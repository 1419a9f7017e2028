"""The README's code map names the package's real modules, and every module is in it."""

import os
import re

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NAME = re.compile(r'^[a-z0-9_]+(\.py|/)$')


def _module_tree_block() -> list[str]:
  """The lines of the fenced block after 'Every module:' in the README."""
  text = open(os.path.join(REPO_ROOT, 'README.md'), encoding='utf-8').read()
  after = text.split('Every module:', 1)[1]
  return after.split('```', 2)[1].splitlines()


def _mapped_paths(lines: list[str]) -> set[str]:
  """Paths named by the tree: a name's folder is the closest line above it one level up.

  Lines that continue a description are indented further than any name and are skipped.
  """
  parents = {1: 'vpr_jax'}
  found = set()
  for line in lines:
    stripped = line.lstrip(' ')
    depth = (len(line) - len(stripped)) // 2
    if not stripped or stripped == 'vpr_jax/' or depth not in parents:
      continue
    names = []
    for token in stripped.split(' '):
      if not _NAME.match(token):
        break
      names.append(token)
    for name in names:
      path = parents[depth] + '/' + name.rstrip('/')
      found.add(path)
      if name.endswith('/'):
        parents[depth + 1] = path
        for deeper in [d for d in parents if d > depth + 1]:
          del parents[deeper]
  return found


def _package_paths() -> set[str]:
  paths = set()
  for folder, dirs, files in os.walk(os.path.join(REPO_ROOT, 'vpr_jax')):
    dirs[:] = [d for d in dirs if d != '__pycache__']
    rel = os.path.relpath(folder, REPO_ROOT).replace(os.sep, '/')
    if rel != 'vpr_jax':
      paths.add(rel)
    paths.update(f'{rel}/{f}' for f in files if f.endswith('.py') and f != '__init__.py')
  return paths


def test_parser_reads_nested_folders():
  lines = ['vpr_jax/', '  a.py b.py   two modules', '                 a.py continued',
           '  data/               x', '    sub/', '      c.py  y', '    d.py  z', '  e.py']
  assert _mapped_paths(lines) == {'vpr_jax/a.py', 'vpr_jax/b.py', 'vpr_jax/data',
                                  'vpr_jax/data/sub', 'vpr_jax/data/sub/c.py',
                                  'vpr_jax/data/d.py', 'vpr_jax/e.py'}


def test_every_mapped_module_exists_and_every_module_is_mapped():
  mapped = _mapped_paths(_module_tree_block())
  real = _package_paths()
  assert not sorted(mapped - real), 'the code map names modules that do not exist'
  assert not sorted(real - mapped), 'modules missing from the code map'

"""hloc's retrieval files: `vpr_jax.index/localize --hloc-features`, `--pairs`.

The oracle is hloc's own code path for retrieval, written here from cvg/Hierarchical-Localization
(hloc/utils/io.py `list_h5_names`, hloc/pairs_from_retrieval.py `get_descriptors`,
`pairs_from_score_matrix`, `main`), run on the files vpr_jax writes: it must choose the pairs
that vpr_jax wrote.
"""

import os
import shutil
import subprocess
import sys

import h5py
import jax
import numpy as np
import pytest

from tests import test_localization
from vpr_jax.checkpoints import orbax_states
from vpr_jax.cli import localize as localize_cli
from vpr_jax.localization import hloc
from vpr_jax.localization import hloc_io
from vpr_jax.localization import store
from vpr_jax.models import vpr_model

torch = pytest.importorskip('torch', reason='hloc computes the scores with torch')

REPO_ROOT = test_localization.REPO_ROOT
SF_XS_MINI = test_localization.SF_XS_MINI
pytestmark = pytest.mark.skipif(not os.path.isdir(SF_XS_MINI),
                                reason=f'real test photos not found at {SF_XS_MINI}')


# ----------------------------------------------------------------------------------------------
# hloc's retrieval, as hloc/pairs_from_retrieval.py runs it (the parts main() uses by default).


def hloc_list_h5_names(path):
  names = []
  with h5py.File(str(path), 'r', libver='latest') as fd:

    def visit_fn(_, obj):
      if isinstance(obj, h5py.Dataset):
        names.append(obj.parent.name.strip('/'))

    fd.visititems(visit_fn)
  return list(set(names))


def hloc_get_descriptors(names, path, name2idx=None, key='global_descriptor'):
  if name2idx is None:
    with h5py.File(str(path), 'r', libver='latest') as fd:
      desc = [fd[n][key].__array__() for n in names]
  else:
    desc = []
    for n in names:
      with h5py.File(str(path[name2idx[n]]), 'r', libver='latest') as fd:
        desc.append(fd[n][key].__array__())
  return torch.from_numpy(np.stack(desc, 0)).float()


def hloc_pairs_from_score_matrix(scores, invalid, num_select, min_score=None):
  assert scores.shape == invalid.shape
  invalid = torch.from_numpy(invalid).to(scores.device)
  if min_score is not None:
    invalid |= scores < min_score
  scores.masked_fill_(invalid, float('-inf'))
  topk = torch.topk(scores, num_select, dim=1)
  indices = topk.indices.cpu().numpy()
  valid = topk.values.isfinite().cpu().numpy()
  pairs = []
  for i, j in zip(*np.where(valid)):
    pairs.append((i, indices[i, j]))
  return pairs


def hloc_pairs_from_retrieval(descriptors, output, num_matched, db_descriptors=None):
  """hloc's pairs_from_retrieval.main without query/db prefixes, lists or a COLMAP model."""
  if db_descriptors is None:
    db_descriptors = descriptors
  db_descriptors = [db_descriptors]
  name2db = {n: i for i, p in enumerate(db_descriptors) for n in hloc_list_h5_names(p)}
  db_names = list(name2db.keys())
  query_names = hloc_list_h5_names(descriptors)
  db_desc = hloc_get_descriptors(db_names, db_descriptors, name2db)
  query_desc = hloc_get_descriptors(query_names, descriptors)
  sim = torch.einsum('id,jd->ij', query_desc, db_desc)
  self = np.array(query_names)[:, None] == np.array(db_names)[None]
  pairs = hloc_pairs_from_score_matrix(sim, self, num_matched, min_score=0)
  pairs = [(query_names[i], db_names[j]) for i, j in pairs]
  with open(output, 'w') as f:
    f.write('\n'.join(' '.join([i, j]) for i, j in pairs))


# ----------------------------------------------------------------------------------------------


def test_the_rule_is_hlocs_on_awkward_descriptors(tmp_path):
  """Negative scores, self-matches, ties of names across folders, float16 files, k > matches."""
  rng = np.random.default_rng(0)
  db_names = [f'db/{i:02d}.jpg' for i in range(12)] + ['q/a.jpg']
  query_names = ['q/a.jpg', 'q/b.jpg', 'q/c.png', 'db/03.jpg']
  for half in (False, True):
    db = rng.standard_normal((len(db_names), 8)).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    queries = rng.standard_normal((len(query_names), 8)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    sizes = [np.array([640, 480])] * 13
    db_file, query_file = tmp_path / f'db{half}.h5', tmp_path / f'q{half}.h5'
    hloc_io.write_global_features(str(db_file), db_names, db, sizes, half=half)
    hloc_io.write_global_features(str(query_file), query_names, queries, sizes[:4], half=half)
    stored_db = db.astype(np.float16) if half else db
    stored_queries = queries.astype(np.float16) if half else queries
    for k in (1, 5, 13):
      ours = hloc_io.pairs_from_retrieval(query_names, stored_queries, db_names, stored_db, k)
      theirs_file = tmp_path / 'theirs.txt'
      hloc_pairs_from_retrieval(query_file, theirs_file, k, db_descriptors=db_file)
      ours_file = tmp_path / 'ours.txt'
      ours_file.write_text(hloc_io.pairs_text(ours))
      assert hloc_io.read_pairs(str(ours_file)) == hloc_io.read_pairs(str(theirs_file))
    # The rule did drop pairs: negatives and the two self-matches.
    assert len(ours) < len(query_names) * 13
    assert ('q/a.jpg', 'q/a.jpg') not in ours and ('db/03.jpg', 'db/03.jpg') not in ours


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
  config = test_localization.tiny_config()
  model = vpr_model.build_model(config)
  variables = jax.tree.map(np.asarray, vpr_model.init_variables(model, jax.random.PRNGKey(0)))
  return orbax_states.save_inference_checkpoint(
      str(tmp_path_factory.mktemp('hloc') / 'checkpoint'), config, variables)


def _h5_tree(path):
  """{name: {dataset: array}} of a features file, and its root attributes."""
  tree = {}
  with h5py.File(path, 'r') as f:
    def visit(name, obj):
      if isinstance(obj, h5py.Dataset):
        group, dataset = name.rsplit('/', 1)
        tree.setdefault(group, {})[dataset] = obj[()]
    f.visititems(visit)
    attrs = dict(f.attrs)
  return tree, attrs


@pytest.mark.parametrize('half', [False, True])
def test_hloc_reads_the_index_and_the_queries_and_agrees_with_localize(half, checkpoint,
                                                                        tmp_path):
  root = tmp_path / 'images'
  shutil.copytree(SF_XS_MINI, root / 'all')
  database = root / 'all' / 'database'
  index, db_file = tmp_path / 'index', tmp_path / 'db.h5'
  hloc.build_index_and_features(str(db_file), checkpoint, str(database), str(index), half=half,
                                batch_size=8, show_progress=False, print_fn=lambda _: None)
  manifest = store.read_manifest(str(index))
  rows = store.read_rows(str(index), manifest)
  tree, attrs = _h5_tree(db_file)
  assert attrs[hloc_io.WRITTEN_BY_ATTR] == hloc_io.WRITTEN_BY
  assert sorted(tree) == sorted(rows.paths) == sorted(os.listdir(database))
  for row, name in enumerate(rows.paths):
    assert tree[name]['global_descriptor'].dtype == (np.float16 if half else np.float32)
    np.testing.assert_array_equal(tree[name]['global_descriptor'], rows.descriptors[row])
    np.testing.assert_array_equal(tree[name]['image_size'], [226, 225])  # width, height

  # Queries: the later views, named relative to the folder that holds them.
  queries = sorted(str(p) for p in (root / 'all' / 'queries').iterdir())
  query_file, pairs_file = tmp_path / 'q.h5', tmp_path / 'pairs.txt'
  results = localize_cli.localize(str(index), queries, 3, None, None,
                                  hloc_features=str(query_file), pairs=str(pairs_file))
  theirs_file = tmp_path / 'theirs.txt'
  hloc_pairs_from_retrieval(query_file, theirs_file, 3, db_descriptors=db_file)
  ours = hloc_io.read_pairs(str(pairs_file))
  assert ours == hloc_io.read_pairs(str(theirs_file))
  assert sorted(ours) == sorted(os.path.basename(q) for q in queries)
  # The pairs are localize's matches: on unit descriptors, L2 order is inner-product order.
  for query, result in zip(queries, results):
    assert ours[os.path.basename(query)] == [m.image for m in result.matches]

  # The database as queries (hloc's pairs for mapping): named as in the index, so no image is
  # paired with itself.
  self_file, self_pairs = tmp_path / 'self.h5', tmp_path / 'self.txt'
  photos = sorted(str(p) for p in database.iterdir())
  localize_cli.localize(str(index), photos, 4, None, None, hloc_features=str(self_file),
                        pairs=str(self_pairs))
  hloc_pairs_from_retrieval(self_file, theirs_file, 4, db_descriptors=db_file)
  ours = hloc_io.read_pairs(str(self_pairs))
  assert ours == hloc_io.read_pairs(str(theirs_file))
  assert all(query not in found for query, found in ours.items())
  assert sorted(ours) == sorted(rows.paths)

  # A rerun replaces the files it wrote.
  localize_cli.localize(str(index), photos[:2], 2, None, None, hloc_features=str(self_file),
                        pairs=str(self_pairs))
  assert sorted(hloc_io.read_pairs(str(self_pairs))) == sorted(rows.paths[:2])


def _run(module, *args):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO_ROOT)
  env.pop('XLA_FLAGS', None)
  return subprocess.run([sys.executable, '-m', module, *map(str, args)], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def _one_line_error(result, *texts):
  assert result.returncode == 1, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  for text in texts:
    assert text in lines[0], (text, lines[0])


def test_cli_writes_hloc_files_and_refuses_files_it_did_not_write(checkpoint, tmp_path):
  database = tmp_path / 'sf' / 'database'
  shutil.copytree(os.path.join(SF_XS_MINI, 'database'), database)
  index, db_file = tmp_path / 'index', tmp_path / 'db.h5'
  result = _run('vpr_jax.index', '--checkpoint', checkpoint, '--images', database, '--out',
                index, '--hloc-features', db_file)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Wrote 20 global descriptors for hloc' in result.stdout
  photo = sorted(database.iterdir())[0]
  query_file, pairs_file = tmp_path / 'q.h5', tmp_path / 'pairs.txt'
  result = _run('vpr_jax.localize', '--index', index, '--hloc-features', query_file, '--pairs',
                pairs_file, '--top-k', '2', photo)
  assert result.returncode == 0, result.stderr[-3000:]
  assert len(pairs_file.read_text().split('\n')) == 2

  # --pairs without the features hloc reads with it.
  _one_line_error(_run('vpr_jax.localize', '--index', index, '--pairs', tmp_path / 'p2.txt',
                       photo), 'ConfigError', '--hloc-features and --pairs')
  # Files at the output paths that vpr_jax did not write: refused, untouched.
  notes = tmp_path / 'notes.txt'
  notes.write_text('mine')
  _one_line_error(_run('vpr_jax.localize', '--index', index, '--hloc-features', query_file,
                       '--pairs', notes, photo), 'OutputPathError', 'notes.txt',
                  'never replaced')
  foreign = tmp_path / 'foreign.h5'
  with h5py.File(foreign, 'w') as f:
    f.create_dataset('x', data=np.zeros(3))
  _one_line_error(_run('vpr_jax.index', '--checkpoint', checkpoint, '--images', database,
                       '--out', index, '--hloc-features', foreign), 'OutputPathError',
                  'foreign.h5', 'not written by vpr_jax')
  assert notes.read_text() == 'mine' and list(h5py.File(foreign, 'r')) == ['x']
  # A query name that hloc's pairs file cannot hold.
  spaced = tmp_path / 'my photo.jpg'
  shutil.copy(photo, spaced)
  _one_line_error(_run('vpr_jax.localize', '--index', index, '--hloc-features', query_file,
                       '--pairs', pairs_file, spaced), 'HlocFormatError', 'my photo.jpg')

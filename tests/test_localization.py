"""Localisation: index a folder of real photos, localise queries, incremental and resumed builds."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

from tests import test_eval_cli
from vpr_jax.checkpoints import orbax_states
from vpr_jax.evaluation import descriptors
from vpr_jax.evaluation import evaluate
from vpr_jax.errors import CoordinatesFileError
from vpr_jax.errors import IndexMismatchError
from vpr_jax.errors import IndexNotFoundError
from vpr_jax.localization import build
from vpr_jax.localization import coordinates
from vpr_jax.localization import embedding
from vpr_jax.localization import localizer as localizer_lib
from vpr_jax.localization import outputs
from vpr_jax.localization import store
from vpr_jax.data.imaging import images
from vpr_jax.models import vpr_model

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SF_XS_MINI = os.path.join(os.path.dirname(REPO_ROOT), 'shared', 'data', 'real', 'sf_xs_mini')
BATCH = 8

pytestmark = pytest.mark.skipif(
    not os.path.isdir(SF_XS_MINI),
    reason=f'real test photos not found at {SF_XS_MINI} (../shared/data/real/sf_xs_mini)')


def tiny_config():
  config = test_eval_cli.tiny_config()
  config.data.eval_batch_size = BATCH
  return config


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
  """Two checkpoints of the same tiny model with different weights: (a, b)."""
  root = tmp_path_factory.mktemp('checkpoints')
  config = tiny_config()
  model = vpr_model.build_model(config)
  variables = jax.tree.map(np.asarray, vpr_model.init_variables(model, jax.random.PRNGKey(0)))
  other = {'params': jax.tree.map(lambda x: x * np.float32(1.5), variables['params']),
           'batch_stats': variables['batch_stats']}
  a = orbax_states.save_inference_checkpoint(str(root / 'a'), config, variables)
  b = orbax_states.save_inference_checkpoint(str(root / 'b'), config, other)
  return a, b


@pytest.fixture()
def photos(tmp_path):
  """A writable copy of sf_xs_mini: <tmp>/sf/database (20 images) and <tmp>/sf/queries (20)."""
  root = tmp_path / 'sf'
  shutil.copytree(SF_XS_MINI, root)
  return root


def query_paths(root):
  return sorted(str(p) for p in (root / 'queries').iterdir())


class CountingEmbedder:
  """Wraps descriptors.compute_descriptors: counts embedded images, can fail on the n-th call."""

  def __init__(self, fail_on_call=None):
    self.images = 0
    self.calls = 0
    self.fail_on_call = fail_on_call
    self.wrapped = descriptors.compute_descriptors

  def __call__(self, model, variables, root, paths, *args, **kwargs):
    self.calls += 1
    if self.calls == self.fail_on_call:
      raise KeyboardInterrupt('simulated interruption')
    self.images += len(paths)
    return self.wrapped(model, variables, root, paths, *args, **kwargs)


def test_top1_agrees_with_evaluation(checkpoints, photos, tmp_path):
  checkpoint = checkpoints[0]
  index = tmp_path / 'index'
  stats = build.build_index(checkpoint, str(photos / 'database'), str(index),
                            batch_size=BATCH, show_progress=False, print_fn=lambda _: None)
  assert (stats.num_images, stats.embedded, stats.reused) == (20, 20, 0)

  results = evaluate.evaluate(checkpoint, [str(photos)], batch_size=BATCH, num_workers=0,
                                print_fn=lambda _: None)
  result = results[0]
  benchmark = result.benchmark
  localizer = localizer_lib.Localizer.from_index(str(index))
  located = localizer.localize([os.path.join(benchmark.root, p) for p in benchmark.queries_paths],
                               top_k=5)

  expected_top1 = [benchmark.database_paths[i] for i in result.predictions[:, 0]]
  assert ['database/' + r.matches[0].image for r in located] == expected_top1
  for q, r in enumerate(located):
    assert [m.rank for m in r.matches] == [1, 2, 3, 4, 5]
    # evaluation reports squared L2 distances between the same normalised descriptors.
    np.testing.assert_allclose([m.distance ** 2 for m in r.matches], result.distances[q, :5],
                               rtol=1e-4, atol=1e-6)
  # The stored descriptors are evaluation's database descriptors, row for row.
  manifest = store.read_manifest(str(index))
  stored = np.load(index / manifest['files']['descriptors'])
  np.testing.assert_allclose(stored, result.database_descriptors, atol=1e-6)

  # Coordinates come from the names: UTM, zone and lat/lon of the matched database image.
  match = located[0].matches[0]
  fields = match.image.split('@')
  assert match.utm_east == float(fields[1]) and match.utm_north == float(fields[2])
  assert match.utm_zone == '10S' and match.coordinate_source == 'name'
  assert (match.lat, match.lon) == (float(fields[5]), float(fields[6]))
  assert match.file == str(photos / 'database' / match.image)
  payload = json.loads(outputs.results_json(located))
  first = payload['queries'][0]
  assert first['image'] == os.path.join(benchmark.root, benchmark.queries_paths[0])
  assert set(first['matches'][0]) >= {'image', 'distance', 'lat', 'lon'}


def test_incremental_build_embeds_only_new_images(checkpoints, photos, tmp_path, monkeypatch):
  checkpoint = checkpoints[0]
  database, index = photos / 'database', tmp_path / 'index'
  run_build = lambda: build.build_index(checkpoint, str(database), str(index),
                                        batch_size=BATCH, show_progress=False,
                                        print_fn=lambda _: None)
  run_build()
  before = localizer_lib.Localizer.from_index(str(index))
  before_rows = dict(zip(before.paths, np.load(index / 'descriptors-1.npy')))
  added = sorted((photos / 'queries').iterdir())[0]
  os.makedirs(database / 'new')
  shutil.copy(added, database / 'new' / added.name)
  removed = sorted(database.glob('*.jpg'))[0]
  os.remove(removed)

  counter = CountingEmbedder()
  monkeypatch.setattr(descriptors, 'compute_descriptors', counter)
  stats = run_build()
  assert counter.images == 1
  assert (stats.num_images, stats.embedded, stats.reused, stats.removed) == (20, 1, 19, 1)
  after = localizer_lib.Localizer.from_index(str(index))
  assert ('new/' + added.name) in after.paths and removed.name not in after.paths
  assert not (index / 'descriptors-1.npy').exists()  # The previous generation is cleaned up.
  # Kept rows are carried over unchanged; the new photo finds itself.
  after_rows = np.load(index / store.read_manifest(str(index))['files']['descriptors'])
  for row, path in enumerate(after.paths):
    if path in before_rows:
      np.testing.assert_array_equal(after_rows[row], before_rows[path])
  top = after.localize([str(database / 'new' / added.name)], top_k=1)[0].matches[0]
  assert top.image == 'new/' + added.name and top.distance < 1e-3

  # Nothing changed: nothing embedded, nothing written.
  embedded_before = counter.images
  stats = run_build()
  assert stats.up_to_date and stats.embedded == 0 and counter.images == embedded_before


def test_interrupted_build_resumes(checkpoints, photos, tmp_path, monkeypatch):
  checkpoint = checkpoints[0]
  database, index = str(photos / 'database'), tmp_path / 'index'
  run_build = lambda: build.build_index(checkpoint, database, str(index), batch_size=BATCH,
                                        part_size=8, show_progress=False,
                                        print_fn=lambda _: None)
  monkeypatch.setattr(descriptors, 'compute_descriptors', CountingEmbedder(fail_on_call=2))
  with pytest.raises(KeyboardInterrupt):
    run_build()
  assert not (index / store.MANIFEST_FILENAME).exists()
  assert len(list((index / store.PENDING_SUBDIR).glob('part-*.npz'))) == 1
  with pytest.raises(IndexNotFoundError):
    localizer_lib.Localizer.from_index(str(index))

  counter = CountingEmbedder()
  monkeypatch.setattr(descriptors, 'compute_descriptors', counter)
  stats = run_build()
  assert counter.images == 12
  assert (stats.num_images, stats.embedded, stats.resumed) == (20, 12, 8)
  assert not (index / store.PENDING_SUBDIR).exists()

  # The same index as an uninterrupted build.
  whole = tmp_path / 'whole'
  build.build_index(checkpoint, database, str(whole), batch_size=BATCH,
                    show_progress=False, print_fn=lambda _: None)
  resumed = np.load(index / 'descriptors-1.npy')
  np.testing.assert_allclose(resumed, np.load(whole / 'descriptors-1.npy'), atol=1e-6)


def rotated_with_exif(pixels: np.ndarray, path, orientation: int = 6, quality: int = 95):
  """Writes a JPEG whose stored pixels are the photo turned, with the orientation that undoes it."""
  stored = np.ascontiguousarray(np.rot90(pixels, k=1))  # 90 degrees counter-clockwise.
  exif = Image.Exif()
  exif[0x0112] = orientation  # 6: the viewer turns it 90 degrees clockwise.
  Image.fromarray(stored).save(path, quality=quality, exif=exif.tobytes())


def test_exif_rotated_photo_gives_the_upright_descriptor(checkpoints, photos, tmp_path):
  index = tmp_path / 'index'
  build.build_index(checkpoints[0], str(photos / 'database'), str(index),
                    batch_size=BATCH, show_progress=False, print_fn=lambda _: None)
  localizer = localizer_lib.Localizer.from_index(str(index))
  source = query_paths(photos)[0]
  pixels = np.asarray(Image.open(source).convert('RGB'))
  rotated = tmp_path / 'rotated.jpg'
  rotated_with_exif(pixels, rotated)
  # The upright reference: the decoded JPEG turned back, stored losslessly without EXIF.
  with Image.open(rotated) as img:
    assert img.size == (pixels.shape[0], pixels.shape[1])
    upright_pixels = np.asarray(img.convert('RGB').transpose(Image.Transpose.ROTATE_270))
  upright = tmp_path / 'upright.png'
  Image.fromarray(upright_pixels).save(upright)
  assert images.load_rgb(rotated, exif_transpose=True).size == (pixels.shape[1], pixels.shape[0])

  embedded = localizer.embed([str(rotated), str(upright), upright_pixels], batch_size=BATCH)
  np.testing.assert_allclose(embedded[0], embedded[1], atol=1e-6)
  np.testing.assert_allclose(embedded[2], embedded[1], atol=1e-6)  # Arrays: same transform.
  ignored = localizer.embed([str(rotated)], exif_transpose=False, batch_size=BATCH)[0]
  assert np.abs(ignored - embedded[1]).max() > 1e-3
  # The original photo, upright, gives nearly the same descriptor (JPEG re-encoding aside).
  original = localizer.embed([source], batch_size=BATCH)[0]
  assert float(original @ embedded[0]) > 0.99
  # Benchmark evaluation keeps ignoring EXIF.
  assert images.load_resized_array(rotated, (32, 32)).shape == (32, 32, 3)
  np.testing.assert_array_equal(images.load_resized_array(rotated, (40, 30)),
                                np.asarray(Image.open(rotated).convert('RGB').resize(
                                    (30, 40), Image.BILINEAR)))


def test_fast_decode_uses_dct_scaling(tmp_path):
  source = sorted(os.listdir(os.path.join(SF_XS_MINI, 'queries')))[0]
  pixels = np.asarray(Image.open(os.path.join(SF_XS_MINI, 'queries', source)).convert('RGB'))
  big = Image.fromarray(pixels).resize((1800, 1600), Image.BICUBIC)
  path = tmp_path / 'big.jpg'
  big.save(path, quality=92)
  assert images.load_rgb(path).size == (1800, 1600)
  # 1/8 scale (225 x 200) is the smallest still at least 150 x 150.
  assert images.load_rgb(path, draft_size=(150, 150)).size == (225, 200)
  exact = images.load_resized_array(path, (150, 150))
  fast = images.load_resized_array(path, (150, 150), images.DecodeOptions(fast_decode=True))
  assert fast.shape == exact.shape and not np.array_equal(fast, exact)
  assert np.abs(fast.astype(int) - exact.astype(int)).mean() < 4.0
  # With an EXIF rotation the draft is asked for the stored (turned) size.
  rotated = tmp_path / 'rotated.jpg'
  rotated_with_exif(np.asarray(big), rotated)
  upright = images.load_rgb(rotated, draft_size=(150, 100), exif_transpose=True)
  assert upright.size == (225, 200)


def test_index_of_another_checkpoint_is_refused(checkpoints, photos, tmp_path):
  a, b = checkpoints
  index = tmp_path / 'index'
  build.build_index(a, str(photos / 'database'), str(index), batch_size=BATCH,
                    show_progress=False, print_fn=lambda _: None)
  with pytest.raises(IndexMismatchError, match='weights') as error:
    localizer_lib.Localizer.from_index(str(index), checkpoint=b)
  assert '\n' not in str(error.value)
  with pytest.raises(IndexMismatchError, match='another checkpoint'):
    build.build_index(b, str(photos / 'database'), str(index), batch_size=BATCH,
                      show_progress=False, print_fn=lambda _: None)
  with pytest.raises(IndexMismatchError, match='half'):
    build.build_index(a, str(photos / 'database'), str(index), half=True,
                      batch_size=BATCH, show_progress=False, print_fn=lambda _: None)
  # A config that changes the preprocessing (input size) differs too.
  config, variables, _ = orbax_states.load_for_eval(a)
  config.image_size = (48, 48)
  fingerprint = embedding.checkpoint_fingerprint(config, variables)
  manifest = store.read_manifest(str(index))
  assert embedding.fingerprint_differences(manifest['fingerprint'], fingerprint) == [
                                                                                     'image_size']


def test_coordinates_from_csv_exif_and_names(checkpoints, tmp_path):
  folder = tmp_path / 'mine'
  folder.mkdir()
  names = sorted(os.listdir(os.path.join(SF_XS_MINI, 'database')))[:4]
  shutil.copy(os.path.join(SF_XS_MINI, 'database', names[0]), folder / names[0])
  pixels = [np.asarray(Image.open(os.path.join(SF_XS_MINI, 'database', n)).convert('RGB'))
            for n in names[1:]]
  exif = Image.Exif()
  gps = exif.get_ifd(coordinates.EXIF_GPS_IFD)
  gps.update({1: 'N', 2: (48.0, 51.0, 29.64), 3: 'W', 4: (2.0, 17.0, 40.2)})
  Image.fromarray(pixels[0]).save(folder / 'gps.jpg', exif=exif.tobytes())
  Image.fromarray(pixels[1]).save(folder / 'listed.jpg')
  Image.fromarray(pixels[2]).save(folder / 'nothing.png')
  (tmp_path / 'coords.csv').write_text('path,lat,lon\nlisted.jpg,41.9,12.5\n')

  index = tmp_path / 'index'
  build.build_index(checkpoints[0], str(folder), str(index), batch_size=BATCH,
                    coordinates=str(tmp_path / 'coords.csv'), show_progress=False,
                    print_fn=lambda _: None)
  localizer = localizer_lib.Localizer.from_index(str(index))
  found = {r.matches[0].image: r.matches[0] for r in localizer.localize(
      [str(folder / n) for n in sorted(os.listdir(folder))], top_k=1)}
  assert set(found) == {names[0], 'gps.jpg', 'listed.jpg', 'nothing.png'}
  assert found['gps.jpg'].lat == pytest.approx(48.858233, abs=1e-5)
  assert found['gps.jpg'].lon == pytest.approx(-2.294500, abs=1e-5)
  assert found['gps.jpg'].coordinate_source == 'exif' and found['gps.jpg'].utm_east is None
  assert (found['listed.jpg'].lat, found['listed.jpg'].lon) == (41.9, 12.5)
  assert found['nothing.png'].lat is None and found['nothing.png'].coordinate_source == ''
  assert found[names[0]].coordinate_source == 'name'

  bad = tmp_path / 'bad.csv'
  bad.write_text('path,lat,lon\nlisted.jpg,91,12\n')
  with pytest.raises(CoordinatesFileError, match=r'bad.csv:2: '):
    build.build_index(checkpoints[0], str(folder), str(index), coordinates=str(bad),
                      show_progress=False, print_fn=lambda _: None)


def run_cli(module, args, tmp_path, timeout=240):
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  return subprocess.run([sys.executable, '-m', module] + [str(a) for a in args], cwd=tmp_path,
                        env=env, capture_output=True, text=True, timeout=timeout, check=False)


def assert_one_line_error(proc, error_type):
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f'{error_type}: '), last
  return last


def test_cli_index_and_localize(checkpoints, photos, tmp_path):
  index, out = tmp_path / 'index', tmp_path / 'out.json'
  proc = run_cli('vpr_jax.index', [f'--checkpoint={checkpoints[0]}', '--images',
                                   photos / 'database', '--out', index, '--half',
                                   '--batch-size=8'], tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Indexed 20 images' in proc.stdout
  queries = query_paths(photos)[:2]
  proc = run_cli('vpr_jax.localize', ['--index', index, '--top-k', '3', '--output', out,
                                      '--sheet', tmp_path / 'sheets'] + queries, tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  payload = json.loads(out.read_text())
  assert [q['image'] for q in payload['queries']] == queries
  for query in payload['queries']:
    assert len(query['matches']) == 3
    distances = [m['distance'] for m in query['matches']]
    assert distances == sorted(distances)
    for match in query['matches']:
      assert isinstance(match['image'], str) and isinstance(match['distance'], float)
      assert isinstance(match['lat'], float) and isinstance(match['lon'], float)
      assert (photos / 'database' / match['image']).is_file()
    assert query['matches'][0]['image'] in proc.stdout
  sheets = sorted(os.listdir(tmp_path / 'sheets'))
  assert len(sheets) == 2 and all(s.endswith('.png') for s in sheets)
  with Image.open(tmp_path / 'sheets' / sheets[0]) as sheet:
    assert sheet.width > 4 * 240  # The photo and its three matches.

  # Bad input: one line each, exit status 1.
  last = assert_one_line_error(
      run_cli('vpr_jax.localize', ['--index', tmp_path / 'nowhere', queries[0]], tmp_path),
      'IndexNotFoundError')
  assert 'nowhere' in last
  broken = tmp_path / 'broken.jpg'
  broken.write_bytes(open(queries[0], 'rb').read()[:500])
  last = assert_one_line_error(
      run_cli('vpr_jax.localize', ['--index', index, str(broken)], tmp_path), 'ImageDecodeError')
  assert 'broken.jpg' in last
  (tmp_path / 'empty').mkdir()
  last = assert_one_line_error(
      run_cli('vpr_jax.index', [f'--checkpoint={checkpoints[0]}', '--images', tmp_path / 'empty',
                                '--out', tmp_path / 'index2'], tmp_path), 'ImageFolderError')
  assert 'empty' in last and not (tmp_path / 'index2').exists()


def test_bench_localization_smoke(tmp_path):
  """The benchmark's tiny run: chunked ground truth, flat exact, IVF-PQ close to exact."""
  spec = importlib.util.spec_from_file_location(
      'bench_localization', os.path.join(REPO_ROOT, 'scripts', 'bench_localization.py'))
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  output = tmp_path / 'bench.json'
  results = bench.main(['--sizes', '20000', '--dim', '32', '--chunk', '8000', '--factories',
                        '20000=IVF16,PQ8', '--queries', '50', '--singles', '5', '--centers',
                        '512', '--train_size', '4000', '--nprobe', '4', '--threads', '1',
                        '--output', str(output)])
  by_index = {r['index']: r for r in results}
  assert set(by_index) == {'IVF16,PQ8', 'Flat'}
  # Flat is exact, so it agrees with the chunk-by-chunk brute force.
  assert by_index['Flat']['r1_vs_exact'] == 1.0
  assert by_index['IVF16,PQ8']['r1_vs_exact'] >= 0.6
  assert by_index['IVF16,PQ8']['index_bytes'] < by_index['Flat']['index_bytes']
  assert json.loads(output.read_text())['results'][0]['database'] == 20000

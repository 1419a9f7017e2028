"""Reading PyTorch checkpoints without torch: equality with torch.load, safety, bad files."""

import argparse
import collections
import io
import os
import pickle
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import pytest

from tests.test_convert import family_torch_model
from tests.test_convert import gem_config_file
from tests.test_resnet import randomised_torchvision_resnet
from tests.test_vpr_model import small_config
from vpr_jax.checkpoints import orbax_states
from vpr_jax.conversion import torch_files
from vpr_jax.conversion import torch_reader

torch = pytest.importorskip('torch', reason='torch.load is the reference reader')

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _as_numpy(tensor) -> np.ndarray:
  """torch.load's tensor as numpy, in the dtype the reader gives (ml_dtypes for bf16 / float8)."""
  tensor = tensor.detach().resolve_conj().resolve_neg()
  if tensor.dtype == torch.bfloat16:
    return tensor.view(torch.int16).numpy().view(torch_reader.ml_dtypes.bfloat16)
  if tensor.dtype == torch.float8_e4m3fn:
    return tensor.view(torch.uint8).numpy().view(torch_reader.ml_dtypes.float8_e4m3fn)
  if tensor.dtype == torch.uint16:
    return tensor.view(torch.int16).numpy().view(np.uint16)
  return tensor.numpy()


def _assert_same(ours, reference, where='checkpoint'):
  """Recursively compares the reader's object with torch.load's (tensors bit for bit)."""
  if isinstance(reference, torch.Tensor):
    assert isinstance(ours, np.ndarray), where
    expected = _as_numpy(reference)
    assert ours.dtype == expected.dtype and ours.shape == expected.shape, where
    np.testing.assert_array_equal(ours.view(np.uint8) if ours.dtype.itemsize == 1 else ours,
                                  expected.view(np.uint8) if expected.dtype.itemsize == 1
                                  else expected, err_msg=where)
  elif isinstance(reference, dict):
    assert type(ours) is type(reference), where  # OrderedDicts stay OrderedDicts.
    assert list(ours) == list(reference), where
    for key in reference:
      _assert_same(ours[key], reference[key], f'{where}[{key!r}]')
  elif isinstance(reference, (list, tuple)):
    assert type(ours) is type(reference) and len(ours) == len(reference), where
    for i, (a, b) in enumerate(zip(ours, reference)):
      _assert_same(a, b, f'{where}[{i}]')
  else:
    assert ours == reference, where


def _rewrite_zip(source, target, replace=None, drop=()):
  """Copies a zip archive, replacing or dropping records (to make damaged checkpoints)."""
  replace = replace or {}
  with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, 'w') as dst:
    for info in src.infolist():
      if info.filename in drop:
        continue
      dst.writestr(info, replace.get(info.filename, src.read(info.filename)))


class _Pickler(pickle.Pickler):
  """Pickles `_Storage` objects as torch's storage persistent ids (to craft checkpoints)."""

  def persistent_id(self, obj):
    if isinstance(obj, _Storage):
      return ('storage', torch.FloatStorage, obj.key, 'cpu', obj.numel)
    return None


class _Storage:

  def __init__(self, key, numel):
    self.key, self.numel = key, numel


def _write_checkpoint(path, obj, storages=None):
  """A zip in torch's layout whose data.pkl pickles `obj` (protocol 2, as torch.save)."""
  buffer = io.BytesIO()
  _Pickler(buffer, protocol=2).dump(obj)
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('archive/data.pkl', buffer.getvalue())
    archive.writestr('archive/byteorder', 'little')
    for key, data in (storages or {}).items():
      archive.writestr(f'archive/data/{key}', data)
    archive.writestr('archive/version', '3\n')


# ----------------------------------------------------------------------------------------------
# Equality with torch.load.


@pytest.mark.parametrize('name', ['resnet18', 'resnet50'])
def test_torchvision_state_dicts_equal_torch_load(name, tmp_path):
  path = tmp_path / f'{name}.pth'
  torch.save(randomised_torchvision_resnet(name, seed=2).state_dict(), path)
  reference = torch.load(path, map_location='cpu', weights_only=True)
  ours = torch_reader.read_checkpoint(str(path))
  _assert_same(ours, reference)
  assert len(ours) == len(reference) > 100
  state_dict = torch_reader.load_state_dict(str(path))
  assert list(state_dict) == list(reference)
  assert state_dict['layer1.0.bn1.num_batches_tracked'].dtype == np.int64
  assert state_dict['conv1.weight'].shape == (64, 3, 7, 7)


class AttributeDict(dict):
  """Like Lightning's hyper-parameter container: a dict subclass with attribute access."""

  def __getattr__(self, key):
    return self[key]


def test_lightning_checkpoint_with_family_keys(tmp_path):
  """A `.ckpt` as Lightning writes it around a MixVPR model (gsv-cities names)."""
  config = small_config('mixvpr')
  model = family_torch_model(config, seed=4)
  optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
  images = torch.randint(0, 255, (2, 64, 64, 3), dtype=torch.uint8).numpy()
  model(images).sum().backward()
  optimizer.step()
  hparams = argparse.Namespace(lr=0.05, agg_arch='MixVPR', agg_config={'in_channels': 1024},
                               image_size=(64, 64))
  checkpoint = {
      'epoch': 3,
      'global_step': 1234,
      'pytorch-lightning_version': '2.4.0',
      'state_dict': model.state_dict(),
      'hyper_parameters': hparams,
      'hparams_attribute_dict': AttributeDict(lr=0.05, batch_size=120),
      'optimizer_states': [optimizer.state_dict()],
      'lr_schedulers': [{'step_size': 5, 'gamma': 0.3, 'last_epoch': 3, 'base_lrs': [0.05]}],
      'callbacks': {"ModelCheckpoint{'monitor': 'pitts30k_val/R1', 'mode': 'max'}": {
          'best_model_score': torch.tensor(0.8123), 'best_model_path': '/runs/epoch=03.ckpt',
          'best_k_models': {'/runs/epoch=03.ckpt': torch.tensor(0.8123)}}},
      'loops': {'fit_loop': {'state_dict': {}, 'epoch_progress': {'total': {'ready': 4}}}},
      'set_and_bytes': ({1, 2}, b'\x00\xffbytes', 2 + 3j),
  }
  path = tmp_path / 'epoch=03.ckpt'
  torch.save(checkpoint, path)
  reference = torch.load(path, map_location='cpu', weights_only=False)
  ours = torch_reader.read_checkpoint(str(path))

  for key in ('epoch', 'global_step', 'pytorch-lightning_version', 'state_dict',
              'optimizer_states', 'lr_schedulers', 'callbacks', 'loops', 'set_and_bytes'):
    _assert_same(ours[key], reference[key], key)
  assert any(k.startswith('aggregator.mix.1.mix.3.') for k in ours['state_dict'])
  assert 'aggregator.row_proj.weight' in ours['state_dict']
  # Hyper-parameter objects are kept as inert stand-ins holding their data.
  namespace = ours['hyper_parameters']
  assert isinstance(namespace, torch_reader.PickledObject)
  assert namespace.qualified_name == 'argparse.Namespace'
  assert namespace.state == vars(hparams)
  attribute_dict = ours['hparams_attribute_dict']
  assert attribute_dict.name == 'AttributeDict' and attribute_dict.items == {'lr': 0.05,
                                                                             'batch_size': 120}
  # The state dict as the converter sees it.
  state_dict = torch_reader.load_state_dict(str(path))
  assert list(state_dict) == list(reference['state_dict'])
  converted = torch_files.load_torch_state_dict(str(path))
  for key, value in reference['state_dict'].items():
    np.testing.assert_array_equal(converted[key], value.numpy())


def test_dtypes_equal_torch_load(tmp_path):
  generator = torch.Generator().manual_seed(0)
  values = torch.randn(3, 4, generator=generator)
  tensors = {
      'float32': values,
      'float64': values.double(),
      'float16': values.half(),
      'bfloat16': values.bfloat16(),
      'int64': torch.arange(-5, 7),
      'int32': torch.arange(6, dtype=torch.int32),
      'int16': torch.arange(6, dtype=torch.int16),
      'int8': torch.tensor([-128, 0, 127], dtype=torch.int8),
      'uint8': torch.tensor([0, 200, 255], dtype=torch.uint8),
      'uint16': torch.tensor([0, 1, 65535], dtype=torch.int32).to(torch.uint16),
      'bool': torch.tensor([True, False, True]),
      'complex64': torch.randn(3, dtype=torch.complex64, generator=generator),
      'conjugated': torch.randn(3, dtype=torch.complex64, generator=generator).conj(),
      'float8_e4m3fn': values.to(torch.float8_e4m3fn),
      'scalar': torch.tensor(7),
      'empty': torch.zeros(0, 3),
  }
  path = tmp_path / 'dtypes.pth'
  torch.save(tensors, path)
  ours = torch_reader.read_checkpoint(str(path))
  _assert_same(ours, torch.load(path, weights_only=True))
  assert ours['bfloat16'].dtype.name == 'bfloat16'
  np.testing.assert_allclose(ours['bfloat16'].astype(np.float32), values.numpy(), rtol=1e-2)


def test_views_offsets_and_shared_storages(tmp_path):
  base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
  tensors = {
      'base': base,
      'transposed': base.t(),
      'sliced': base[2:5, 3:9:2],  # Offset 23, strides (10, 2).
      'row': base[4],
      'expanded': torch.arange(3.0).view(3, 1).expand(3, 4),  # A zero stride.
      'own': torch.ones(2, 2),
  }
  assert tensors['sliced'].storage_offset() == 23
  path = tmp_path / 'views.pth'
  torch.save(tensors, path)
  ours = torch_reader.read_checkpoint(str(path))
  _assert_same(ours, torch.load(path, weights_only=True))
  assert ours['transposed'].strides == (4, 40) and not ours['transposed'].flags.c_contiguous
  assert ours['sliced'].strides == (40, 8)
  assert ours['expanded'].strides == (4, 0)
  # One storage in the file, one buffer in memory: a write shows through every view, as in torch.
  for name in ('transposed', 'sliced', 'row'):
    assert np.shares_memory(ours['base'], ours[name]), name
  assert not np.shares_memory(ours['base'], ours['own'])
  ours['base'][4, 5] = -1.0
  assert ours['row'][5] == -1.0 and ours['sliced'][2, 1] == -1.0
  with zipfile.ZipFile(path) as archive:
    assert sum('/data/' in n for n in archive.namelist()) == 3  # base, expanded, own.


def test_parameters_and_tensors_with_attributes(tmp_path):
  parameter = torch.nn.Parameter(torch.randn(3, 2))
  tagged = torch.randn(4)
  tagged.note = 'python attribute'  # Pickled through _rebuild_from_type_v2.
  path = tmp_path / 'params.pth'
  torch.save({'parameter': parameter, 'tagged': tagged, 'list': [parameter, tagged]}, path)
  reference = torch.load(path, weights_only=True)
  ours = torch_reader.read_checkpoint(str(path))
  _assert_same(ours, reference)
  assert ours['list'][0] is ours['parameter']  # Pickle's memo keeps shared objects shared.
  with zipfile.ZipFile(path) as archive:
    assert b'_rebuild_from_type_v2' in archive.read('params/data.pkl')


def test_big_endian_files_are_swapped(tmp_path):
  tensors = {'f32': torch.randn(5), 'f16': torch.randn(3).half(), 'i64': torch.arange(4),
             'bf16': torch.randn(2).bfloat16(), 'c64': torch.randn(2, dtype=torch.complex64),
             'bool': torch.tensor([True, False])}
  path = tmp_path / 'little.pth'
  torch.save(tensors, path)
  little = torch_reader.read_checkpoint(str(path))
  replace = {'little/byteorder': b'big'}
  # torch.save numbers the storages in the order it meets the tensors (a wrong guess would fail
  # the size check).
  for key, (name, tensor) in enumerate(tensors.items()):
    array = little[name]
    unit = 2 if array.dtype == np.complex64 else 1
    swapped = np.ascontiguousarray(array).view(f'u{array.dtype.itemsize // unit}').byteswap()
    replace[f'little/data/{key}'] = swapped.tobytes()
  target = tmp_path / 'big.pth'
  _rewrite_zip(path, target, replace)
  big = torch_reader.read_checkpoint(str(target))
  for name in tensors:
    np.testing.assert_array_equal(big[name], little[name], err_msg=name)


# ----------------------------------------------------------------------------------------------
# Safety.


class _RunsCommand:

  def __init__(self, function, command):
    self.function, self.command = function, command

  def __reduce__(self):
    return (self.function, (self.command,))


@pytest.mark.parametrize('function', [os.system, eval, subprocess.check_call],
                         ids=['os.system', 'eval', 'subprocess'])
def test_code_in_the_pickle_is_refused_and_never_runs(function, tmp_path):
  marker = tmp_path / 'marker'
  if function is os.system:
    command = f'touch {marker}'
  elif function is eval:
    command = f'open({str(marker)!r}, "w").write("ran")'
  else:
    command = ['touch', str(marker)]
  path = tmp_path / 'evil.pth'
  # Hidden among plain entries, as a value of the state dict.
  _write_checkpoint(path, collections.OrderedDict(
      [('weight', 1.0), ('payload', _RunsCommand(function, command))]))
  with pytest.raises(torch_reader.UnsafeCheckpointError) as info:
    torch_reader.read_checkpoint(str(path))
  message = str(info.value)
  assert '\n' not in message and str(path) in message and 'refused' in message
  assert function.__name__ in message
  with pytest.raises(torch_reader.UnsafeCheckpointError):
    torch_files.load_torch_state_dict(str(path))
  assert not marker.exists()

  # The payload is live: a plain unpickler runs it (in another process).
  pickled = tmp_path / 'data.pkl'
  with zipfile.ZipFile(path) as archive:
    pickled.write_bytes(archive.read('archive/data.pkl'))
  subprocess.run([sys.executable, '-c', 'import pickle, sys; '
                  'pickle.loads(open(sys.argv[1], "rb").read())', str(pickled)],
                 check=True, timeout=60, capture_output=True)
  assert marker.exists()


class Recorder:
  """A class whose restoration would write a file, were it ever run."""

  marker = None

  def __setstate__(self, state):
    with open(state['marker'], 'w') as f:
      f.write('ran')


def test_unknown_classes_stay_inert(tmp_path):
  marker = tmp_path / 'marker'
  recorder = Recorder.__new__(Recorder)
  recorder.__dict__['marker'] = str(marker)
  path = tmp_path / 'callbacks.ckpt'
  torch.save({'state_dict': {'w': torch.ones(2)}, 'callbacks': {'Recorder': recorder}}, path)
  ours = torch_reader.read_checkpoint(str(path))
  stand_in = ours['callbacks']['Recorder']
  assert isinstance(stand_in, torch_reader.PickledObject) and not isinstance(stand_in, Recorder)
  assert stand_in.qualified_name == 'tests.test_torch_reader.Recorder'
  assert stand_in.state == {'marker': str(marker)}
  assert not marker.exists()
  np.testing.assert_array_equal(torch_reader.load_state_dict(str(path))['w'], [1.0, 1.0])


def test_pickled_module_is_not_a_state_dict(tmp_path):
  path = tmp_path / 'model.pth'
  torch.save(torch.nn.Linear(3, 2), path)
  ours = torch_reader.read_checkpoint(str(path))
  assert ours.qualified_name == 'torch.nn.modules.linear.Linear'
  with pytest.raises(torch_reader.TorchCheckpointError,
                     match=r'holds a torch\.nn\.modules\.linear\.Linear, not a state dict'):
    torch_reader.load_state_dict(str(path))


def test_tensor_past_its_storage_is_refused(tmp_path):
  """A crafted tensor reaching beyond its bytes must not read foreign memory."""

  class Tensor:

    def __reduce__(self):
      return (torch._utils._rebuild_tensor_v2,
              (_Storage('0', 4), 2, (3, 2), (2, 1), False, collections.OrderedDict()))

  path = tmp_path / 'overflow.pth'
  _write_checkpoint(path, {'w': Tensor()}, {'0': np.zeros(4, np.float32).tobytes()})
  with pytest.raises(torch_reader.TorchCheckpointError, match='reaches past its storage'):
    torch_reader.read_checkpoint(str(path))

  short = tmp_path / 'short.pth'
  _write_checkpoint(short, {'w': Tensor()}, {'0': b'\x00' * 10})
  with pytest.raises(torch_reader.TorchCheckpointError, match='holds 10 bytes'):
    torch_reader.read_checkpoint(str(short))


# ----------------------------------------------------------------------------------------------
# Files that are not checkpoints.


def test_bad_files_give_one_line(tmp_path):
  with pytest.raises(FileNotFoundError, match='nothing.pth'):
    torch_reader.read_checkpoint(str(tmp_path / 'nothing.pth'))

  cases = {}
  (tmp_path / 'empty.pth').write_bytes(b'')
  cases['empty.pth'] = 'is empty'
  (tmp_path / 'notes.pth').write_text('these are not weights\n')
  cases['notes.pth'] = 'not a PyTorch checkpoint'
  good = tmp_path / 'good.pth'
  torch.save({'w': torch.randn(1000)}, good)
  (tmp_path / 'truncated.pth').write_bytes(good.read_bytes()[:2000])
  cases['truncated.pth'] = 'damaged or truncated'
  torch.save({'w': torch.randn(3)}, tmp_path / 'legacy.pth', _use_new_zipfile_serialization=False)
  cases['legacy.pth'] = "legacy format"
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', FutureWarning)  # torch.jit's deprecation notice.
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / 'scripted.pt')
  cases['scripted.pt'] = 'TorchScript'
  _rewrite_zip(good, tmp_path / 'no_storage.pth', drop=('good/data/0',))
  cases['no_storage.pth'] = 'lacks the record good/data/0'
  with zipfile.ZipFile(tmp_path / 'other.zip', 'w') as archive:
    archive.writestr('readme.txt', 'hello')
  cases['other.zip'] = 'without the data.pkl'
  (tmp_path / 'folder.pth').mkdir()
  cases['folder.pth'] = 'is a folder'

  for name, expected in cases.items():
    with pytest.raises(torch_reader.TorchCheckpointError) as info:
      torch_reader.read_checkpoint(str(tmp_path / name))
    message = str(info.value)
    assert expected in message and name in message and '\n' not in message, (name, message)


# ----------------------------------------------------------------------------------------------
# torch is not needed.


_WITHOUT_TORCH = """
import sys
sys.modules['torch'] = None  # Any `import torch` now fails.
try:
  import torch
except ImportError:
  pass
else:
  raise SystemExit('torch could still be imported')
import runpy
sys.argv = ['vpr_jax.convert'] + sys.argv[1:]
runpy.run_module('vpr_jax.convert', run_name='__main__', alter_sys=True)
"""


def test_convert_cli_runs_without_torch(tmp_path):
  net = randomised_torchvision_resnet('resnet18', seed=9)
  weights = tmp_path / 'resnet18-test.pth'
  torch.save(net.state_dict(), weights)
  config_file = gem_config_file(tmp_path)
  out = tmp_path / 'checkpoint'
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO_ROOT)
  env.pop('XLA_FLAGS', None)
  result = subprocess.run(
      [sys.executable, '-c', _WITHOUT_TORCH, f'--config={config_file}',
       f'--torch_checkpoint={weights}', f'--out={out}'],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  _, variables, _ = orbax_states.load_for_eval(str(out))
  np.testing.assert_array_equal(
      variables['params']['backbone']['conv1']['kernel'],
      net.state_dict()['conv1.weight'].numpy().transpose(2, 3, 1, 0))

  # A bad file is one line, without traceback, and still without torch.
  (tmp_path / 'notes.pth').write_text('not weights')
  bad = subprocess.run(
      [sys.executable, '-c', _WITHOUT_TORCH, f'--config={config_file}',
       f'--torch_checkpoint={tmp_path / "notes.pth"}', f'--out={tmp_path / "other"}'],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 1
  assert 'TorchCheckpointError' in bad.stderr and 'Traceback' not in bad.stderr, bad.stderr

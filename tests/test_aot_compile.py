"""scripts/aot_compile.py: the compiled step's costs, on the CPU backend here, on an H100 target
where the CUDA plugin is installed (its own venv, never the default install)."""

import importlib.metadata
import json
import os
import subprocess
import sys

import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SCRIPT = os.path.join(_REPO, 'scripts', 'aot_compile.py')
sys.path.insert(0, os.path.join(_REPO, 'scripts'))

import hlo_bytes  # noqa: E402  pylint: disable=wrong-import-position

# The interpreter of the AOT venv (`python3 -m venv DIR && DIR/bin/pip install "jax[cuda12]"
# -e .`), when it is not this one.
_AOT_PYTHON = os.environ.get('VPR_JAX_AOT_PYTHON', sys.executable)
_TINY = ['--configs', 'mixvpr', '--places_per_batch', '2', '--image_size', '64',
         '--set', 'data.eval_batch_size=8']


def _has_cuda_plugin(python: str) -> bool:
  if python == sys.executable:
    try:
      importlib.metadata.version('jax-cuda12-plugin')
      return True
    except importlib.metadata.PackageNotFoundError:
      return False
  probe = "import importlib.metadata as m; m.version('jax-cuda12-plugin')"
  return subprocess.run([python, '-c', probe], capture_output=True, check=False).returncode == 0


def _run(python, args, tmp_path):
  output = tmp_path / 'aot.json'
  done = subprocess.run([python, _SCRIPT, *args, '--output', str(output)], capture_output=True,
                        text=True, timeout=600, check=False, cwd=_REPO)
  return done, (json.loads(output.read_text()) if output.exists() else None)


def _check_row(row, devices):
  train = row['train']
  kinds, parts = train['hbm']['by_kind'], train['hbm']['by_part']
  assert train['hbm']['total_bytes'] == pytest.approx(sum(kinds.values()))
  assert train['hbm']['total_bytes'] == pytest.approx(sum(p['total'] for p in parts.values()))
  assert kinds['convolution'] > 0 and kinds['matmul'] > 0 and kinds['fusion'] > 0
  # The model's parts are found in the program's metadata; only the trained ones run backward.
  for part in ('stem', 'layer1', 'layer3', 'aggregator', 'loss', 'optimizer'):
    assert parts[part]['total'] > 0, part
  assert parts['layer1']['backward'] == 0 and parts['layer3']['backward'] > 0
  assert parts['aggregator']['backward'] > 0
  assert train['gflop_per_image'] > 0 and train['memory']['temp_bytes'] > 0
  assert row['devices'] == devices and train['images'] == 8 * devices


def test_cpu_target_breaks_the_step_down(tmp_path):
  """On the CPU backend (no plugin needed): bytes by kind and part add up, 8 devices have the
  gradient all-reduce and the descriptor all-gather."""
  done, result = _run(sys.executable, ['--targets', 'cpu', '--devices', '1,8', *_TINY], tmp_path)
  assert done.returncode == 0, done.stderr[-2000:]
  one, eight = result['rows']
  _check_row(one, 1)
  _check_row(eight, 8)
  assert not one['train']['hbm']['collectives']
  collectives = eight['train']['hbm']['collectives']
  assert collectives['all-reduce']['count'] >= 1
  assert 'program | batch' in done.stdout and 'aggregator' in done.stdout


def test_cpu_target_compiles_the_pmap_step(tmp_path):
  """--parallel jit,pmap on 8 CPU devices: the pmap row is the per-device program of the same
  step (state and batch of one device, the state donated, the same FLOPs), with its own
  collectives: the gradient / BatchNorm all-reduces and the descriptor all-gather."""
  done, result = _run(sys.executable, ['--targets', 'cpu', '--devices', '8', '--parallel',
                                       'jit,pmap', '--no_eval', *_TINY], tmp_path)
  assert done.returncode == 0, done.stderr[-2000:]
  jit, pmap = result['rows']
  assert (jit['parallel'], pmap['parallel']) == ('jit', 'pmap')
  _check_row(pmap, 8)
  collectives = pmap['train']['hbm']['collectives']
  assert collectives['all-reduce']['count'] >= 1 and collectives['all-gather']['count'] >= 1
  # Each device holds one copy of the state and its 8 images, as under jit (not the stacked
  # [8, ...] state or the whole batch), and the state's buffers are reused for the new state.
  assert pmap['train']['memory']['argument_bytes'] == jit['train']['memory']['argument_bytes']
  assert pmap['train']['memory']['alias_bytes'] == jit['train']['memory']['alias_bytes'] > 0
  assert pmap['train']['gflop_per_image'] == pytest.approx(jit['train']['gflop_per_image'],
                                                           rel=0.01)
  assert '| pmap | train |' in done.stdout


def test_unknown_parallel_mode_is_one_line(tmp_path):
  done, _ = _run(sys.executable, ['--targets', 'cpu', '--parallel', 'jit,vmap', *_TINY],
                 tmp_path)
  assert done.returncode == 1
  assert done.stderr.strip().splitlines() == [
      'aot_compile: --parallel vmap: unknown mode; valid: jit, pmap']


def test_missing_plugin_is_one_line(tmp_path):
  if _has_cuda_plugin(sys.executable):
    pytest.skip('the CUDA plugin is installed here')
  done, _ = _run(sys.executable, ['--targets', 'h100', *_TINY], tmp_path)
  assert done.returncode == 3
  lines = [line for line in done.stdout.splitlines() if line.strip()]
  assert len(lines) == 1 and 'jax-cuda12-plugin is not installed' in lines[0]


@pytest.mark.skipif(not _has_cuda_plugin(_AOT_PYTHON),
                    reason='jax-cuda12-plugin not installed (set VPR_JAX_AOT_PYTHON to the '
                    'python of a venv with "jax[cuda12]")')
def test_h100_target_compiles_the_step(tmp_path):
  done, result = _run(_AOT_PYTHON, ['--targets', 'h100', '--devices', '1,8', *_TINY], tmp_path)
  assert done.returncode == 0, done.stderr[-2000:]
  one, eight = result['rows']
  _check_row(one, 1)
  _check_row(eight, 8)
  assert one['train']['bound']['img_per_s'] > 0
  assert eight['train']['hbm']['collectives']['all-reduce']['count'] >= 1


_HLO = """HloModule m, entry_computation_layout={(f32[4,8]{1,0})->f32[8]{0}}

%fused_computation (p: f32[4,8]) -> f32[8] {
  %p = f32[4,8]{1,0} parameter(0)
  %c = f32[] constant(0)
  ROOT %r = f32[8]{0} reduce(%p, %c), dimensions={0}, to_apply=%add
}

ENTRY %main (x: f32[4,8]) -> f32[8] {
  %x = f32[4,8]{1,0} parameter(0), metadata={op_name="x"}
  %gemm = (bf16[4,8]{1,0}, s8[4194304]{0}) custom-call(%x, %x), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(f)/jvp(VPRModel)/aggregator/mix_0/fc1/dot_general"}
  %g = bf16[4,8]{1,0} get-tuple-element(%gemm), index=0
  %f = f32[8]{0} fusion(%x), kind=kInput, calls=%fused_computation, metadata={op_name="jit(f)/transpose(jvp(VPRModel))/backbone/layer3/0/bn1/reduce_sum"}
  %ar = f32[8]{0} all-reduce(%f), replica_groups={}, to_apply=%add
  ROOT %t = f32[8]{0} add(%ar, %ar)
}
"""


def test_hlo_bytes_counts_operands_results_and_collectives():
  traffic = hlo_bytes.analyse_hlo(_HLO)
  # cuBLAS: its f32[4,8] operand (given twice) + the bf16 result, the s8 workspace left out.
  assert traffic.by_kind['matmul'] == 128 + 64  # x (read once) + the result.
  assert traffic.by_kind['fusion'] == 128 + 32
  assert traffic.by_kind['other'] == 32 + 32  # The unfused add: its operand once, its result.
  assert traffic.collectives['all-reduce'] == {'count': 1, 'bytes': 32.0, 'sizes': [32]}
  assert traffic.by_part["aggregator"]["forward"] == 192
  assert traffic.by_part['layer3']['backward'] == 160

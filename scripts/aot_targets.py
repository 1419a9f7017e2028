"""The compile targets of scripts/aot_compile.py: device descriptions, peaks and bandwidths.

GPU targets are XLA's own device descriptions (openxla/xla, `xla/tools/hlo_opt/gpu_specs/` and
`xla/backends/gpu/target_config/specs/`, fields that jaxlib 0.10's proto knows), with the cuDNN
and CUDA runtime versions that XLA needs to pick cuDNN convolutions (cuDNN 9.8, CUDA 12.8: the
versions of the jax-cuda12 0.10.2 wheels). TPU targets are libtpu topologies (the names of
axlearn's `aot_compilation` table). Peak FLOP/s are the vendors' dense bf16 figures, bandwidths
the HBM bandwidth of one device.
"""

import dataclasses
import importlib.metadata
from typing import Optional

import jax
from jax.experimental import topologies


class TargetError(Exception):
  """A target that cannot be used (unknown name, device count it has no topology for)."""


_GPU_SPEC = """
gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {shared_memory_per_core}
  threads_per_core_limit: 2048
  core_count: {core_count}
  fpus_per_core: {fpus_per_core}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {memory_bandwidth}
  l2_cache_size: {l2_cache_size}
  clock_rate_ghz: {clock_rate_ghz}
  device_memory_size: {device_memory_size}
  shared_memory_per_block_optin: {shared_memory_per_block_optin}
  cuda_compute_capability {{ major: {cc_major} minor: {cc_minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 12 minor: 8 }}
device_description_str: "{name}"
"""

# openxla/xla h100_sxm.txtpb and a100_sxm_80.txtpb.
_H100_SXM = dict(shared_memory_per_core=233472, core_count=132, fpus_per_core=128,
                 memory_bandwidth=3352320000000, l2_cache_size=52428800, clock_rate_ghz=1.98,
                 device_memory_size=84978434048, shared_memory_per_block_optin=232448,
                 cc_major=9, cc_minor=0, name='NVIDIA H100 80GB HBM3')
_A100_SXM_80 = dict(shared_memory_per_core=167936, core_count=108, fpus_per_core=64,
                    memory_bandwidth=2039040000000, l2_cache_size=41943040, clock_rate_ghz=1.41,
                    device_memory_size=85100068864, shared_memory_per_block_optin=166912,
                    cc_major=8, cc_minor=0, name='NVIDIA A100-SXM4-80GB')


@dataclasses.dataclass(frozen=True)
class Target:
  """One compile target.

  Attributes:
    name: the command line's name.
    kind: 'gpu', 'tpu' or 'cpu'.
    description: the device, in words.
    peak_bf16_flops: dense bf16 FLOP/s of one device (None: no roofline).
    bandwidth: HBM bytes/s of one device (None: no roofline).
    gpu_spec: the GPU device description (text proto).
    tpu_topologies: device count -> (topology name, chip config, chips per host bounds).
  """
  name: str
  kind: str
  description: str
  peak_bf16_flops: Optional[float] = None
  bandwidth: Optional[float] = None
  gpu_spec: str = ''
  tpu_topologies: Optional[dict] = None

  def missing(self) -> str:
    """'' when this target can compile here, else one line saying what is missing."""
    packages = {'gpu': ('jax-cuda12-plugin', 'jax-cuda13-plugin'), 'tpu': ('libtpu',)}
    if self.kind not in packages:
      return ''
    for package in packages[self.kind]:
      try:
        importlib.metadata.version(package)
        return ''
      except importlib.metadata.PackageNotFoundError:
        pass
    extra = 'cuda12' if self.kind == 'gpu' else 'tpu'
    return (f'{packages[self.kind][0]} is not installed; in a separate venv: pip install '
            f'"jax[{extra}]=={jax.__version__}" -e .')

  def devices(self, count: int) -> list:
    """`count` devices of this target (compile-only devices for GPU and TPU)."""
    if self.kind == 'cpu':
      devices = jax.devices('cpu')
      if count > len(devices):
        raise TargetError(f'cpu: {count} devices asked, {len(devices)} available')
      return devices[:count]
    if self.kind == 'gpu':
      topology = topologies.get_topology_desc(platform='cuda', target_config=self.gpu_spec,
                                              topology=f'1x1x{count}')
      return list(topology.devices)
    if count not in self.tpu_topologies:
      raise TargetError(f'{self.name}: no topology for {count} devices '
                        f'(known: {sorted(self.tpu_topologies)})')
    name, chip_config, bounds = self.tpu_topologies[count]
    topology = topologies.get_topology_desc(platform='tpu', topology_name=name,
                                            chip_config_name=chip_config,
                                            chips_per_host_bounds=bounds, num_slices=1)
    return list(topology.devices)

  def roofline(self, flops_per_device: Optional[float], bytes_per_device: float,
               images: int, dtype: str = 'bfloat16') -> dict:
    """The step's lower bound in time: the larger of FLOPs / peak and bytes / bandwidth."""
    out = {}
    if self.peak_bf16_flops and flops_per_device and dtype == 'bfloat16':
      out['flop_seconds'] = flops_per_device / self.peak_bf16_flops
      out['flop_img_per_s'] = images / out['flop_seconds']
    if self.bandwidth:
      out['bytes_seconds'] = bytes_per_device / self.bandwidth
      out['bytes_img_per_s'] = images / out['bytes_seconds']
    times = [out[k] for k in ('flop_seconds', 'bytes_seconds') if k in out]
    if times:
      out['seconds'] = max(times)
      out['img_per_s'] = images / out['seconds']
      out['bound_by'] = 'memory' if out.get('bytes_seconds', 0) >= out.get(
          'flop_seconds', 0) else 'compute'
    return out


TARGETS = {
    'h100': Target('h100', 'gpu', 'NVIDIA H100 SXM 80GB', peak_bf16_flops=989.4e12,
                   bandwidth=3.35232e12, gpu_spec=_GPU_SPEC.format(**_H100_SXM)),
    'a100': Target('a100', 'gpu', 'NVIDIA A100 SXM4 80GB', peak_bf16_flops=312e12,
                   bandwidth=2.03904e12, gpu_spec=_GPU_SPEC.format(**_A100_SXM_80)),
    # Per chip: v5e 197 TFLOP/s bf16, 819 GB/s; v4 275 TFLOP/s, 1,200 GB/s (Cloud TPU docs).
    'v5e': Target('v5e', 'tpu', 'TPU v5e (v5litepod)', peak_bf16_flops=197e12,
                  bandwidth=8.19e11, tpu_topologies={
                      1: ('v5e:1x1', 'default', (1, 1, 1)),
                      4: ('v5e:2x2', 'default', (2, 2, 1)),
                      8: ('v5e:2x4', 'default', (2, 2, 1))}),
    'v4': Target('v4', 'tpu', 'TPU v4 (megacore)', peak_bf16_flops=275e12, bandwidth=1.2e12,
                 tpu_topologies={1: ('v4:1x1x1', 'megacore', (1, 1, 1)),
                                 4: ('v4:2x2x1', 'megacore', (2, 2, 1)),
                                 8: ('v4:2x2x2', 'megacore', (2, 2, 1))}),
    'cpu': Target('cpu', 'cpu', 'this machine\'s CPU (XLA CPU backend)'),
}


def get_target(name: str) -> Target:
  """The target of a command-line name (TargetError naming the valid ones)."""
  if name not in TARGETS:
    raise TargetError(f'unknown target {name!r}; valid: {", ".join(TARGETS)}')
  return TARGETS[name]

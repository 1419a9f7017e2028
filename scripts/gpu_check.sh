#!/usr/bin/env bash
# The performance check of docs/performance.md, as one command.
#
#   bash scripts/gpu_check.sh                    # on a machine with one NVIDIA GPU (< 9 min on an H100)
#   bash scripts/gpu_check.sh --cpu-smoke        # everything tiny, on the CPU (proves the script)
#   bash scripts/gpu_check.sh --download-wheels  # on a machine with PyPI access: fill .whl/
#
# The GPU run installs nothing from the internet. It expects python3 with JAX (CUDA), flax,
# optax, orbax-checkpoint, torch and torchvision (the GPU image has them) and, in .whl/, the
# wheels of what that image lacks (--download-wheels fetches them for Python 3.12); they are
# installed with pip --no-index into a private folder. Every result goes to ${OUT:-./gpu_results}:
#   env.txt             GPU, driver, package versions
#   aot.json            scripts/aot_compile.py: the measured steps compiled ahead of time for an
#                       H100 (memory, FLOPs, HBM bytes, roofline bound); checked first
#   compute.json        bench_train compute-only: both recipes, vpr_jax vs the PyTorch variants,
#                       the step with device RandAugment, device RandAugment alone, memory
#   data.json           bench_train end-to-end, host pipeline and eval from prepared records
#                       (seed recipe, original vs prepared JPEGs, 16 workers)
#   bench_eval.json     bench_eval: descriptor extraction vs PyTorch, FAISS search, memory
#   pipeline.json       bench_pipeline: the original-JPEG pipeline by worker count
#   pipeline_prepared.json  bench_pipeline: prepared records, Pillow vs libjpeg-turbo, reused
#                       batch slots vs a new shared-memory segment per batch
#   summary.md          the performance targets, measured value and verdict for each
#   gpu_check.log       everything printed
# Each step has a time limit taken from what is left of GPU_CHECK_BUDGET_S (default 540 s); a
# step that fails or runs out of time is reported and the next one runs.
set -euo pipefail

mode=gpu
case "${1:-}" in
  '') ;;
  --cpu-smoke) mode=cpu ;;
  --download-wheels) mode=wheels ;;
  -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
  *) echo "unknown argument: $1 (use --cpu-smoke, --download-wheels or nothing)" >&2; exit 2 ;;
esac

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

# Packages the GPU image (Python 3.12, JAX, torch) lacks; versions as in the project's venv.
# The second line is what importing tensorflow_datasets and tensorboardX needs beyond a
# JAX + torch image (the modules `import vpr_jax.training` and the bench scripts load, listed in
# the project's venv).
WHEELS=(grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 ml-collections==1.1.0
        faiss-cpu==1.15.1 pytorch-metric-learning==2.9.0 importlib-resources==6.5.2
        simplejpeg==1.9.0 prometheus-client==0.26.0
        tensorflow-datasets==4.9.10 tensorflow-metadata==1.21.0 immutabledict==4.3.1
        toml==0.10.2 wrapt==2.5.2 attrs==26.1.0 six==1.17.0 tensorboardX==2.6.5)
# Published as a source archive only: built into a (pure-Python) wheel.
SDIST_WHEELS=(promise==2.3)

if [[ $mode == wheels ]]; then
  mkdir -p .whl
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
  python3 -m pip wheel --no-deps -w .whl "${SDIST_WHEELS[@]}"
  ls -la .whl
  exit 0
fi

OUT="${OUT:-./gpu_results}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
log="$OUT/gpu_check.log"
: >"$log"
budget="${GPU_CHECK_BUDGET_S:-540}"
start_s=$SECONDS
failed=()

say() { echo "[gpu_check $((SECONDS - start_s))s] $*" | tee -a "$log"; }

# run NAME MIN_SECONDS COMMAND...: runs a step within what is left of the budget.
run() {
  local name=$1 need=$2
  shift 2
  local left=$((budget - (SECONDS - start_s)))
  if ((left < need)); then
    say "SKIPPED $name: ${left}s left, needs ~${need}s"
    failed+=("$name (skipped: out of time)")
    return 0
  fi
  say "START $name (limit ${left}s): $*"
  local rc=0
  timeout --kill-after=10 "$left" "$@" 2>&1 | tee -a "$log" || rc=${PIPESTATUS[0]}
  if ((rc != 0)); then
    say "FAILED $name (exit $rc)"
    failed+=("$name (exit $rc)")
  else
    say "DONE $name"
  fi
}

export PYTHONUNBUFFERED=1
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
# JAX must not take 75% of the GPU up front: the PyTorch reference runs in the same process.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# Compiled programs are reused between the steps (separate processes compile the same step).
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/vpr_jax_compile_cache}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1

if [[ $mode == cpu ]]; then
  if [[ -x .venv/bin/python ]]; then py=.venv/bin/python; else py=python3; fi
  export JAX_PLATFORMS=cpu
  # 8 virtual devices: the multi-device code path (correctness, not speed).
  export XLA_FLAGS="--xla_force_host_platform_device_count=8 ${XLA_FLAGS:-}"
  budget="${GPU_CHECK_BUDGET_S:-1500}"
  work="$(mktemp -d /tmp/vpr_jax_gpu_check.XXXXXX)"
else
  py=python3
  if [[ -d .whl ]] && compgen -G '.whl/*.whl' >/dev/null; then
    site=/tmp/vpr_jax_site
    say "installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into $site (no index)"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$site" .whl/*.whl 2>&1 | tee -a "$log"
    export PYTHONPATH="$repo:$site${PYTHONPATH#"$repo"}"
  fi
  work="$(mktemp -d /tmp/vpr_jax_gpu_check.XXXXXX)"
fi
trap 'rm -rf "$work"' EXIT

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "mode: $mode"
  echo "host: $(uname -a)"
  echo "cpus: $(nproc)"
  if command -v nvidia-smi >/dev/null; then nvidia-smi || true; fi
  "$py" - <<'EOF'
import importlib
for name in ('jax', 'jaxlib', 'flax', 'optax', 'orbax.checkpoint', 'grain', 'array_record',
             'ml_collections', 'faiss', 'numpy', 'PIL', 'simplejpeg', 'torch', 'torchvision',
             'pytorch_metric_learning'):
  try:
    module = importlib.import_module(name)
    print(f'{name}: {getattr(module, "__version__", "?")}')
  except Exception as e:  # pylint: disable=broad-except
    print(f'{name}: MISSING ({type(e).__name__}: {e})')
import jax
print('jax devices:', jax.devices())
EOF
} >"$OUT/env.txt" 2>&1 || true
cat "$OUT/env.txt" | tee -a "$log"
# Nothing else can run without these.
"$py" -c 'import jax, grain, ml_collections, faiss, vpr_jax.training' 2>&1 | tee -a "$log"

if [[ $mode == cpu ]]; then
  tiny=(--tiny)
  workers=2
  data_args=(--synthetic_places 8 --source_size 96,128)
  eval_args=(--tiny --faiss_full)
  pipeline_args=(--workers 0,2 --num-batches 2 --places-per-batch 4 --images-per-place 2
                 --image-size 32,32 --synthetic-places 8 --source-size 96,128)
  compute_extra=(--num_devices 1,8 --compute_augment none,device --dtype bfloat16)
else
  tiny=()
  workers=16
  # 400 places x 4 images of 480x640 (GSV-Cities' size), written by 16 processes.
  data_args=(--synthetic_places 400 --source_size 480,640)
  eval_args=(--channels_last)
  # Each worker builds whole batches: warm-up and timed batches span several rounds of 16.
  pipeline_args=(--workers 16 --num-batches 64 --warmup-batches 32 --places-per-batch 16
                 --images-per-place 4 --image-size 224,224 --synthetic-places 64
                 --source-size 480,640)
  compute_extra=()
fi

# 0. The AOT compile of the measured steps (train step + eval forward of both recipes) for an
#    H100 description, on the CPU client: a compile error stops the run here, before any of the
#    device time goes to the measurements (scripts/aot_compile.py; cpu-smoke: the CPU target).
#    Run the same command on the CPU machine before asking for a GPU.
if [[ $mode == cpu ]]; then
  aot_args=(--targets cpu --devices 1,8 --configs mixvpr --places_per_batch 2 --image_size 64
            --set data.eval_batch_size=8)
else
  aot_args=(--targets h100 --devices 1 --configs mixvpr,mixvpr_r50)
fi
run aot 60 env JAX_PLATFORMS=cpu "$py" scripts/aot_compile.py "${aot_args[@]}" \
  --output "$OUT/aot.json"
if ((${#failed[@]})) && [[ ${failed[0]} != 'aot (exit 3)' ]]; then
  say "the AOT compile failed: nothing is measured (fix the compile first)"
  exit 1
fi
# Exit 3: no CUDA plugin metadata in this python (then the measurements still run).
failed=()

# 1. Compute-only train step, both recipes, vpr_jax (jit and pmap) vs PyTorch (eager,
#    channels_last, compile).
run compute 120 "$py" scripts/bench_train_compute.py "${tiny[@]}" --parallel jit,pmap \
  "${compute_extra[@]}" --output "$OUT/compute.json"
# 2. End to end (seed recipe): original vs prepared JPEGs, device RandAugment, host pipeline
#    alone, descriptors from prepared records; then the step with device RandAugment and
#    device RandAugment alone (appended to data.json's compute/augment sections).
run data 90 "$py" scripts/bench_train.py "${tiny[@]}" --configs configs/mixvpr.py \
  --modes compute,augment,pipeline,end_to_end,eval --compute_augment none,device \
  --sources original,prepared --augment device --workers "$workers" --threaded_prefetch \
  --reference none \
  "${data_args[@]}" --workdir "$work/data" --output "$OUT/data.json"
# 3. Evaluation: descriptor extraction vs PyTorch, FAISS on an SF-XS test-sized problem, memory.
run eval 60 "$py" scripts/bench_eval.py "${eval_args[@]}" --output "$OUT/bench_eval.json"
# 4. The original-JPEG pipeline with CPU RandAugment (the seed's path), by worker count.
run pipeline 30 "$py" scripts/bench_pipeline.py "${pipeline_args[@]}" \
  --output "$OUT/pipeline.json"
# 5. Prepared records, no CPU augmentation: Pillow vs libjpeg-turbo, reused batch slots vs a new
#    segment per batch (the host's input capacity for device RandAugment).
run prepared_pipeline 40 "$py" scripts/bench_pipeline.py "${pipeline_args[@]}" \
  --source prepared --decoders pil,turbo --batch-memory reuse,new --augment none \
  --output "$OUT/pipeline_prepared.json"

# The performance targets, from the JSON files.
"$py" - "$OUT" "$mode" <<'EOF' 2>&1 | tee -a "$log"
import json, os, sys
out, mode = sys.argv[1], sys.argv[2]

def load(name):
  path = os.path.join(out, name)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)

compute, data, bench_eval = load('compute.json'), load('data.json'), load('bench_eval.json')
prepared_pipeline = load('pipeline_prepared.json')
rows = []

def verdict(value, target, higher=True):
  if value is None:
    return 'not measured'
  if mode == 'cpu':
    return 'smoke run'
  return 'PASS' if (value >= target if higher else value < target) else 'FAIL'

def fmt(value, unit=''):
  return 'n/a' if value is None else f'{value:,.2f}{unit}' if value < 100 else f'{value:,.0f}{unit}'

for row in (compute or {}).get('compute', []):
  if row['augment'] == 'none' and row['num_devices'] == 1:
    ratio = row.get('ratio')
    rows.append((f'{row["config"]}: compute-only vs fastest PyTorch ({row.get("reference_variant")})',
                 '>= 1.3x', f'{fmt(row["vpr_jax_img_per_s"])} vs {fmt(row.get("reference_img_per_s"))} img/s = {fmt(ratio, "x")}',
                 verdict(ratio, 1.3)))
  if row['num_devices'] > 1 and 'per_device_vs_one_device' in row:
    rows.append((f'{row["config"]}: per-device img/s on {row["num_devices"]} devices vs 1',
                 '>= 0.9x', fmt(row['per_device_vs_one_device'], 'x'),
                 verdict(row['per_device_vs_one_device'], 0.9)))
for row in (data or {}).get('end_to_end', []):
  if row['mode'] == 'end_to_end':
    ratio = row.get('ratio_to_compute')
    rows.append((f'end to end, {row["label"]}', '>= 0.8x compute-only',
                 f'{fmt(row["img_per_s"])} img/s = {fmt(ratio, "x")}', verdict(ratio, 0.8)))
  else:
    rows.append((f'host pipeline, {row["label"]}', '(input capacity)',
                 f'{fmt(row["img_per_s"])} img/s', ''))
for row in (prepared_pipeline or {}).get('results', []):
  rows.append((f'host pipeline, prepared records, {row["decoder"]}, {row["workers"]} workers, '
               f'{row.get("batch_memory") or "in process"} batch memory', '(input capacity)',
               f'{fmt(row["images_per_sec"])} img/s ({fmt(row.get("images_per_cpu_sec"))} '
               'img/CPU-s)', ''))
for row in (data or {}).get('compute', []):
  if row['augment'] == 'device':
    rows.append((f'{row["config"]}: compute-only step with device RandAugment', '(cost)',
                 f'{fmt(row["vpr_jax_img_per_s"])} img/s', ''))
for row in (data or {}).get('augment', []):
  rows.append((f'{row["config"]}: device RandAugment alone', '(cost)',
               f'{fmt(row["img_per_s"])} img/s', ''))
for row in (data or {}).get('eval', []):
  rows.append((f'descriptors from prepared records, {row["label"]}', '>= 40,000 img/s',
               f'{fmt(row["img_per_s"])} img/s', verdict(row['img_per_s'], 40000)))
for row in (bench_eval or {}).get('rows', []):
  target = '>= 40,000 img/s' if row['config'] == 'mixvpr' else '(largest config)'
  rows.append((f'{row["config"]}: eval forward, device-resident batch {row["batch"]}', target,
               f'{fmt(row["vpr_jax_img_per_s"])} img/s (PyTorch {fmt(row.get("reference_img_per_s"))})',
               verdict(row['vpr_jax_img_per_s'], 40000) if row['config'] == 'mixvpr' else ''))
for problem in (bench_eval or {}).get('faiss', []):
  if problem['problem'].startswith('27191x1000'):
    rows.append((f'FAISS exact search {problem["problem"]} (CPU)', '< 1 s',
                 f'{problem["seconds"]:.3f} s', verdict(problem['seconds'], 1.0, higher=False)))
peaks = [p for p in ((compute or {}).get('peak_device_bytes'),
                     (bench_eval or {}).get('peak_device_bytes')) if p]
rows.append(('peak device memory (largest config: MixVPR-paper recipe)', '(report)',
             f'{max(peaks) / 2**30:.2f} GiB' if peaks else 'n/a', ''))
env = (compute or data or {}).get('env', {})
lines = [f'# gpu_check summary ({mode})', '',
         f'{env.get("date", "?")}, {env.get("device", "?")} x {env.get("num_devices", "?")}, '
         f'{env.get("cpu_count", "?")} CPUs, JAX {env.get("jax", "?")}, torch '
         f'{env.get("torch", "?")}', '',
         '| check | target | measured | verdict |', '|---|---|---|---|']
lines += [f'| {a} | {b} | {c} | {d} |' for a, b, c, d in rows]
if mode == 'cpu':
  lines += ['', 'CPU smoke run: tiny sizes, the figures say nothing about speed.']
text = '\n'.join(lines) + '\n'
with open(os.path.join(out, 'summary.md'), 'w') as f:
  f.write(text)
print(text)
EOF

say "finished in $((SECONDS - start_s))s; results in $OUT"
if ((${#failed[@]})); then
  say "steps that did not finish: ${failed[*]}"
  exit 1
fi

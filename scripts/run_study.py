"""Runs the seed's study (aggregators, losses, optimisers) and writes its tables and R@1 plot.

Each study entry is a config file plus overrides. Every entry is trained with
`python -m vpr_jax.train` in its own workdir (rerunning the script resumes unfinished runs and
skips finished ones), then its best checkpoint is evaluated with `python -m vpr_jax.eval` on the
test datasets. The script writes, under --out:
  results.md     one markdown table per dataset: R@1, 5, 10, 15, 20 per entry (the seed's tables)
  results.json   the same numbers
  val_r1.png     validation R@1 per epoch per entry (from each run's metrics.jsonl)

On real data (VPR_DATA_ROOT holding GSV-Cities, SF-XS and Tokyo-XS):
  python scripts/run_study.py --out runs/study
On the synthetic city with tiny settings (what CI runs):
  python scripts/run_study.py --out /tmp/study --synthetic --entries avg,mixvpr --max_steps 4
"""

import argparse
import json
import os
import subprocess
import sys

# name -> (config file, overrides). The seed's study: aggregators with MS loss and AdamW; MixVPR
# with the three losses; MixVPR with the three optimisers ('adam' is AdamW, as in the seed).
STUDY = {
    'avg': ('configs/avg.py', []),
    'gem': ('configs/gem.py', []),
    'convap': ('configs/convap.py', []),
    'mixvpr': ('configs/mixvpr.py', []),
    'mixvpr_contrastive': ('configs/mixvpr_contrastive.py', []),
    'mixvpr_triplet': ('configs/mixvpr_triplet.py', []),
    'mixvpr_sgd': ('configs/mixvpr.py', ['--config.optim.optimizer=sgd',
                                         '--config.optim.learning_rate=0.05']),
    'mixvpr_adam': ('configs/mixvpr.py', ['--config.optim.optimizer=adam']),
    'mixvpr_adamw_1e-3': ('configs/mixvpr.py', ['--config.optim.learning_rate=1e-3',
                                                '--config.optim.weight_decay=1e-3']),
}
REAL_TEST_DATASETS = 'sf_xs_val,sf_xs_test,tokyo_xs'
SYNTHETIC_TEST_DATASETS = 'synthetic/synthetic_val,synthetic/synthetic_test'
TABLE_NS = ('1', '5', '10', '15', '20')
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def synthetic_overrides(config_file: str) -> list[str]:
  """Overrides that turn a seed config into a tiny run on the demo's synthetic city."""
  del config_file
  return [
      '--config.data.synthetic.enabled=True',
      '--config.data.synthetic.num_train_places=48',
      '--config.data.synthetic.num_eval_places=12',
      '--config.data.synthetic.image_size=(32, 32)',
      '--config.data.train_layout=gsv_cities',
      '--config.data.train_dir=synthetic/gsv_cities',
      "--config.data.cities=('SynthA', 'SynthB')",
      "--config.data.val_datasets=('synthetic/synthetic_val',)",
      '--config.data.places_per_batch=8',
      '--config.data.images_per_place=2',
      '--config.data.min_img_per_place=2',
      '--config.data.augment=none',
      '--config.data.num_workers=0',
      '--config.data.eval_batch_size=16',
      '--config.image_size=(32, 32)',
      '--config.model.layers_to_crop=(3, 4)',
      '--config.model.layers_to_freeze=-1',
      '--config.model.mixvpr_out_channels=32',
      '--config.model.mixvpr_mix_depth=1',
      '--config.model.convap_out_channels=32',
      '--config.optim.warmup_steps=2',
      '--config.optim.milestones=(1,)',
      '--config.log_every_steps=1',
      '--config.eval_before_training=True',
  ]


def run(cmd: list[str], log_path: str):
  """Runs a command from the repository root, teeing its output into log_path."""
  print('$ ' + ' '.join(cmd), flush=True)
  with open(log_path, 'a') as log:
    proc = subprocess.run(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    log.write(proc.stdout)
  if proc.returncode != 0:
    sys.stdout.write(proc.stdout[-4000:])
    raise SystemExit(f'command failed ({proc.returncode}); full log: {log_path}')


def read_validation_curve(workdir: str) -> list[tuple[int, float]]:
  """(epoch, R@1) of the first validation dataset, from a run's metrics.jsonl."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  curve, first_dataset = {}, None
  with open(path) as f:
    for line in f:
      record = json.loads(line)
      if 'recall' not in record:
        continue
      first_dataset = first_dataset or record['dataset']
      if record['dataset'] == first_dataset:
        curve[record['epoch']] = record['recall']['1']
  return sorted(curve.items())


def markdown_tables(results: dict) -> str:
  """One table per dataset, rows = study entries, columns = R@N."""
  datasets = []
  for per_dataset in results.values():
    datasets += [d for d in per_dataset if d not in datasets]
  lines = []
  for dataset in datasets:
    lines += [f'### {dataset}', '', '| entry | ' + ' | '.join(f'R@{n}' for n in TABLE_NS) + ' |',
              '|---|' + '---|' * len(TABLE_NS)]
    for name, per_dataset in results.items():
      if dataset in per_dataset:
        recall = per_dataset[dataset]
        lines.append(f'| {name} | ' + ' | '.join(f'{recall[n]:.2f}' for n in TABLE_NS) + ' |')
    lines.append('')
  return '\n'.join(lines)


def plot_curves(curves: dict, path: str):
  """Validation R@1 per epoch, one line per study entry."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name, curve in curves.items():
    if curve:
      ax.plot([e for e, _ in curve], [r for _, r in curve], marker='o', label=name)
  ax.set_xlabel('epoch')
  ax.set_ylabel('validation R@1 (%)')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--out', required=True, help='folder for the runs, tables and plot')
  parser.add_argument('--entries', default=','.join(STUDY),
                      help=f'comma-separated subset of: {", ".join(STUDY)}')
  parser.add_argument('--datasets', default=None,
                      help='test datasets for the tables (default: SF-XS val/test and Tokyo-XS, '
                      'or the synthetic splits with --synthetic)')
  parser.add_argument('--data_root', default='', help='data root (default: $VPR_DATA_ROOT)')
  parser.add_argument('--synthetic', action='store_true',
                      help='tiny runs on the generated synthetic city (smoke test)')
  parser.add_argument('--max_steps', type=int, default=0, help='stop each run after N steps')
  parser.add_argument('--num_epochs', type=int, default=0, help='override the epochs per run')
  args = parser.parse_args(argv)

  entries = [e.strip() for e in args.entries.split(',') if e.strip()]
  unknown = [e for e in entries if e not in STUDY]
  if unknown:
    parser.error(f'unknown study entries {unknown}; valid: {", ".join(STUDY)}')
  datasets = args.datasets or (SYNTHETIC_TEST_DATASETS if args.synthetic else REAL_TEST_DATASETS)
  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  data_root = args.data_root or os.environ.get('VPR_DATA_ROOT', '')
  if args.synthetic and not data_root:
    data_root = os.path.join(out, 'data')

  results, curves = {}, {}
  for name in entries:
    config_file, overrides = STUDY[name]
    workdir = os.path.join(out, name)
    log_path = os.path.join(out, f'{name}.log')
    extra = list(overrides)
    if args.synthetic:
      extra = synthetic_overrides(config_file) + extra
    if args.max_steps:
      extra.append(f'--config.max_steps={args.max_steps}')
    if args.num_epochs:
      extra.append(f'--config.num_epochs={args.num_epochs}')
    if data_root:
      extra.append(f'--config.data.root={data_root}')
    run([sys.executable, '-m', 'vpr_jax.train', f'--config={config_file}', f'--workdir={workdir}']
        + extra, log_path)
    eval_json = os.path.join(out, f'{name}_eval.json')
    eval_cmd = [sys.executable, '-m', 'vpr_jax.eval', f'--checkpoint={workdir}',
                f'--dataset={datasets}', f'--output={eval_json}']
    if data_root:
      eval_cmd.append(f'--data_root={data_root}')
    run(eval_cmd, log_path)
    with open(eval_json) as f:
      evaluated = json.load(f)
    if isinstance(evaluated, dict):
      evaluated = [evaluated]
    results[name] = {r['dataset']: r['recall'] for r in evaluated}
    curves[name] = read_validation_curve(workdir)

  with open(os.path.join(out, 'results.json'), 'w') as f:
    json.dump({'results': results, 'validation_r1': curves}, f, indent=2)
  tables = markdown_tables(results)
  with open(os.path.join(out, 'results.md'), 'w') as f:
    f.write(tables)
  plot_curves(curves, os.path.join(out, 'val_r1.png'))
  print(tables)
  print(f'wrote {out}/results.md, results.json, val_r1.png')


if __name__ == '__main__':
  main()

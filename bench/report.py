"""The results file and BENCHMARKS.md block that bench/run_all.py writes: the
tables, the machine facts, and the atomic write of both."""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import re

BEGIN, END = '<!-- run_all:begin -->', '<!-- run_all:end -->'

TABLES = (  # (title, header, rows); a cell is text, or 'key:format' of a result
    ('ddnn_jax against the PyTorch eager peer (bench/torch_peer.py), one process each, '
     'alternating {train[1]} rounds x {train[0]} train steps ({eval[1]} x {eval[0]} eval); '
     'ratio = torch / ddnn_jax median step time (> 1: ddnn_jax faster); check = |loss '
     'difference| (train) or largest logit difference (eval), same variables and batch.',
     ('cifar_resnet20, fp32', 'ddnn_jax img/s', 'PyTorch img/s', 'ratio', 'check'),
     (('EKD train step, width 1.0, batch 128', 'ekd_w1_jax_img_s:.1f',
       'ekd_w1_torch_img_s:.1f', 'ekd_train_vs_torch_w1:.2f', 'peer_loss_abs_diff_w1:.1e'),
      ('EKD train step, width 0.5, batch 128', 'ekd_w05_jax_img_s:.1f',
       'ekd_w05_torch_img_s:.1f', 'ekd_train_vs_torch_w05:.2f', 'peer_loss_abs_diff_w05:.1e'),
      ('same, width 1.0, PyTorch with the same malloc setting', 'ekd_w1_jax_img_s:.1f',
       'ekd_w1_torch_kept_img_s:.1f', 'ekd_train_vs_torch_w1_kept_memory:.2f', ''),
      ('same, width 0.5, PyTorch with the same malloc setting', 'ekd_w05_jax_img_s:.1f',
       'ekd_w05_torch_kept_img_s:.1f', 'ekd_train_vs_torch_w05_kept_memory:.2f', ''),
      ('eval forward (full net), width 1.0, batch 256', 'eval_w1_jax_img_s:.1f',
       'eval_w1_torch_img_s:.1f', 'eval_vs_torch:.2f', 'eval_w1_torch_logits_max_abs_diff:.1e'))),
    ('Fused EKD step against three separately jitted single-depth steps: median ms, '
     'width 0.5, batch 128, {fused[1]} rounds x {fused[0]} steps each, in turn.',
     ('fused EKD step', '1,1,1 alone', '2,2,2 alone', '3,3,3 alone', 'fused / sum alone'),
     (('fused_step_ms:.1f', 'single_step_ms_d1-1-1:.1f', 'single_step_ms_d2-2-2:.1f',
       'single_step_ms_d3-3-3:.1f', 'fused_vs_separate_ratio:.3f'),)),
    ('The DDNN at depth 2,2,2 against the standalone net of that depth: compiled eval '
     'forward, width 0.5, batch 256, XLA convolutions, {subnet[1]} x {subnet[0]} runs each.',
     ('', 'DDNN at 2,2,2', 'standalone 2,2,2', 'ratio'),
     (('GFLOPs (XLA cost analysis)', 'subnet_ddnn_gflops:.3f', 'subnet_standalone_gflops:.3f',
       'subnet_flops_ratio:.3f'),
      ('median ms', 'subnet_ddnn_ms:.2f', 'subnet_standalone_ms:.2f',
       'subnet_time_ratio:.3f'))),
    ('Throughput against what it feeds or could reach.',
     ('', 'value', 'against', 'ratio'),
     (('CIFAR-10 pipeline img/s / EKD w0.5 step img/s', 'pipeline_img_s:.0f',
       'ekd_w05_jax_img_s:.1f', 'pipeline_vs_step_ratio:.2f'),
      ('EKD w1.0 train GFLOP/s / 2048^3 fp32 matmul GFLOP/s', 'train_gflops:.1f',
       'matmul_gflops:.1f', 'train_fraction_of_matmul_peak:.3f'))),
    ('EKD training on the CIFAR-10 tar: an epoch (45,000 images, input pipeline included, '
     'compile not; extrapolated from the fraction run) and the evaluation after it '
     '(checkpoint save included), from the log time stamps of {runs}.',
     ('', 'epoch s', 'eval s', 'epoch fraction run', 'run wall s'),
     tuple((f'width {w}', f'epoch_s_{t}:.0f', f'eval_s_{t}:.1f', 'epoch_extrapolated_from:g',
            f'epoch_{t}_run_wall_s:.0f') for w, t in (('0.5', 'w05'), ('1.0', 'w1')))),
    ('Compile seconds of the EKD width-0.5 programs in a fresh process, with an empty '
     '(cold), then the populated (cached) persistent compilation cache.',
     ('cache', 'train step', 'eval step', 'total'),
     tuple((k, f'compile_{k}_train_step_s:.2f', f'compile_{k}_eval_step_s:.2f',
            f'compile_{k}_s:.2f') for k in ('cold', 'cached'))),
)


def cell(r: dict, text: str) -> str:
  if not re.fullmatch(r'[\w.-]+:[.\w]+', text):
    return text
  key, spec = text.rsplit(':', 1)
  if r.get(key) is None:
    reason = r.get(f'{key}_skipped')
    return f'n/a ({reason.splitlines()[0][:160]})' if reason else 'n/a'
  return format(r[key], spec)


def markdown(r: dict) -> str:
  m, command = r['machine'], f'Command: `{r["command"]}`'
  lines = [f'## bench/run_all.py{" --quick" if r["settings"]["quick"] else ""}, '
           f'{m["date"]}\n', '| CPU | nproc | load avg at start / end | jax / jaxlib | '
           'torch | XLA_FLAGS |', '|---|---:|---|---|---|---|',
           f'| {m["cpu_model"]} | {m["nproc"]} | {m["loadavg_start"]} / '
           f'{m["loadavg_end"]} | {m["jax"]} / {m["jaxlib"]} | {m["torch"]} | '
           f'`{m["XLA_FLAGS"]}` |', '', command, '']
  runs = '; '.join(f'`{r[k]}`' for k in ('epoch_w05_command', 'epoch_w1_command')
                   if r.get(k)) or 'not run'
  for title, header, rows in TABLES:
    lines += [title.format(**r['settings'], runs=runs), '', '| ' + ' | '.join(header) + ' |',
              '|---' + '|---:' * (len(header) - 1) + '|']
    lines += ['| ' + ' | '.join(cell(r, c) for c in row) + ' |' for row in rows]
    lines += ['', command, '']
  return '\n'.join(lines)


def machine_facts() -> dict:
  with open('/proc/cpuinfo') as f:
    models = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]

  def version(package):
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
      return importlib.metadata.version(package)
    return None

  return {'cpu_model': models[0] if models else platform.processor(),
          'nproc': os.cpu_count(), 'cpus_usable': len(os.sched_getaffinity(0)),
          'loadavg_start': [round(x, 2) for x in os.getloadavg()], 'loadavg_end': None,
          'jax': version('jax'), 'jaxlib': version('jaxlib'), 'torch': version('torch'),
          'python': platform.python_version(), 'XLA_FLAGS': os.environ.get('XLA_FLAGS', ''),
          'JAX_PLATFORMS': os.environ.get('JAX_PLATFORMS'),
          'date': datetime.datetime.now().astimezone().isoformat(timespec='seconds')}


def write_outputs(results: dict, out: str, markdown_path: str) -> None:
  """The JSON, and the Markdown block between the markers (appended if absent)."""
  results['machine']['loadavg_end'] = [round(x, 2) for x in os.getloadavg()]
  old = pathlib.Path(markdown_path).read_text() if os.path.exists(markdown_path) else ''
  block = f'{BEGIN}\n{markdown(results)}\n{END}'
  begin, end = old.find(BEGIN), old.find(END)
  text = (old[:begin] + block + old[end + len(END):] if 0 <= begin < end
          else (old.rstrip('\n') + '\n\n' if old else '') + block + '\n')
  for path, content in ((out, json.dumps(results, indent=2) + '\n'), (markdown_path, text)):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(f'{path}.tmp', 'w') as f:
      f.write(content)
    os.replace(f'{path}.tmp', path)

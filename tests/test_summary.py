"""The model summary CLI, run as a user runs it."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_summary(*args):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  return subprocess.run([sys.executable, '-m', 'ddnn_jax.summary', *args],
                        capture_output=True, text=True, env=env, timeout=300)


def test_json_lists_each_requested_depth():
  result = run_summary('--model', 'cifar_resnet56', '--num-classes', '10',
                       '--depths', '3,3,3', '9,9,9', '1,2,3', '--json')
  assert result.returncode == 0, result.stderr
  rows = json.loads(result.stdout)
  assert [row['depth'] for row in rows] == [[3, 3, 3], [9, 9, 9], [1, 2, 3]]
  assert all(set(row) == {'depth', 'params', 'flops'} for row in rows)
  # (3,3,3) of ResNet-56 is ResNet-20: 0.27M parameters, cheaper than the full net.
  assert rows[0]['params'] == pytest.approx(0.27e6, rel=0.02)
  assert rows[1]['params'] == pytest.approx(0.85e6, rel=0.02)
  assert 0 < rows[2]['flops'] < rows[0]['flops'] < rows[1]['flops']
  assert isinstance(rows[0]['params'], int)


def test_default_is_the_full_depth_and_table_has_fractions():
  result = run_summary('--model', 'cifar_resnet20', '--num-classes', '10',
                       '--depths', '1,1,1', '3,3,3')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert lines[0].startswith('| model | depth |')
  assert '| cifar_resnet20 | 1,1,1 |' in lines[2]
  assert lines[3].startswith('| cifar_resnet20 | 3,3,3 | cifar_resnet20 |')
  assert lines[3].endswith('| 100.0% | 100.0% |')
  default = run_summary('--model', 'cifar_resnet20', '--num-classes', '10', '--json')
  assert [row['depth'] for row in json.loads(default.stdout)] == [[3, 3, 3]]


@pytest.mark.parametrize('args,message', [
    (['--model', 'resnet19'], "unknown model 'resnet19'"),
    (['--model', 'resnet18', '--depths', '2,3,2,2'], 'stage 2 has 3 blocks; allowed 1..2'),
    (['--model', 'resnet18', '--depths', '2,2,2'], 'has 3 entries but the model has 4'),
    (['--model', 'resnet18', '--depths', '0,2,2,2'], 'stage 1 has 0 blocks'),
    (['--model', 'resnet18', '--depths', '2,two,2,2'], 'not a comma-separated list'),
    (['--model', 'resnet18', '--num-classes', '0'], 'num_classes must be a positive'),
    (['--model', 'resnet18', '--image-size', '0'], '--image-size must be positive'),
])
def test_bad_input_is_one_line_on_stderr_and_status_2(args, message):
  result = run_summary(*args)
  assert result.returncode == 2
  assert result.stdout == ''
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith('error: ') and message in lines[0]

"""Choosing a depth under a budget (ddnn_jax.search): the candidates, the
Pareto front, and on a tiny trained run the measured columns against
evaluate's own numbers (compiled FLOPs, top-1 after the same per-depth
BatchNorm re-calibration); bad input is one line and exit 2."""

import itertools
import json
import os

import pytest
from conftest import evaluate_cli, run_cli, train_tiny_folder_run

from ddnn_jax import search


def search_cli(*args) -> int:
  return run_cli(search, *args)


def test_candidates_are_every_depth_or_a_spread_that_keeps_the_trained_ones():
  every = list(itertools.product(range(1, 4), repeat=3))
  assert sorted(search.candidate_depths((3, 3, 3), 27)) == sorted(every)
  trained = [(1, 1, 1), (2, 2, 2), (3, 3, 3)]
  chosen = search.candidate_depths((3, 3, 3), 6, trained)
  assert len(chosen) == len(set(chosen)) == 6 and set(trained) <= set(chosen)
  assert [sum(d) for d in chosen] == sorted(sum(d) for d in chosen)
  assert {sum(d) for d in chosen} >= {3, 5, 7, 9}  # spread over the block counts
  # More depths to keep than the bound: all of them, nothing else.
  assert search.candidate_depths((3, 3, 3), 2, trained) == trained
  # A large net stays bounded.
  assert len(search.candidate_depths((18, 18, 18), 10)) == 10


def test_pareto_front_keeps_the_rows_nothing_beats():
  rows = [{'depth': [1], 'gflops': 1.0, 'top1': 0.5},
          {'depth': [2], 'gflops': 2.0, 'top1': 0.4},  # dearer and worse than [1]
          {'depth': [3], 'gflops': 2.0, 'top1': 0.7},
          {'depth': [4], 'gflops': 3.0, 'top1': 0.7},  # as good as [3], dearer
          {'depth': [5], 'gflops': 4.0, 'top1': 0.8}]
  assert [r['depth'] for r in search.pareto_front(rows, 'gflops')] == [[1], [3], [5]]


@pytest.fixture(scope='module')
def trained(cifar_roots, tmp_path_factory):
  """A tiny trained run and its evaluation with BN re-calibrated on 2 batches."""
  tmp = tmp_path_factory.mktemp('search')
  workdir = train_tiny_folder_run(cifar_roots[0], str(tmp / 'run'))
  assert evaluate_cli('--workdir', workdir, '--recalibrate_bn', '2') == 0
  with open(os.path.join(workdir, 'eval_validation_bnrecal2.json')) as f:
    evaluated = {tuple(r['depth']): r for r in json.load(f)['depths']}
  return workdir, evaluated, tmp


def test_search_under_a_flops_budget(trained, capsys):
  workdir, evaluated, tmp = trained
  out = tmp / 'flops'
  budget = evaluated[(2, 2, 2)]['flops'] / 1e9  # (2, 2, 2) fits, (3, 3, 3) does not
  assert search_cli('--workdir', workdir, f'--budget_gflops={budget}', '--max_candidates=5',
                    '--recalibrate_bn=2', '--timing_runs=3', f'--out={out}') == 0
  printed = capsys.readouterr().out
  assert '| depth | params | GFLOPs |' in printed and 'best under' in printed
  result = json.loads((out / 'search.json').read_text())
  rows = {tuple(r['depth']): r for r in result['rows']}
  assert len(rows) == 5 and set(evaluated) <= set(rows)
  assert result['examples'] == 50 and result['all_depths'] == 27
  for depth, row in evaluated.items():  # evaluate's numbers for the trained depths
    assert rows[depth]['gflops'] == pytest.approx(row['flops'] / 1e9, rel=1e-6)
    assert rows[depth]['top1'] == pytest.approx(row['top1'], abs=1e-6)
    assert rows[depth]['params'] == row['params'] and rows[depth]['ms'] > 0
  # The choice and the front, checked by brute force.
  fits = [r for r in rows.values() if r['gflops'] <= budget]
  assert result['best']['top1'] == max(r['top1'] for r in fits)
  assert tuple(result['best']['depth']) != (3, 3, 3)
  dominated = {d for d, r in rows.items() for s in rows.values()
               if s['gflops'] <= r['gflops'] and s['top1'] >= r['top1']
               and (s['gflops'], s['top1']) != (r['gflops'], r['top1'])}
  assert {tuple(d) for d in result['front']} == set(rows) - dominated
  assert (out / 'search_pareto.png').stat().st_size > 1000


def test_search_under_a_latency_budget(trained, capsys):
  workdir, _, tmp = trained
  out = tmp / 'ms'
  assert search_cli('--workdir', workdir, '--budget_ms=1e6', '--batch=4',
                    '--max_candidates=2', '--recalibrate_bn=1', '--eval_batches=1',
                    '--timing_runs=3', f'--out={out}') == 0
  capsys.readouterr()
  result = json.loads((out / 'search.json').read_text())
  # The bound gives way to the depths the run trained.
  assert [r['depth'] for r in result['rows']] == [[1, 1, 1], [2, 2, 2], [3, 3, 3]]
  assert result['budget'] == {'ms': 1e6, 'batch': 4}
  assert result['best']['top1'] == max(r['top1'] for r in result['rows'])


@pytest.mark.parametrize('args, message', [
    ((), 'give one budget'),
    (('--budget_gflops=1', '--budget_ms=1'), 'give one budget'),
    (('--budget_gflops=-1',), 'the budget must be positive'),
    (('--budget_gflops=1e-9', '--max_candidates=2'), 'no candidate depth fits'),
    (('--budget_ms=1', '--workdir=/nonexistent/run'), 'config.json does not exist'),
])
def test_bad_input_is_one_line_and_exit_2(trained, capsys, args, message):
  workdir, _, tmp = trained
  assert search_cli(f'--workdir={workdir}', '--timing_runs=1', f'--out={tmp}/bad',
                    *args) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith('error: ') and message in err[-1], err[-1]
  assert not (tmp / 'bad').exists()

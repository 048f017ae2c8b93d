"""The launch scripts, run with --dry-run as a user runs them (no gcloud or sbatch needed)."""

import configparser
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_POD = os.path.join(ROOT, 'launch', 'tpu_pod.sh')
SLURM_GPU = os.path.join(ROOT, 'launch', 'slurm_gpu.sh')
SCRIPTS = [TPU_POD, SLURM_GPU, os.path.join(ROOT, 'launch', 'common.sh')]


def run_script(script, *args, env=None, cwd=ROOT, timeout=60):
  return subprocess.run(['bash', script, *args], capture_output=True, text=True,
                        env=env, cwd=cwd, timeout=timeout)


def jax_pin():
  """The jax version setup.cfg pins, read independently of the scripts."""
  setup = configparser.ConfigParser()
  setup.read(os.path.join(ROOT, 'setup.cfg'))
  pins = [line for line in setup['options']['install_requires'].split()
          if line.startswith('jax==')]
  return pins[0].removeprefix('jax==')


def tpu_dry_run(*args):
  """The commands a TPU dry run prints, each split into words as bash would."""
  result = run_script(TPU_POD, '--dry-run', *args)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert all(line.startswith('+ ') for line in lines), result.stdout
  return [shlex.split(line[2:]) for line in lines]


def gcloud(commands, verb):
  """The `gcloud compute tpus tpu-vm VERB ...` commands, in order."""
  return [c for c in commands if c[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', verb]]


def remote(command):
  """The --command of a `gcloud ... ssh` command."""
  return command[command.index('--command') + 1]


def test_tpu_dry_run_creates_copies_installs_and_trains_on_every_worker():
  commands = tpu_dry_run('--tpu', 'ddnn-v4', '--zone', 'europe-west4-a',
                         '--accelerator-type', 'v4-64', '--workdir', 'gs://bucket/run',
                         '--override', 'num_epochs=1')
  (create,) = gcloud(commands, 'create')
  assert create[5:] == ['ddnn-v4', '--zone', 'europe-west4-a', '--accelerator-type', 'v4-64',
                        '--version', 'tpu-ubuntu2204-base']
  (scp,) = gcloud(commands, 'scp')
  assert '--worker=all' in scp and scp[6] == 'ddnn-v4:ddnn_jax.tar.gz'
  unpack, install, train = gcloud(commands, 'ssh')
  for ssh in (unpack, install, train):
    assert ssh[5:9] == ['ddnn-v4', '--zone', 'europe-west4-a', '--worker=all']
  assert 'tar -xzf ddnn_jax.tar.gz -C ddnn_jax' in remote(unpack)
  assert jax_pin() == '0.10.2'
  assert remote(install).endswith("pip install -e . 'jax[tpu]==0.10.2'")
  assert remote(train) == ('cd ddnn_jax && ~/venv/bin/python -m ddnn_jax.main '
                           '--config configs/imagenet.py --workdir gs://bucket/run '
                           '--config.num_epochs=1')
  # In order, and nothing else: no delete without --delete-after.
  assert commands.index(create) < commands.index(scp) < commands.index(train)
  assert len(commands) == 6 and not gcloud(commands, 'delete')


def test_tpu_defaults():
  commands = tpu_dry_run('--tpu', 'my-tpu', '--workdir', 'gs://bucket/run')
  (create,) = gcloud(commands, 'create')
  assert create[5:] == ['my-tpu', '--zone', 'us-central2-b', '--accelerator-type', 'v4-32',
                        '--version', 'tpu-ubuntu2204-base']
  assert not any('--project' in c for c in commands)
  # The default code is this checkout, packed from the files git knows about.
  (pack,) = [c for c in commands if c[0] == 'git']
  assert pack[:3] == ['git', '-C', ROOT] and 'tar' in pack


def test_tpu_flags_change_the_commands():
  base = ['--tpu', 'my-tpu', '--workdir', 'gs://bucket/run']
  assert not gcloud(tpu_dry_run(*base, '--skip-create'), 'create')
  for spot in ('--spot', '--preemptible'):
    (create,) = gcloud(tpu_dry_run(*base, spot), 'create')
    assert create[-1] == '--spot'
  commands = tpu_dry_run(*base, '--project', 'my-proj', '--delete-after')
  assert all(c[c.index('--project') + 1] == 'my-proj' for c in commands if c[0] == 'gcloud')
  assert commands[-1][:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'my-tpu']


def test_tpu_git_url_is_cloned_on_the_workers():
  commands = tpu_dry_run('--tpu', 'my-tpu', '--workdir', 'gs://bucket/run',
                         '--repo', 'https://github.com/me/ddnn_jax.git')
  assert not gcloud(commands, 'scp')
  assert 'git clone --depth 1 https://github.com/me/ddnn_jax.git ddnn_jax' in remote(
      gcloud(commands, 'ssh')[0])


def test_tpu_config_and_overrides_reach_the_workers_intact():
  value = "it's a run"
  commands = tpu_dry_run('--tpu', 'my-tpu', '--workdir', 'gs://bucket/my run',
                         '--config', 'configs/imagenet.py:smoke',
                         '--override', 'num_epochs=1', '--override', f'note={value}')
  # The worker's shell splits the --command again: the words must survive both.
  words = shlex.split(remote(gcloud(commands, 'ssh')[-1]))
  assert words[words.index('ddnn_jax.main') + 1:] == [
      '--config', 'configs/imagenet.py:smoke', '--workdir', 'gs://bucket/my run',
      '--config.num_epochs=1', f'--config.note={value}']


def python_first_on_path():
  """This interpreter as `python`, as in an activated venv."""
  env = dict(os.environ)
  env['PATH'] = os.path.dirname(sys.executable) + os.pathsep + env['PATH']
  return env


def test_tpu_aot_check_compiles_for_the_slice_before_creating_it():
  base = ['--dry-run', '--tpu', 'my-tpu', '--workdir', 'gs://bucket/run', '--aot-check',
          '--config', 'configs/imagenet.py:smoke', '--override', 'eval_batch_size=64']
  passed = run_script(TPU_POD, *base, '--accelerator-type', 'v5litepod-4',
                      env=python_first_on_path(), timeout=600)
  assert passed.returncode == 0, passed.stderr[-3000:]
  aot, create = passed.stdout.splitlines()[:2]
  assert aot == ('+ python -m ddnn_jax.aot --config configs/imagenet.py:smoke '
                 '--topology v5litepod-4 --config.eval_batch_size=64')
  assert 'tpu-vm create my-tpu' in create
  # The check's report: every program, on the slice the VM would have.
  assert 'v5litepod-4 (v5e:2x2): 4 chips' in passed.stderr
  assert re.search(r'\nforward d3-4-6-3 +16 ', passed.stderr)  # 64 images / 4 chips
  # A slice the check cannot compile for: nothing is created.
  failed = run_script(TPU_POD, *base, '--accelerator-type', 'v4-33',
                      env=python_first_on_path(), timeout=600)
  assert failed.returncode != 0 and 'gcloud' not in failed.stdout
  assert 'v4-33' in failed.stderr and 'preflight check failed' in failed.stderr


@pytest.mark.parametrize('args,message', [
    (['--tpu', 'my-tpu', '--workdir', '/tmp/run'], 'gs://'),
    (['--workdir', 'gs://bucket/run'], '--tpu'),
    (['--tpu', 'my-tpu'], '--workdir'),
    (['--tpu', 'my-tpu', '--workdir', 'gs://bucket/run', '--override', 'num_epochs'],
     'KEY=VALUE'),
    (['--tpu', 'my-tpu', '--workdir', 'gs://bucket/run', '--zone'], '--zone needs a value'),
    (['--tpu', 'my-tpu', '--workdir', 'gs://bucket/run', '--repo', '/no/such/dir'],
     'neither a git URL nor a directory'),
    (['--tpu', 'my-tpu', '--workdir', 'gs://bucket/run', '--frobnicate'], "'--frobnicate'"),
])
def test_tpu_bad_command_line_is_one_line_on_stderr(args, message):
  result = run_script(TPU_POD, '--dry-run', *args)
  assert result.returncode == 2
  assert result.stdout == ''
  assert len(result.stderr.splitlines()) == 1, result.stderr
  assert message in result.stderr


def test_tpu_failing_preflight_aborts_before_anything_is_created():
  base = ['--dry-run', '--tpu', 'my-tpu', '--workdir', 'gs://bucket/run']
  failed = run_script(TPU_POD, *base, '--preflight', 'false')
  assert failed.returncode != 0
  assert 'preflight' in failed.stderr
  assert 'gcloud' not in failed.stdout
  passed = run_script(TPU_POD, *base, '--preflight', 'echo compiled; true')
  assert passed.returncode == 0, passed.stderr
  # The check's own output goes to stderr: stdout stays one command per line.
  assert passed.stdout.splitlines()[0] == '+ echo compiled; true'
  assert 'tpu-vm create my-tpu' in passed.stdout.splitlines()[1]
  assert 'compiled' in passed.stderr


def test_help():
  for script in (TPU_POD, SLURM_GPU):
    result = run_script(script, '--help')
    assert result.returncode == 0
    assert result.stdout.startswith('Usage: launch/') and '--dry-run' in result.stdout


def slurm_dry_run(*args):
  """The job script a SLURM dry run would submit (it prints it as a here-document)."""
  result = run_script(SLURM_GPU, '--dry-run', *args)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0] == "+ sbatch <<'EOF'" and lines[-1] == 'EOF'
  return '\n'.join(lines[1:-1]) + '\n'


def test_slurm_job_script_requests_the_nodes_and_sets_the_jax_variables():
  script = slurm_dry_run('--nodes', '4', '--gpus-per-node', '4', '--partition', 'gpu',
                         '--workdir', '/shared/run', '--override', 'num_epochs=1')
  lines = script.splitlines()
  assert lines[0] == '#!/bin/bash'
  for directive in ('--nodes=4', '--ntasks-per-node=1', '--gpus-per-node=4',
                    '--partition=gpu', '--time=24:00:00', '--job-name=ddnn_jax'):
    assert f'#SBATCH {directive}' in lines
  assert ('first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)'
          in lines)
  assert 'export JAX_COORDINATOR_ADDRESS=$first_node:12355' in lines
  (srun,) = [line for line in lines if line.startswith('srun ')]
  words = shlex.split(srun)
  assert words[:3] == ['srun', '--kill-on-bad-exit=1', 'bash'] and words[3] == '-c'
  assert words[4] == (
      'export JAX_NUM_PROCESSES=$SLURM_NNODES JAX_PROCESS_ID=$SLURM_NODEID && exec '
      f'{ROOT}/venv/bin/python -m ddnn_jax.main --config configs/imagenet.py '
      '--workdir /shared/run --config.num_epochs=1')


def write_executable(path, text):
  path.write_text(text)
  path.chmod(0o755)


def test_slurm_job_script_gives_each_node_its_rank(tmp_path):
  """Runs the job script with stand-ins for scontrol, srun and the venv's python."""
  bin_dir, venv = tmp_path / 'bin', tmp_path / 'venv'
  (venv / 'bin').mkdir(parents=True)
  bin_dir.mkdir()
  write_executable(bin_dir / 'scontrol', '#!/bin/sh\nprintf "gpu-07\\ngpu-08\\ngpu-09\\n"\n')
  # srun starts the command once per node, with that node's SLURM_NODEID.
  write_executable(bin_dir / 'srun', '#!/bin/bash\nshift\nfor ((i = 0; i < SLURM_NNODES; i++)); do\n'
                   '  SLURM_NODEID=$i "$@"\ndone\n')
  write_executable(venv / 'bin' / 'python', '#!/bin/sh\n'
                   'echo "$JAX_COORDINATOR_ADDRESS $JAX_NUM_PROCESSES $JAX_PROCESS_ID $*"\n')
  script = slurm_dry_run('--nodes', '3', '--port', '23456', '--venv', str(venv),
                         '--workdir', 'gs://bucket/run', '--config', 'configs/imagenet.py:smoke')
  env = dict(os.environ, PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}',
             SLURM_JOB_NODELIST='gpu-[07-09]', SLURM_NNODES='3')
  result = subprocess.run(['bash', '-c', script], capture_output=True, text=True, env=env,
                          timeout=60)
  assert result.returncode == 0, result.stderr
  args = '-m ddnn_jax.main --config configs/imagenet.py:smoke --workdir gs://bucket/run'
  assert result.stdout.splitlines() == [f'gpu-07:23456 3 {rank} {args}' for rank in range(3)]


def test_slurm_relative_paths_become_absolute(tmp_path):
  script = slurm_dry_run('--workdir', 'runs/r1', '--venv', './env')
  assert f'exec {ROOT}/env/bin/python ' in script
  assert f'--workdir {ROOT}/runs/r1' in script
  assert f'\ncd {ROOT}\n' in script


def test_slurm_extra_sbatch_options():
  script = slurm_dry_run('--workdir', '/shared/run', '--sbatch-option', '--account=abc',
                         '--sbatch-option', '--exclusive', '--time', '2:00:00')
  assert '#SBATCH --account=abc\n#SBATCH --exclusive\n' in script
  assert '#SBATCH --time=2:00:00\n' in script


@pytest.mark.parametrize('args,message', [
    ([], '--workdir is required'),
    (['--workdir', '/shared/run', '--nodes', 'two'], '--nodes must be a positive integer'),
    (['--workdir', '/shared/run', '--port', '70000'], '--port must be 1..65535'),
    (['--workdir', '/shared/run', '--override', '=1'], 'KEY=VALUE'),
])
def test_slurm_bad_command_line_is_one_line_on_stderr(args, message):
  result = run_script(SLURM_GPU, '--dry-run', *args)
  assert result.returncode == 2
  assert result.stdout == ''
  assert len(result.stderr.splitlines()) == 1, result.stderr
  assert message in result.stderr


def test_slurm_without_sbatch_fails_clearly():
  path = os.pathsep.join(d for d in os.environ['PATH'].split(os.pathsep)
                         if not os.path.exists(os.path.join(d, 'sbatch')))
  result = run_script(SLURM_GPU, '--workdir', '/shared/run', env=dict(os.environ, PATH=path))
  assert result.returncode == 1
  assert result.stderr.strip() == ('slurm_gpu.sh: error: sbatch not found on PATH: run this '
                                   'on a SLURM login node (or use --dry-run)')


@pytest.mark.parametrize('script', SCRIPTS, ids=os.path.basename)
def test_scripts_parse(script):
  result = subprocess.run(['bash', '-n', script], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which('shellcheck') is None, reason='shellcheck not installed')
def test_shellcheck(tmp_path):
  job_script = tmp_path / 'job.sh'
  job_script.write_text(slurm_dry_run('--workdir', '/shared/run'))
  # SC2016: the job script single-quotes $SLURM_NODEID on purpose (each task expands it).
  for args in (['-x', *SCRIPTS], ['-e', 'SC2016', str(job_script)]):
    result = subprocess.run(['shellcheck', *args], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout

"""bench/workers.py, the measuring processes of bench/run_all.py: they start as
run_all starts them (a script, bench/ first on sys.path, the repository root
not on it) and build the step the PyTorch peer mirrors, whatever the configs'
defaults."""

import pathlib
import subprocess
import sys

BENCH = pathlib.Path(__file__).resolve().parents[1] / 'bench'

PROBE = f"""
import sys
sys.path[0] = {str(BENCH)!r}  # as for `python bench/workers.py`
import workers
config = workers.load_config(0.5)
print(config.method, config.model.bn_mode, config.ekd.beta, config.ekd.rampup_epochs,
      config.model.width_multiplier)
"""


def test_a_worker_loads_the_step_the_peer_mirrors(tmp_path):
  # The config files import `configs` from the repository root, which is on
  # sys.path only if the worker puts it there (it once did so too late).
  result = subprocess.run([sys.executable, '-c', PROBE], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  # One BatchNorm per layer shared by the depths, like the peer's; METHODS.md's
  # EKD terms with no ramp-up; the width asked for.
  assert result.stdout.split() == ['ekd', 'shared', '1.0', '0.0', '0.5']

"""Runs one training job for the end-to-end tests, in a fresh process.

  python tests/train_worker.py CONFIG_FILE[:ARG] WORKDIR [--config.FIELD=VALUE ...]

The device count and the multi-process environment come from XLA_FLAGS and
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, exactly as
`python -m ddnn_jax.main` reads them; this wrapper only exists so that a test
can start several of them at once with chosen environments.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)

if __name__ == '__main__':
  config, workdir, *overrides = sys.argv[1:]
  sys.argv = [sys.argv[0], f'--config={config}', f'--workdir={workdir}', *overrides]
  from absl import app

  from ddnn_jax import main

  app.run(main.main, flags_parser=main.parse_flags)

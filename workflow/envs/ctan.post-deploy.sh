#!/usr/bin/env bash
# Runs once inside the new conda environment, from the working directory (the repository root).
set -euo pipefail
python -m pip install --no-input -e .

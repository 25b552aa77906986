#!/usr/bin/env bash
# Hopper validation of jaxattn's GPU kernels, under 8 minutes on one H100/H200:
#   bash benchmarks/gpu_check.sh [OUT_DIR] [more gpu_check.py options, e.g. --dry-run]
cd "$(dirname "$0")/.." && exec python benchmarks/gpu_check.py --out "${1:-gpu_check_out}" "${@:2}"

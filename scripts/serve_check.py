#!/usr/bin/env python
"""Thin wrapper: ``python scripts/serve_check.py`` == ``python -m vllm_lowrank.serve_check``."""
import sys

from vllm_lowrank.serve_check import main

if __name__ == "__main__":
    sys.exit(main())

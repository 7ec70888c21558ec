#!/usr/bin/env python
"""Thin wrapper: ``python scripts/calibrate.py`` == ``python -m vllm_lowrank.calibrate``."""
import sys

from vllm_lowrank.calibrate import main

if __name__ == "__main__":
    sys.exit(main())

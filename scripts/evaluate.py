#!/usr/bin/env python
"""Thin wrapper: ``python scripts/evaluate.py`` == ``python -m vllm_lowrank.evaluate``."""
import sys

from vllm_lowrank.evaluate import main

if __name__ == "__main__":
    sys.exit(main())

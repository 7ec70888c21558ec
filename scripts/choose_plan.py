#!/usr/bin/env python
"""Thin wrapper: ``python scripts/choose_plan.py`` == ``python -m vllm_lowrank.sensitivity``."""
import sys

from vllm_lowrank.sensitivity import main

if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Thin wrapper: ``python scripts/analyze_ranks.py`` == ``python -m vllm_lowrank.analyze_ranks``."""
import sys

from vllm_lowrank.analyze_ranks import main

if __name__ == "__main__":
    sys.exit(main())

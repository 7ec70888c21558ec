"""vllm-lowrank: a vLLM plugin that keeps the paged KV cache compressed (low rank, INT8/FP8/INT4)."""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

__version__ = "0.1.0"

# The repository's top-level folders patches/ and triton_kernels/ are installed as the subpackages
# vllm_lowrank.patches and vllm_lowrank.kernels (pyproject.toml maps them). When this package is
# imported from a source checkout instead (the repository root on sys.path, as with `python -m ...`
# run there after a non-editable install), those names would not resolve: map them to the folders.
_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
_SOURCE_SUBPACKAGES = {f"{__name__}.patches": "patches", f"{__name__}.kernels": "triton_kernels"}


class _SourceCheckoutFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        folder = _SOURCE_SUBPACKAGES.get(name)
        init = os.path.join(_ROOT, folder or "", "__init__.py")
        if folder is None or not os.path.isfile(init):
            return None
        return importlib.util.spec_from_file_location(name, init,
                                                      submodule_search_locations=[os.path.dirname(init)])


if not os.path.isdir(os.path.join(_HERE, "patches")) and os.path.isfile(os.path.join(_ROOT, "patches", "__init__.py")):
    sys.meta_path.append(_SourceCheckoutFinder())


def bundled(name: str) -> str:
    """A calibrated file shipped with the plugin (SmolLM2's bases and plans): the repository's ``bases/``
    in a source checkout, ``vllm_lowrank/bases/`` where the plugin is installed as a package."""
    for folder in (os.path.join(_HERE, "bases"), os.path.join(_ROOT, "bases")):
        if os.path.isdir(folder):
            return os.path.join(folder, name)
    return os.path.join(_HERE, "bases", name)

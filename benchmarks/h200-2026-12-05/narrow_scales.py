"""Put back the 2-byte scale loads (``tile_scales`` before this session) into a copy of
``triton_kernels/common.py``, for the A/B of ``scripts/h200.sh scales-ab``.

Usage: python narrow_scales.py COPY/triton_kernels/common.py
"""

import re
import sys

NARROW = '''@triton.jit
def tile_scales(cache_ptr, page, w0, mask, OFF: tl.constexpr, TILE_B: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """The fp16 scales at ``OFF`` of a tile's tokens, float32 [BLOCK_N], zero past the end (2-byte loads)."""
    t = w0 + tl.arange(0, TILE_B)[None, :]
    x = tl.load(field_ptr(cache_ptr, page[:, None], t, OFF, 2, BLOCK_SIZE, tl.float16), mask=mask, other=0.0)
    return tl.reshape(x, (mask.shape[0] * TILE_B,)).to(tl.float32)


'''

path = sys.argv[1]
src = open(path).read()
new, n = re.subn(r"@triton\.jit\ndef tile_scales\(.*?\n\n\n", NARROW, src, count=1, flags=re.S)
assert n == 1, "tile_scales not found"
open(path, "w").write(new)
print(f"{path}: tile_scales with 2-byte loads")

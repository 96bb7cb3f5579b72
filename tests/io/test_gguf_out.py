import numpy as np
import pytest
from gguf import GGUFValueType, GGUFWriter

from mt.io.gguf_out import FastArrayGGUFWriter


@pytest.mark.parametrize(
    "val, sub_type",
    [
        (["a", "ü", "🦙", "", "x y"] * 100, None),
        ([b"\xe2\x96\x81the", b"<0x0A>"] * 300, None),
        ([1, 2, 3, -4] * 100, None),
        ([0.5, -1e-3, 3.14159, 1e30] * 100, None),
        ([True, False] * 200, GGUFValueType.BOOL),
        (list(range(300)), GGUFValueType.UINT32),
    ],
)
def test_fast_array_packing_is_byte_identical(val, sub_type):
    slow = GGUFWriter(path=None, arch="llama")._pack_val(val, GGUFValueType.ARRAY, True, sub_type)
    fast = FastArrayGGUFWriter(path=None, arch="llama")._pack_val(val, GGUFValueType.ARRAY, True, sub_type)
    assert fast == slow


def test_mixed_array_refused():
    with pytest.raises(ValueError):
        FastArrayGGUFWriter(path=None, arch="llama")._pack_val(["a"] * 300 + [1], GGUFValueType.ARRAY, True)

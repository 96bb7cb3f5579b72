"""The output-type table: every type it names can be written by mt, and the commands offer exactly its types."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as T

from mt.cli import main
from mt.errors import MtError
from mt.quant.outtypes import CONVERT_CHOICES, CONVERTER_TYPES, OUT_TYPES, QUANTIZER_TYPES, by_file_type
from mt.quant.quantize import parse_file_type
from mt.quant.types import quant_type


def test_every_type_has_a_quantizer_and_a_file_type_of_its_own():
    for out in OUT_TYPES.values():
        assert quant_type(out.base).ggml_type == out.base
        assert by_file_type(out.file_type) is out


def test_commands_offer_the_tables_types():
    assert [parse_file_type(name.upper()) for name in QUANTIZER_TYPES] == [o.file_type for o in QUANTIZER_TYPES.values()]
    with pytest.raises(MtError):
        parse_file_type("F16")  # only the converter writes 16-bit files
    assert set(CONVERT_CHOICES) == set(OUT_TYPES) | {"auto"}
    usage = CliRunner().invoke(main, ["convert", "x", "--outtype", "nope"]).output
    assert all(name in usage for name in CONVERT_CHOICES)
    lora = CliRunner().invoke(main, ["convert-lora", "x", "--base", "y", "-o", "z", "--outtype", "q4_k_m"])
    assert lora.exit_code == 2 and all(name in lora.output for name in CONVERTER_TYPES)


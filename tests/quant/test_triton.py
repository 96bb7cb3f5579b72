"""The Triton kernels (run by Triton's interpreter on CPU tensors) write ggml's bytes; device selection.

TRITON_INTERPRET is read when a kernel is decorated and again when it runs, so it is set for this
module's tests only (the kernel module is imported under it and dropped afterwards).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as T

from mt.errors import DeviceUnavailable, QuantizationError
from mt.quant import device as device_mod
from mt.quant.types import quant_type
from mt.io.dtypes import f32_to_bf16_bits
from tests.ggml_ref import ggml_quantize
from tests.quant.test_kquants import rows_for

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def kernels():
    """The kernel module decorated (and run) with TRITON_INTERPRET=1, restored after this module."""
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    already_imported = sys.modules.get("mt.quant.triton_quant")
    try:
        yield importlib.reload(already_imported) if already_imported else importlib.import_module("mt.quant.triton_quant")
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
        sys.modules.pop("mt.quant.triton_quant", None)  # a later import decorates for the real device again


def interpreted(kernels, rows: np.ndarray, ggml_type: T) -> np.ndarray:
    """All blocks in one program: the interpreter's cost is per program, not per lane."""
    block_size = kernels.SHAPES[ggml_type][0]
    blocks = torch.from_numpy(np.ascontiguousarray(rows).reshape(-1, block_size))
    with np.errstate(all="ignore"):  # masked and discarded lanes divide by zero, as ggml never does
        packed = kernels.quantize_blocks(blocks, ggml_type, lanes=triton_lanes(blocks.shape[0]))
    return packed.numpy().reshape(rows.shape[0], -1)


def triton_lanes(n: int) -> int:
    return 1 << max(4, (n - 1).bit_length())


@pytest.mark.parametrize("ggml_type", [T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K, T.Q2_K, T.Q3_K, T.IQ4_XS])
def test_kernel_bytes_equal_ggml_and_numpy_reference(kernels, ggml_type):
    rows = rows_for(256, 11)
    ours = interpreted(kernels, rows, ggml_type)
    ggml = ggml_quantize(int(ggml_type), rows)
    reference = quant_type(ggml_type).quantize(rows).reshape(rows.shape[0], -1)
    assert np.array_equal(reference, ggml)
    mismatched = np.nonzero((ours != ggml).any(axis=1))[0]
    assert mismatched.size == 0, f"rows {mismatched.tolist()} differ from ggml"


def test_q8_0_ties_and_launch_split(kernels, monkeypatch):
    """Exact .5 ties after scaling, many launches (the per-launch lane limit forced down to 16)."""
    n = 32
    ramp = (np.arange(n, dtype=np.float32) - n / 2) * np.float32(127.5 / n)
    rows = np.concatenate([np.tile(ramp, (40, 1)) * np.linspace(0.5, 3, 40, dtype=np.float32)[:, None],
                           np.random.default_rng(2).standard_normal((40, n)).astype(np.float32)])
    monkeypatch.setattr(kernels, "MAX_LANES_PER_LAUNCH", 16)
    assert np.array_equal(interpreted(kernels, rows, T.Q8_0), ggml_quantize(int(T.Q8_0), rows))


@pytest.fixture
def gpu(kernels):
    """A GpuQuantizer on the CPU device: the interpreted kernels behind the real host path."""
    return device_mod.GpuQuantizer("cpu")


@pytest.mark.parametrize("storage", ["BF16", "F16", "F32"])
def test_gpu_quantizer_storage_types_equal_cpu_path(gpu, monkeypatch, storage):
    monkeypatch.setattr(device_mod, "GPU_SLAB_VALUES", 96)  # several slabs of 3 rows
    values = np.random.default_rng(4).standard_normal((10, 32)).astype(np.float32)
    raw = {"BF16": f32_to_bf16_bits(values), "F16": values.astype(np.float16), "F32": values}[storage]
    widened = {"BF16": (raw.astype(np.uint32) << 16).view(np.float32), "F16": raw.astype(np.float32), "F32": raw}[storage]
    expected = ggml_quantize(int(T.Q8_0), widened)
    as_bytes = np.frombuffer(raw.tobytes(), dtype=np.uint8)  # as mt quantize reads a slab from the file
    with np.errstate(all="ignore"):
        assert np.array_equal(gpu.quantize(as_bytes, storage, T.Q8_0, 32), expected)


def test_gpu_quantizer_reports_nan_with_tensor_name(gpu):
    values = np.zeros((2, 32), dtype=np.float32)
    values[1, 3] = np.nan
    with pytest.raises(QuantizationError, match="'blk.0.attn_q.weight' holds NaN"):
        gpu.quantize(values, "F32", T.Q8_0, 32, tensor_name="blk.0.attn_q.weight")


def test_gpu_handles_only_its_types_and_whole_blocks(gpu):
    assert gpu.handles(T.Q4_K, 512) and gpu.handles(T.Q8_0, 96)
    assert not gpu.handles(T.Q4_K, 96) and not gpu.handles(T.Q5_0, 64) and not gpu.handles(T.F16, 64)


def test_convert_encode_on_gpu_equals_cpu(gpu):
    from mt.convert.plan import encode

    bits = f32_to_bf16_bits(np.random.default_rng(6).standard_normal((6, 64)).astype(np.float32))
    with np.errstate(all="ignore"):
        assert np.array_equal(encode(bits, "BF16", T.Q8_0, gpu), encode(bits, "BF16", T.Q8_0))


def tiny_gguf(path: Path, values: np.ndarray) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("blk.0.ffn_down.weight", values)
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(values.shape[1], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_mt_quantize_on_gpu_path_equals_cpu_path(gpu, tmp_path, monkeypatch):
    from mt.quant import quantize as quantize_mod

    src = tiny_gguf(tmp_path / "in.gguf", np.random.default_rng(8).standard_normal((12, 64)).astype(np.float32))
    quantize_mod.quantize_gguf(src, tmp_path / "cpu.gguf", "q8_0", device="cpu")
    monkeypatch.setattr(quantize_mod, "select_device", lambda name: gpu)
    with np.errstate(all="ignore"):
        quantize_mod.quantize_gguf(src, tmp_path / "gpu.gguf", "q8_0", device="cuda")
    assert (tmp_path / "gpu.gguf").read_bytes() == (tmp_path / "cpu.gguf").read_bytes()


# ------------------------------------------------------------------------------------ device selection


def test_cpu_device_is_the_numpy_path():
    assert device_mod.select_device("cpu") is None


def test_auto_falls_back_to_cpu_when_cuda_is_unusable(monkeypatch):
    monkeypatch.setattr(device_mod, "cuda_unusable_reason", lambda probe_nodes=True: "no NVIDIA GPU found")
    assert device_mod.select_device("auto") is None


def test_cuda_requested_but_unusable_is_an_error(monkeypatch):
    monkeypatch.setattr(device_mod, "cuda_unusable_reason", lambda probe_nodes=True: "torch 2.13.0+cpu sees no CUDA device")
    with pytest.raises(DeviceUnavailable, match="--device cuda: torch .* sees no CUDA device"):
        device_mod.select_device("cuda")


def test_unknown_device_is_an_error():
    with pytest.raises(DeviceUnavailable, match="unknown device 'tpu'"):
        device_mod.select_device("tpu")


def test_no_device_node_means_cpu_without_importing_torch(monkeypatch):
    """auto on a machine without /dev/nvidia*: decided before torch is imported (~1.5 s)."""
    code = ("import sys, glob; glob.glob = lambda pattern: []\n"
            "from mt.quant.device import select_device\n"
            "print(select_device('auto'), 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.split() == ["None", "False"], proc.stderr


@pytest.mark.parametrize("command", ["quantize", "convert"])
def test_cli_device_cuda_unusable_one_line_exit_1_no_output(tmp_path, monkeypatch, command, llama3_dir):
    monkeypatch.setattr(device_mod, "cuda_unusable_reason", lambda probe_nodes=True: "no NVIDIA GPU found")
    out = tmp_path / "out.gguf"
    if command == "quantize":
        src = tiny_gguf(tmp_path / "in.gguf", np.ones((4, 64), dtype=np.float32))
        args = ["quantize", str(src), str(out), "q8_0", "--device", "cuda"]
    else:
        args = ["convert", str(llama3_dir), "-o", str(out), "--outtype", "q8_0", "--device", "cuda"]
    result = CliRunner().invoke(__import__("mt.cli", fromlist=["main"]).main, args)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert lines == ["mt: error: --device cuda: no NVIDIA GPU found; install a CUDA build of torch with triton, or use --device cpu"]
    assert list(tmp_path.glob("out*")) == [] and list(tmp_path.glob(".out*")) == []

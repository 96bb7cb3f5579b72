"""Streaming, atomic GGUF output on top of gguf-py's writer state machine.

Header, KV data and tensor infos go through `gguf.GGUFWriter`; tensor data is then streamed one
chunk at a time into a temporary file beside the target, renamed over it only when complete.
"""

from __future__ import annotations

import errno
import os
import struct
from typing import Any, Iterable

import numpy as np
from gguf import GGUFEndian, GGUFValueType, GGUFWriter

from mt.errors import MtError
from mt.io.atomic import atomic_path, check_output  # noqa: F401  (re-exported: convert, quantize, commands use them from here)
from mt.io.safetensors import FileSpan


class FastArrayGGUFWriter(GGUFWriter):
    """gguf-py's writer, with long metadata arrays packed in one step instead of one call per item.

    Same bytes; the per-item loop costs ~2 s for a 128k-token vocabulary.
    """

    def _pack_val(self, val: Any, vtype: GGUFValueType, add_vtype: bool, sub_type: GGUFValueType | None = None) -> bytes:
        if vtype != GGUFValueType.ARRAY or self.endianess != GGUFEndian.LITTLE or not isinstance(val, list) or len(val) < 256:
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        ltype = sub_type if sub_type is not None else GGUFValueType.get_type(val[0])
        examples = dict(zip(map(type, val), val))  # one item per Python type, at C speed
        if sub_type is None and any(GGUFValueType.get_type(item) is not ltype for item in examples.values()):
            raise ValueError("All items in a GGUF array should be of the same type")
        head = (struct.pack("<I", vtype) if add_vtype else b"") + struct.pack("<IQ", ltype, len(val))
        if ltype == GGUFValueType.STRING:
            encoded = [item.encode("utf-8") if isinstance(item, str) else bytes(item) for item in val]
            lengths = np.array([len(e) for e in encoded], dtype="<u8")
            parts = [b for length, e in zip(lengths.view(np.uint8).reshape(-1, 8), encoded) for b in (length.tobytes(), e)]
            return head + b"".join(parts)
        if (fmt := self._simple_value_packing.get(ltype)) is not None:
            return head + np.asarray(val, dtype=np.dtype("<" + fmt)).tobytes()
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def release_freed_memory() -> None:
    """Hand freed heap back to the OS so the vocabulary's peak does not stay resident while tensors stream."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class TensorStream:
    """Writes tensor payloads, in the order their infos were added, after the header is out."""

    def __init__(self, writer: GGUFWriter) -> None:
        assert writer.fout is not None and len(writer.fout) == 1
        self.writer = writer
        self.fout = writer.fout[0]
        writer.kv_data = [{}]  # already on disk; a 128k vocabulary is ~100 MB of Python objects
        release_freed_memory()

    def write_tensor(self, chunks: Iterable[np.ndarray | FileSpan], nbytes: int) -> int:
        self.writer.write_padding(self.fout, self.fout.tell())
        written = 0
        for chunk in chunks:
            if isinstance(chunk, FileSpan):
                written += self._copy_span(chunk)
                continue
            data = np.ascontiguousarray(chunk)
            self.fout.write(memoryview(data).cast("B"))
            written += data.nbytes
        if written != nbytes:
            raise MtError(f"internal error: tensor wrote {written} bytes, planned {nbytes}", "please report it")
        self.writer.write_padding(self.fout, nbytes)
        return written

    def _copy_span(self, span: FileSpan) -> int:
        """Source bytes straight into the output, in the kernel (copy_file_range), else through a buffer."""
        self.fout.flush()
        out_fd = self.fout.fileno()
        with open(span.path, "rb") as src:
            done = 0
            try:
                while done < span.nbytes:
                    n = os.copy_file_range(src.fileno(), out_fd, span.nbytes - done, span.offset + done)
                    if n == 0:
                        raise MtError(f"{span.path.name} ended while copying a tensor", "the file is truncated; download it again")
                    done += n
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP) or done:
                    raise
                src.seek(span.offset)
                self.fout.write(src.read(span.nbytes))
        return span.nbytes

    def finish(self) -> None:
        # no fsync: like llama.cpp's tools; the rename still makes a half-written file impossible to see
        self.fout.flush()
        self.writer.close()

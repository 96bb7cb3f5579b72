import numpy as np
from gguf import GGUFReader

from mt.convert.convert import convert
from mt.io.gguf_in import read_header


def test_header_reader_agrees_with_gguf_py(llama2_spm_dir, tmp_path):
    out = tmp_path / "m.gguf"
    convert(llama2_spm_dir, out, "q8_0")
    ours = read_header(out)
    theirs = GGUFReader(out)
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, ref in zip(ours.tensors, theirs.tensors):
        assert mine.type == ref.tensor_type and list(mine.shape) == [int(d) for d in ref.shape]
        assert ours.read_tensor(mine) == np.asarray(ref.data).tobytes()
    assert ours.value("tokenizer.ggml.tokens") == [bytes(theirs.fields["tokenizer.ggml.tokens"].parts[i]).decode() for i in theirs.fields["tokenizer.ggml.tokens"].data]
    assert ours.value("llama.block_count") == 2
    assert np.allclose(ours.value("tokenizer.ggml.scores"), [theirs.fields["tokenizer.ggml.scores"].parts[i][0] for i in theirs.fields["tokenizer.ggml.scores"].data])

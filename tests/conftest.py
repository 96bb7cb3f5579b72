from __future__ import annotations

from pathlib import Path

import pytest

from tests import checkpoints


@pytest.fixture(scope="session")
def llama3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return checkpoints.build_llama3(tmp_path_factory.mktemp("llama3"))


@pytest.fixture(scope="session")
def llama2_spm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return checkpoints.build_llama2_spm(tmp_path_factory.mktemp("llama2_spm"))


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return checkpoints.build_qwen2(tmp_path_factory.mktemp("qwen2"))


@pytest.fixture(scope="session")
def llama3_sharded_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return checkpoints.build_llama3(tmp_path_factory.mktemp("llama3_sharded"), shards=2, tie=False)


@pytest.fixture(scope="session")
def mistral_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return checkpoints.build_mistral(tmp_path_factory.mktemp("mistral"))


@pytest.fixture(scope="session")
def llama2_odd_rows_f16_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """F16 source whose ffn rows (80) are not a multiple of the Q8_0 block (32)."""
    import torch

    return checkpoints.build_llama2_spm(tmp_path_factory.mktemp("llama2_odd"), dtype=torch.float16, intermediate_size=80)


@pytest.fixture(scope="session")
def llama3_f32_untied_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    return checkpoints.build_llama3(tmp_path_factory.mktemp("llama3_f32"), dtype=torch.float32, tie=False, rope_llama3=False)


@pytest.fixture(scope="session")
def llama2_256_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Rows of 256 and 512 (K-quant super-blocks fit), 8 layers so the attn_v/ffn_down layer rules vary."""
    return checkpoints.build_llama2_spm(tmp_path_factory.mktemp("llama2_256"), hidden_size=256, intermediate_size=512, n_layers=8)


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return checkpoints.build_qwen3(tmp_path_factory.mktemp("qwen3"))


@pytest.fixture(scope="session")
def phi3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Phi-3-mini-4k-style; the folder's name holds "phi3", which llama.cpp reads to set Phi-3's token attributes."""
    return checkpoints.build_phi3(tmp_path_factory.mktemp("phi3"))


@pytest.fixture(scope="session")
def phi3_longrope_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return checkpoints.build_phi3(tmp_path_factory.mktemp("phi3_longrope"), longrope=True)


@pytest.fixture(scope="session")
def mistral_swa_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Mistral with a 32-token sliding window in a 2048-token context."""
    return checkpoints.build_mistral_sliding(tmp_path_factory.mktemp("mistral_swa"), sliding_window=32)


@pytest.fixture(scope="session")
def tada_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny TadaForCausalLM (float32): Llama-3 backbone + TADA's acoustic modules (issue #6)."""
    return checkpoints.build_tada(tmp_path_factory.mktemp("tada") / "tada-tiny")


@pytest.fixture(scope="session")
def tada_codec_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny tada-codec `decoder` folder with weight-norm parametrized convolutions."""
    return checkpoints.build_tada_codec_decoder(tmp_path_factory.mktemp("tada_codec") / "decoder")


@pytest.fixture(scope="session")
def gemma2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return checkpoints.build_gemma2(tmp_path_factory.mktemp("gemma2"))


@pytest.fixture(scope="session")
def gemma3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return checkpoints.build_gemma3(tmp_path_factory.mktemp("gemma3"))


@pytest.fixture(scope="session")
def gemma3_vision_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return checkpoints.build_gemma3_vision(tmp_path_factory.mktemp("gemma3_vision") / "gemma3-vision")


@pytest.fixture(scope="session")
def qwen2_5_vl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return checkpoints.build_qwen2_5_vl(tmp_path_factory.mktemp("qwen2_5_vl") / "qwen2.5-vl")


@pytest.fixture(scope="session")
def smollm3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return checkpoints.build_smollm3(tmp_path_factory.mktemp("smollm3"))


@pytest.fixture(scope="session")
def olmo2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return checkpoints.build_olmo2(tmp_path_factory.mktemp("olmo2"))


@pytest.fixture(scope="session")
def granite_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return checkpoints.build_granite(tmp_path_factory.mktemp("granite"))


@pytest.fixture(scope="session")
def qwen3_moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return checkpoints.build_qwen3_moe(tmp_path_factory.mktemp("qwen3_moe"))


@pytest.fixture(scope="session")
def mixtral_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return checkpoints.build_mixtral(tmp_path_factory.mktemp("mixtral"))


@pytest.fixture(scope="session")
def gpt_oss_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return checkpoints.build_gpt_oss(tmp_path_factory.mktemp("gpt_oss"))


@pytest.fixture(scope="session")
def gpt_oss_mxfp4_dir(gpt_oss_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return checkpoints.build_gpt_oss_mxfp4(tmp_path_factory.mktemp("gpt_oss_mxfp4"), gpt_oss_dir)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct (bf16), rebuilt once from a registry GGUF and cached (tests/real_model.py)."""
    from tests.real_model import smollm2_dir as build

    return build()

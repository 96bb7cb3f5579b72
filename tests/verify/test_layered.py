"""reference_logits (one decoder layer at a time) against transformers' whole-model float32 forward."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig, AutoModelForCausalLM

from mt.io.checkpoint import Checkpoint, LazyTensor, open_checkpoint
from mt.verify import layered
from mt.verify.layered import reference_logits, truncated_config

FIXTURES = ("llama3_dir", "llama2_spm_dir", "qwen2_dir", "qwen3_dir", "phi3_dir", "phi3_longrope_dir", "gemma2_dir",
            "gemma3_dir", "mistral_dir", "mistral_swa_dir", "llama3_sharded_dir")
N_IDS = 40  # past the 16- and 32-token sliding windows of the gemma and mistral_swa fixtures
TOL = 1e-6


def token_ids(config: dict[str, Any]) -> list[int]:
    """N_IDS seeded ids with repeats, the pad id among them (its embedding row must still be found)."""
    ids = [int(i) for i in np.random.default_rng(0).integers(0, config["vocab_size"], N_IDS)]
    ids[7] = ids[3]
    if isinstance(config.get("pad_token_id"), int):
        ids[11] = config["pad_token_id"]
    return ids


def whole_model(folder: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def forward(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("fixture", FIXTURES)
def test_matches_whole_model(fixture: str, request: pytest.FixtureRequest) -> None:
    folder = request.getfixturevalue(fixture)
    ckpt = open_checkpoint(folder)
    ids = token_ids(ckpt.config)
    got = reference_logits(ckpt, ids)
    want = forward(whole_model(folder), ids)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.abs(got - want).max() <= TOL


@pytest.mark.parametrize("fixture", FIXTURES)
def test_truncated_matches_truncated_model(fixture: str, request: pytest.FixtureRequest) -> None:
    folder = request.getfixturevalue(fixture)
    ckpt = open_checkpoint(folder)
    n_layers = max(1, ckpt.config["num_hidden_layers"] // 2)
    ids = token_ids(ckpt.config)
    full = whole_model(folder)
    short = AutoModelForCausalLM.from_config(AutoConfig.for_model(**truncated_config(ckpt.config, n_layers)),
                                             dtype=torch.float32).eval()
    missing, _ = short.load_state_dict(full.state_dict(), strict=False)
    assert not missing
    assert len(short.model.layers) == n_layers
    got = reference_logits(ckpt, ids, n_layers=n_layers)
    assert np.abs(got - forward(short, ids)).max() <= TOL
    assert np.abs(got - forward(full, ids)).max() > 1e-3  # the later layers are really gone


def test_merged_adapter_source(llama3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A LoRA merged lazily in float32 gives peft's merged float32 model's logits."""
    from mt.merge.source import open_merged
    from mt.verify.logits import hf_logits
    from tests.merge.adapters import build_adapter

    adapter = build_adapter(llama3_dir, tmp_path_factory.mktemp("layered_adapter"))
    merged = open_merged(llama3_dir, adapter, "f32")[0]
    ids = token_ids(merged.config)
    assert np.abs(reference_logits(merged, ids) - hf_logits(llama3_dir, ids, adapter)).max() <= TOL


def test_truncated_config_cuts_per_layer_lists() -> None:
    config = {"num_hidden_layers": 6, "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
              "sliding_window": 16, "rope_scaling": {"long_factor": [1.0] * 6}}
    cut = truncated_config(config, 2)
    assert cut == {**config, "num_hidden_layers": 2, "layer_types": ["sliding_attention"] * 2}
    assert config["num_hidden_layers"] == 6 and len(config["layer_types"]) == 6
    with pytest.raises(ValueError):
        truncated_config(config, 0)
    with pytest.raises(ValueError):
        truncated_config(config, 7)


# ---------------------------------------------------------------- memory


@dataclass
class CountedTensor:
    """A lazy tensor that records how many rows each read returned."""

    inner: LazyTensor
    reads: list[int] = field(default_factory=list)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def read_rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        rows = self.inner.read_rows(start, stop)
        self.reads.append(rows.shape[0])
        return rows

    def read(self) -> np.ndarray:
        return self.read_rows()


class LargestTensor(TorchDispatchMode):
    """The largest number of elements of any real (non-meta) tensor an op takes or returns."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in _tensors((args, kwargs, out)):
            if not t.is_meta:
                self.numel = max(self.numel, t.numel())
        return out


def _tensors(tree: Any) -> Iterator[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for item in tree:
            yield from _tensors(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _tensors(item)


class LoadedLayers:
    """Before every module call inside the model's forward: how many decoder layers hold real weights."""

    def __init__(self) -> None:
        self.model: torch.nn.Module | None = None
        self.most = 0
        self.seen: set[int] = set()

    def __call__(self, module: torch.nn.Module, args: Any) -> None:
        if hasattr(module, "lm_head"):
            self.model = module
        if self.model is None:
            return
        loaded = [i for i, layer in enumerate(self.model.model.layers) if any(not p.is_meta for p in layer.parameters())]
        self.most = max(self.most, len(loaded))
        self.seen.update(loaded)


@pytest.mark.parametrize("fixture", ["llama3_dir", "llama3_sharded_dir"])  # tied, untied
def test_one_layer_and_no_full_vocab_matrix(fixture: str, request: pytest.FixtureRequest,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    folder = request.getfixturevalue(fixture)
    ckpt = open_checkpoint(folder)
    counted = Checkpoint(ckpt.folder, ckpt.config, {k: CountedTensor(t) for k, t in ckpt.tensors.items()}, ckpt.files)
    vocab, hidden = ckpt.tensors["model.embed_tokens.weight"].shape
    slab_rows = 4096
    monkeypatch.setattr(layered, "SLAB_BYTES", slab_rows * hidden * 4)
    ids = token_ids(ckpt.config)

    largest, layers = LargestTensor(), LoadedLayers()
    handle = torch.nn.modules.module.register_module_forward_pre_hook(layers)
    try:
        with largest:
            got = reference_logits(counted, ids)
    finally:
        handle.remove()

    assert np.abs(got - forward(whole_model(folder), ids)).max() <= TOL
    assert largest.numel < vocab * hidden
    assert largest.numel <= max(slab_rows * hidden, len(ids) * vocab)
    assert layers.most == 1 and layers.seen == set(range(ckpt.config["num_hidden_layers"]))
    assert all(p.is_meta for p in layers.model.model.layers.parameters())
    embed_reads, distinct = counted.tensors["model.embed_tokens.weight"].reads, len(set(ids))
    if "lm_head.weight" in counted.tensors:
        assert sum(embed_reads) == distinct and max(counted.tensors["lm_head.weight"].reads) <= slab_rows
    else:  # tied: the embedding is read once for the ids' rows and once, slab by slab, for the logits
        assert sum(embed_reads) == distinct + vocab and max(embed_reads) <= slab_rows

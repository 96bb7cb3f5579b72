"""HumeAI's own TADA code (`hume-tada` from the package registry) as the oracle of `mt speak`, in a virtual
environment of its own in the tests' cache: it pins transformers<5, which mt's environment does not have.

The venv sees mt's site-packages (torch is the local CPU build; nothing pulls another) and installs
transformers<5 and HumeAI's packages over them. Three imports are stubbed, none of them on the checked path:
- `torchaudio`: no build matches torch 2.13; HumeAI's modules import it for loading and resampling audio files
  (the encoder and aligner), never for generation or decoding;
- `audiotools` and `argbind`, which `descript-audio-codec` imports at package level for its own codec, its
  training losses and its command line. From `dac` HumeAI's decoder uses only `Snake1d`, which is dac's real code
  (dac.nn.layers needs torch, numpy and einops only).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from tests.cached_venv import cached_venv

HUME_TADA = "hume-tada==0.1.9"
REQUIREMENTS = ("transformers>=4.57.1,<5", "einops")
NO_DEPS = (HUME_TADA, "descript-audio-codec==1.0.0")
_VENV_NAME = "hume-tada-0.1.9-venv"
_SCRIPT = Path(__file__).parent / "speak" / "hume_generate.py"

STUBS = {
    "torchaudio/__init__.py": "",
    "audiotools/__init__.py": "from . import core, ml\n\n\nclass AudioSignal:\n    pass\n\n\n"
                              "class STFTParams:\n    def __init__(self, *args, **kwargs):\n        pass\n",
    "audiotools/ml.py": "import torch\n\n\nclass BaseModel(torch.nn.Module):\n    INTERN: list = []\n    EXTERN: list = []\n\n\n"
                        "class Accelerator:\n    pass\n",
    "audiotools/core/__init__.py": "from . import util\n",
    "audiotools/core/util.py": "",
    "argbind.py": "def bind(*args, **kwargs):\n    return lambda fn: fn\n",
}


def venv_python() -> Path:
    """The venv's python, created on first use (about half a minute with pip's cache)."""
    stubs = {f"stubs/{name}": text for name, text in STUBS.items()}
    return cached_venv(_VENV_NAME, [REQUIREMENTS, ["--no-deps", *NO_DEPS]], stubs)


def run_hume(spec: dict[str, Any], out: Path) -> dict[str, Any]:
    """hume_generate.py on `spec` (see its docstring) in the venv; its arrays, loaded."""
    import numpy as np

    python = venv_python()
    out.mkdir(parents=True, exist_ok=True)
    spec_path = out / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(python.parent.parent / "stubs"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as cwd:  # so mt's checkout is not importable from there
        proc = subprocess.run([str(python), str(_SCRIPT), str(spec_path), str(out)], cwd=cwd, env=env,
                              capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"HumeAI's generate failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    with np.load(out / "oracle.npz") as data:
        return {k: data[k] for k in data.files}


def hume_normalize(texts: list[str]) -> list[str]:
    """HumeAI's normalize_text (tada/utils/text.py) on each text, in the venv."""
    python = venv_python()
    code = ("import json, sys\nfrom tada.utils.text import normalize_text\n"
            "print(json.dumps([normalize_text(t) for t in json.loads(sys.stdin.read())]))")
    env = {**os.environ, "PYTHONPATH": str(python.parent.parent / "stubs")}
    with tempfile.TemporaryDirectory() as cwd:
        proc = subprocess.run([str(python), "-c", code], input=json.dumps(texts), cwd=cwd, env=env, capture_output=True,
                              text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout)

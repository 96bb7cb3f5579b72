"""Mistral's chat templates as mistral-common (Mistral's own package, from the registry) generates them for each
tokenizer version, SentencePiece and Tekken: the templates Mistral ships in its Hugging Face repositories.

mistral-common pins numpy<2.4 on this Python, which mt's environment does not have, so it gets a virtual environment
of its own in the tests' cache (seeing mt's site-packages; pip adds its numpy, pillow and tiktoken there).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from mt.cache import cache_root
from tests.cached_venv import cached_venv

MISTRAL_COMMON = "mistral-common==1.13.1"
_VENV_NAME = "mistral-common-1.13.1-venv"
VERSIONS = ("v1", "v2", "v3", "v7", "v11", "v13")
_GENERATE = """
import json, sys
from mistral_common.integrations.chat_templates.chat_templates import generate_chat_template
from mistral_common.tokens.tokenizers.base import TokenizerVersion

out = {}
for version in sys.argv[1:]:
    for spm in (True, False):
        try:
            out[version + ("-spm" if spm else "-tekken")] = generate_chat_template(
                spm, TokenizerVersion(version), image_support=False, audio_support=False, thinking_support=False,
                default_system_prompt=None, plain_thinking_support=False, use_special_token_variables=True,
                model_settings_fields=None, reasoning_effort_values=None, reasoning_effort_default=None)
        except ValueError:  # a version Mistral never shipped with this tokenizer (v11+ with SentencePiece)
            pass
print(json.dumps(out))
"""


def _venv_python() -> Path:
    return cached_venv(_VENV_NAME, [[MISTRAL_COMMON]])


def mistral_templates() -> dict[str, str]:
    """{"v3-spm": template, "v3-tekken": …} for every version in VERSIONS, generated once into the cache."""
    cached = cache_root() / _VENV_NAME / "templates.json"
    if not cached.is_file():
        proc = subprocess.run([str(_venv_python()), "-c", _GENERATE, *VERSIONS], check=True, capture_output=True,
                              text=True)
        cached.write_text(proc.stdout)
    return json.loads(cached.read_text())

"""Hugging Face Hub repositories where a folder is expected: `ORG/NAME[@REVISION]` becomes the snapshot folder
huggingface_hub keeps in its cache, downloading only what mt reads (config, safetensors and their index, tokenizer
files, chat templates, the model card; pickles only with --allow-pickle). HF_TOKEN, HF_HOME, HF_ENDPOINT and
HF_HUB_OFFLINE work as they do for huggingface_hub. A folder that exists is always taken as the folder."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from mt.errors import CheckpointError

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?$")
MODEL_FILES = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
               "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
               "added_tokens.json", "chat_template.jinja", "chat_template.json", "additional_chat_templates/*",
               "README.md", "adapter_config.json", "preprocessor_config.json")
PICKLE_FILES = ("*.bin", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class HubSource:
    repo: str
    revision: str | None

    def __str__(self) -> str:
        return self.repo + (f"@{self.revision}" if self.revision else "")

    @property
    def name(self) -> str:
        return self.repo.split("/")[1]


def hub_source(arg: str | Path) -> HubSource | None:
    """The repository `arg` names, or None when it is a path that exists or no repository id."""
    text = str(arg)
    if Path(text).exists() or (m := HUB_ID.fullmatch(text)) is None:
        return None
    return HubSource(m["repo"], m["revision"])


def resolve_folder(arg: str | Path, allow_pickle: bool = False) -> Path:
    """`arg` itself, or the snapshot of the repository it names (downloaded as needed)."""
    source = hub_source(arg)
    return Path(arg) if source is None else download(source, allow_pickle)


def download(source: HubSource, allow_pickle: bool = False) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    patterns = [*MODEL_FILES, *(PICKLE_FILES if allow_pickle else ())]
    try:
        return Path(snapshot_download(source.repo, revision=source.revision, allow_patterns=patterns))
    except GatedRepoError:
        raise CheckpointError(f"{source.repo} is gated on the Hub and this token may not read it",
                              "accept its conditions on the model's page and set HF_TOKEN") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{source.repo} has no revision {source.revision!r}",
                              "name a branch, tag or commit of the repository") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"there is no repository {source.repo} on the Hub (or it is private)",
                              "check the name, or set HF_TOKEN for a private repository") from None
    except LocalEntryNotFoundError:
        raise CheckpointError(f"{source} is not in the Hugging Face cache and the Hub is not reachable (or HF_HUB_OFFLINE"
                              " is set)", "download it where the Hub can be reached, or pass a local folder") from None
    except (HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"cannot download {source} ({type(e).__name__}: {e})",
                              "check the connection and HF_TOKEN, or pass a local folder") from None

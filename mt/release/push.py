"""`mt release --push ORG/NAME`: the release folder uploaded to a Hub model repository through huggingface_hub
(created if missing; its upload_folder streams large files and resumes), after every file passed verify."""

from __future__ import annotations

from pathlib import Path

from mt.errors import MtError


class PushError(MtError):
    """The Hub refused or could not take the upload."""


def check_token() -> None:
    """Before any work: a push needs a token (HF_TOKEN, or a login's)."""
    from huggingface_hub import get_token

    if not get_token():
        raise PushError("--push needs a Hugging Face token, and none is set",
                        "set HF_TOKEN (a token with write access) or run `hf auth login`, then run again")


def push(dist: Path, repo: str, private: bool = False, revision: str | None = None, quiet: bool = False) -> str:
    """Upload every file of `dist` to `repo` (a branch `revision` if given, created from main); the commit's URL.
    `quiet`: without huggingface_hub's progress bars."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import disable_progress_bars

    if quiet:
        disable_progress_bars()
    api = HfApi()
    try:
        api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        if revision:
            api.create_branch(repo, branch=revision, repo_type="model", exist_ok=True)
        files = sorted(p.name for p in dist.iterdir() if p.is_file())
        info = api.upload_folder(folder_path=dist, repo_id=repo, repo_type="model", revision=revision,
                                 commit_message=f"mt release: {', '.join(f for f in files if f.endswith('.gguf'))}")
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "no"
        raise PushError(f"the Hub refused the upload to {repo} (HTTP {status}: {str(e).splitlines()[0]})",
                        "check the repository name and that the token may write to it; the release is in "
                        f"{dist}, push it again with `hf upload {repo} {dist}`") from None
    except OSError as e:
        raise PushError(f"cannot reach the Hub to push {repo} ({e})",
                        f"the release is in {dist}; push it again when the Hub can be reached") from None
    return str(info.commit_url if hasattr(info, "commit_url") else info)

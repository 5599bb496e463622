"""Upload a finished output folder to the Hugging Face hub; the token comes from the environment only."""

from __future__ import annotations

import os
import re
from pathlib import Path

from abliterate.errors import AbliterateError

TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def token() -> str:
    """The hub token from HF_TOKEN (or HUGGING_FACE_HUB_TOKEN); never stored, printed or logged."""
    for name in TOKEN_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    raise AbliterateError(
        "--push-to-hub needs a hub token: set HF_TOKEN to a write token from https://huggingface.co/settings/tokens"
    )


def check(repo_id: str) -> None:
    """Fail before any model work if the repository id is malformed or no token is set."""
    if not _REPO_ID.match(repo_id):
        raise AbliterateError(f"--push-to-hub {repo_id!r} is not a hub repository id; use owner/name")
    token()


def push(folder: Path, repo_id: str) -> str:
    """Create the repository (private, if it does not exist yet) and upload the folder; return its URL."""
    from huggingface_hub import HfApi

    secret = token()
    api = HfApi(token=secret)
    try:
        # New repositories start private: publishing a model with its safeguard removed should be a deliberate step.
        url = api.create_repo(repo_id, repo_type="model", private=True, exist_ok=True)
        api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message="Upload from abliterate"
        )
    except Exception as exc:  # huggingface_hub raises many kinds; each becomes one line without the token
        raise AbliterateError(
            f"could not upload {folder} to {repo_id}: {_one_line(exc, secret)}; the folder is saved, "
            f"retry with `hf upload {repo_id} {folder}`"
        ) from None
    return str(url)


def _one_line(exc: Exception, secret: str) -> str:
    """The first line of an exception's message, with the token and URL query strings masked."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = text.replace(secret, "***")
    return re.sub(r"(https?://\S+?)\?\S*", r"\1?***", text)

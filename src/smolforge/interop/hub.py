"""Model names that are Hugging Face Hub repositories: `HuggingFaceTB/SmolLM2-135M` -> local snapshot.

Every command that takes a checkpoint accepts, besides a directory, a Hub repository id (as
`from_pretrained` does). Only what smolforge reads is fetched (config, safetensors, tokenizer and
template files) into the standard Hugging Face cache, so a second run, or a machine with
`HF_HUB_OFFLINE=1` and a filled cache, needs no network. A local path always wins over a Hub id.
"""

from __future__ import annotations

import re
from pathlib import Path

from smolforge.errors import SmolforgeError

# owner/name, each part as the Hub allows; an optional @revision (branch, tag or commit).
_REPO_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")
FILES_READ = ["*.json", "*.safetensors", "*.jinja"]


def is_hub_id(name: str) -> bool:
    """True when `name` is not an existing path and reads as `owner/name[@revision]`."""
    return not Path(name).exists() and _REPO_ID.fullmatch(name) is not None


def resolve_model_path(name: str | Path) -> Path:
    """A local model directory for `name`: the path itself, or the cached snapshot of a Hub repo."""
    if isinstance(name, Path) or not is_hub_id(name):
        return Path(name)
    match = _REPO_ID.fullmatch(name)
    assert match is not None
    from huggingface_hub import snapshot_download  # a dependency of `tokenizers`, always installed
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(match["repo"], revision=match["revision"], allow_patterns=FILES_READ))
    except LocalEntryNotFoundError as exc:
        raise SmolforgeError(
            f"{name}: no such directory, and the Hub repository could not be fetched (offline, or not "
            f"in the cache: {exc}). Download it on a connected machine with `hf download {match['repo']}`, "
            f"or pass a local directory") from None
    except HfHubHTTPError as exc:
        raise SmolforgeError(f"{name}: no such directory, and the Hub refused the download "
                             f"({type(exc).__name__}: {exc}); for a gated or private model log in "
                             f"with `hf auth login`") from None

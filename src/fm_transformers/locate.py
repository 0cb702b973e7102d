"""Where a pretrained name points: a local directory or a Hub repo, decided before anything is loaded.

transformers treats every string that is not an existing directory as a Hub repo id, so a mistyped path
ends in a long traceback about repo ids, or in a minute of retried downloads without a network. This module
settles the question first and fails with one line that names what was looked for:

- an existing directory is local;
- a string that starts like a path (`/`, `./`, `../`, `~`) or a `Path` is local, and must exist;
- anything else is a Hub repo id, accepted when it is in the local Hugging Face cache or the Hub answers
  that it exists. Offline (`HF_HUB_OFFLINE=1` or `local_files_only`) the network is never tried.
"""

import os
from pathlib import Path

from huggingface_hub import HfApi, is_offline_mode, try_to_load_from_cache
from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import validate_repo_id

PATH_PREFIXES = ("/", "./", "../", "~")
HUB_TIMEOUT_S = 10.0


def locate_pretrained(
    name_or_path,
    token: str | bool | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> str:
    """The local directory (as given, `~` expanded) or the Hub repo id to hand to `from_pretrained`.

    Raises FileNotFoundError (NotADirectoryError for a file) with a one-line message when it is neither an
    existing directory nor a Hub repo that is cached or reachable.
    """
    name = os.fsdecode(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        return name if path == Path(name) else str(path)
    if path.exists():
        raise NotADirectoryError(f"{name} is a file, not a directory: pass the directory that holds config.json")
    if not isinstance(name_or_path, str) or name.startswith(PATH_PREFIXES) or path.is_absolute():
        raise FileNotFoundError(f"no such directory: {name}")
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise FileNotFoundError(f"no such directory: {name} (nor is it a Hub repo id, which reads org/name)") from None
    if try_to_load_from_cache(name, "config.json", cache_dir=cache_dir, revision=revision) is not None:
        return name
    if local_files_only or is_offline_mode():
        raise FileNotFoundError(
            f"no local directory {name}, and the Hub repo {name} could not be reached: offline "
            "(HF_HUB_OFFLINE=1 or local_files_only) and it is not in the local Hugging Face cache"
        )
    _check_on_hub(name, token, revision)
    return name


def _check_on_hub(repo_id: str, token, revision) -> None:
    """One request, no retries: an unreachable Hub answers in seconds, not after a minute of backoff."""
    try:
        HfApi(token=token).model_info(repo_id, revision=revision, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        return  # it exists; from_pretrained will say what access it needs
    except RevisionNotFoundError:
        raise FileNotFoundError(f"the Hub repo {repo_id} has no revision {revision}") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"no local directory {repo_id}, and the Hub has no repo {repo_id} "
            "(a private one needs a token: `hf auth login`)"
        ) from None
    except Exception as error:  # a refused connection, a timeout, a server error: all mean the same here
        raise FileNotFoundError(
            f"no local directory {repo_id}, and the Hub repo {repo_id} could not be reached "
            f"({type(error).__name__}: {error}); set HF_HUB_OFFLINE=1 to work from the local cache"
        ) from None

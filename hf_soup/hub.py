"""Saving and publishing a soup; the ONLY module of hf_soup that touches the network.

`push_to_hub` uploads a soup folder in one commit (`HfApi.create_repo` + `HfApi.create_commit`): the Hub shows all of
it or none of it, and success is reported only after the commit returns. Offline mode, unreachable hosts and
401/403 answers become `SoupError`s that say how to fix them. `save_soup` copies a soup with its weights re-sharded,
streamed tensor by tensor into a staging folder that is renamed when complete.

Example:

```python
>>> soup = SoupBuilder(["runs/a", "runs/b"], method="uniform").cook("soups/uniform")
>>> soup.save_pretrained("soups/uniform-2GB", max_shard_size="2GB")
>>> soup.push_to_hub("me/bert-soup", private=True)      # token: HF_TOKEN or `hf auth login`
'https://huggingface.co/me/bert-soup/commit/...'
```
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from .atomic import STAGING_PREFIX, staged_folder
from .card import card_text, read_soup
from .checkpoint import SAFE_INDEX, CheckpointReader, parse_size, weight_files
from .errors import SoupError
from .record import write_record
from .writer import CheckpointWriter, plan_shards

logger = logging.getLogger(__name__)

LOGIN_HINT = (
    "log in with `hf auth login` or set HF_TOKEN to a token with write access (huggingface.co/settings/tokens)"
)


def save_soup(
    soup_dir: str | os.PathLike, save_directory: str | os.PathLike, *, max_shard_size="5GB", overwrite=False
):
    """Copy a soup folder to `save_directory` with its weights re-sharded to `max_shard_size`; returns the copy's
    `soup.json` record (`Soup.save_pretrained` wraps it in a `Soup`).

    Tensors are streamed one at a time into a staging folder beside the target, the other files are copied, and the
    folder is renamed when complete (`overwrite=True` replaces an existing target, the soup's own folder included).
    """
    source, target = Path(soup_dir).absolute(), Path(save_directory).absolute()
    record = read_soup(source)
    if source == target and not overwrite:
        raise SoupError(f"{target} is the soup's own folder; pass overwrite=True to re-shard it in place")
    weights = {path.name for path in weight_files(source)} | set(SAFE_INDEX) | {"adapter_model.safetensors.index.json"}
    with CheckpointReader(source, label=source.name) as reader, staged_folder(target, overwrite=overwrite) as staging:
        prefix = "adapter_model" if reader.files[0].name.startswith("adapter_model") else "model"
        metadata = {k: v for k, v in reader.metadata().items() if k != "format"}
        if prefix == "adapter_model" and len(plan_shards(reader.infos(), parse_size(max_shard_size))) > 1:
            raise SoupError(
                f"max_shard_size {max_shard_size} would split the adapter into several files, which peft cannot "
                "load; give a size larger than the adapter"
            )
        writer = CheckpointWriter(
            staging, reader.infos(), max_shard_size=max_shard_size, prefix=prefix, metadata=metadata
        )
        with writer:
            for name in reader.names():
                writer.write(name, reader.get(name))
        for item in sorted(source.iterdir()):
            if item.name in weights or item.name.startswith((".", STAGING_PREFIX)):
                continue
            if item.is_dir():
                shutil.copytree(item, staging / item.name)
            else:
                shutil.copy2(item, staging / item.name)
        record["files"] = sorted(writer.filenames + ([writer.index_name] if writer.index_name else []))
        record = write_record(staging, record)
    logger.info("soup saved to %s (%d weight files)", target, len(writer.filenames))
    return record


def _upload_paths(folder: Path) -> list[Path]:
    """Every file of the soup folder to upload (hidden files and staging leftovers excluded)."""
    files = []
    for path in sorted(folder.rglob("*")):
        parts = path.relative_to(folder).parts
        if path.is_file() and not any(
            part.startswith((".", STAGING_PREFIX)) or part == "__pycache__" for part in parts
        ):
            files.append(path)
    return files


def _connection_error(error: BaseException) -> bool:
    names = {cls.__name__ for cls in type(error).__mro__}
    return isinstance(error, (ConnectionError, TimeoutError)) or bool(
        names & {"TransportError", "ConnectionError", "Timeout", "TimeoutException", "OfflineModeIsEnabled"}
    )


def _hub_error(error: Exception, repo_id: str, done: str) -> SoupError:
    """A `SoupError` for what went wrong talking to the Hub."""
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, RepositoryNotFoundError

    if isinstance(error, HFValidationError):
        return SoupError(f"{repo_id!r} is not a valid repository id ({error}); write it as 'user/name' or 'org/name'")
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, HfHubHTTPError) and status in (401, 403):
        return SoupError(f"the Hub refused to let you write to {repo_id} (HTTP {status}): {LOGIN_HINT}; {done}")
    if isinstance(error, RepositoryNotFoundError):
        return SoupError(f"repository {repo_id} was not found or is not yours (HTTP {status}): {LOGIN_HINT}; {done}")
    if _connection_error(error):
        return SoupError(
            f"cannot reach the Hugging Face Hub ({type(error).__name__}: {str(error)[:200]}); check the network "
            f"(and HF_ENDPOINT) and push again; {done}"
        )
    if isinstance(error, HfHubHTTPError):
        return SoupError(f"the Hub refused the push to {repo_id} (HTTP {status}): {str(error)[:300]}; {done}")
    raise error


def push_to_hub(
    soup_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
) -> str:
    """Upload a soup folder (weights, config, tokenizer, `soup.json`, model card, figures) to a Hub model repository
    in ONE commit; returns the commit URL.

    Args:
        soup_dir (`str`): the soup folder.
        repo_id (`str`): `"user/name"` or `"org/name"`; created when missing.
        private (`bool`, *optional*): visibility of a new repository (the Hub's default when `None`).
        revision (`str`, *optional*): a branch to commit to (created from main when missing).
        commit_message (`str`, *optional*): defaults to "Upload <method> soup with hf_soup".
        token (`str`, *optional*): defaults to HF_TOKEN or the token `hf auth login` saved.

    A folder without a README.md gets its card generated for the upload (the folder is not modified).
    """
    from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    folder = Path(soup_dir)
    record = read_soup(folder)  # every file of the soup is checked before the network is used
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise _hub_error(error, repo_id, "nothing was pushed") from None
    if constants.is_offline_mode():
        raise SoupError("the Hub is in offline mode (HF_HUB_OFFLINE=1): unset HF_HUB_OFFLINE and push again")
    token = token or get_token()
    if not token:
        raise SoupError(f"no Hugging Face token found: {LOGIN_HINT}")
    paths = _upload_paths(folder)
    operations = [CommitOperationAdd(path.relative_to(folder).as_posix(), str(path)) for path in paths]
    if not (folder / "README.md").is_file():
        card = card_text(folder, repo_id=repo_id).encode()
        operations.append(CommitOperationAdd("README.md", card))
    message = commit_message or f"Upload {record['method']} soup with hf_soup"
    api = HfApi(token=token)
    done = "nothing was pushed"
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        done = f"the repository {getattr(url, 'repo_id', repo_id)} exists but nothing was committed"
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        commit = api.create_commit(repo_id, operations, commit_message=message, revision=revision, repo_type="model")
    except Exception as error:  # noqa: BLE001 - huggingface_hub and its HTTP client raise many kinds
        raise _hub_error(error, repo_id, done) from None
    address = getattr(commit, "commit_url", None) or f"{constants.ENDPOINT}/{repo_id}"
    logger.info("pushed %d files of %s to %s", len(operations), folder, address)
    return str(address)

"""Dictionaries on the Hugging Face Hub: ``hf:OWNER/REPO[/SUBFOLDER][@REVISION]`` -> a local folder.

:func:`resolve_dictionary` returns a local path as it is, and downloads a hub spec with
``huggingface_hub.snapshot_download`` into the usual Hugging Face cache, taking only ``*.safetensors``, ``*.json``
and ``*.yaml`` / ``*.yml`` files (weights that are not safetensors are never fetched, so never unpickled). A repo
already in the cache is used without the network. Without a network (or with ``HF_HUB_OFFLINE=1``) and no
cached copy, the error is one line naming the repo. :func:`download_file` does the same for one file named by a
circuit-tracer URI, ``hf://OWNER/REPO/PATH[?revision=REV]``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from neurontrace.errors import NeurontraceError

HUB_PREFIX = "hf:"
ALLOWED = ("*.safetensors", "*.json", "*.yaml", "*.yml")
_SPEC = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)(?:/(?P<sub>[^@]+?))?/?(?:@(?P<rev>[^@/]+))?$")


def parse_hub_spec(spec: str) -> tuple[str, str | None, str | None]:
    """``(repo_id, subfolder, revision)`` of ``hf:OWNER/REPO[/SUBFOLDER][@REVISION]`` (``hf://`` also accepted)."""
    body = spec[len(HUB_PREFIX) :].lstrip("/")
    match = _SPEC.match(body)
    if not match or ".." in (match["sub"] or "").split("/"):
        raise NeurontraceError(
            f"{spec!r} is not a hub dictionary; write hf:OWNER/REPO[/SUBFOLDER][@REVISION]"
        )
    _check_repo_id(match["repo"], spec, "hf:OWNER/REPO[/SUBFOLDER][@REVISION]")
    return match["repo"], match["sub"], match["rev"]


def _check_repo_id(repo: str, spec: str, form: str) -> None:
    """A one-line error when ``repo`` is no valid hub repo id (``../..``, ``a--b``...), before any lookup."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError:
        raise NeurontraceError(
            f"{spec!r}: {repo!r} is not a hub repo id (OWNER/REPO: letters, digits, '-', '_' and '.', neither "
            f"starting nor ending with '-' or '.', no '--' or '..'); write {form}"
        ) from None


def _fetch(what: str, repo: str, download):
    """Run ``download(local_files_only)``; hub failures become one-line errors naming ``what``."""
    from huggingface_hub import errors

    from neurontrace.models.loading import hub_reachable

    online = hub_reachable()
    try:
        return download(not online)
    except (errors.RepositoryNotFoundError, errors.GatedRepoError) as exc:
        gated = isinstance(exc, errors.GatedRepoError)
        why = (
            "is gated: accept its terms on the hub and log in" if gated else "does not exist (or is private)"
        )
        raise NeurontraceError(f"cannot fetch {what}: the hub repo {repo} {why}") from None
    except errors.RevisionNotFoundError:
        raise NeurontraceError(f"cannot fetch {what}: the hub repo {repo} has no such revision") from None
    except errors.EntryNotFoundError as exc:
        if isinstance(exc, errors.LocalEntryNotFoundError) or not online:
            raise NeurontraceError(
                f"cannot fetch {what}: the Hugging Face hub is unreachable (no network, or HF_HUB_OFFLINE=1) and "
                f"{repo} is not in the local cache; download it once online, or give a local folder"
            ) from None
        raise NeurontraceError(f"cannot fetch {what}: the file is not in the hub repo {repo}") from None
    except (OSError, errors.HfHubHTTPError) as exc:
        raise NeurontraceError(
            f"cannot fetch {what} from the hub repo {repo}: {str(exc).splitlines()[0] if str(exc) else exc!r}"
        ) from None


_RESOLVED: dict[str, Path] = {}  # hub spec -> its folder, once per process (sites ask at every hook)


def resolve_dictionary(spec: str | os.PathLike) -> Path:
    """The local folder of a dictionary: a local path unchanged, or ``hf:OWNER/REPO[/SUBFOLDER]`` downloaded.

    A hub spec is looked up once per process; later calls return the same folder without the network.
    """
    text = os.fspath(spec)
    if not text.startswith(HUB_PREFIX):
        return Path(text)
    if text in _RESOLVED and _RESOLVED[text].is_dir():
        return _RESOLVED[text]
    repo, sub, revision = parse_hub_spec(text)
    patterns = [f"{sub}/{p}" for p in ALLOWED] if sub else list(ALLOWED)

    def download(local_only: bool) -> str:
        from huggingface_hub import snapshot_download

        return snapshot_download(
            repo, revision=revision, allow_patterns=patterns, local_files_only=local_only
        )

    folder = Path(_fetch(text, repo, download))
    if sub:
        folder = folder / sub
    if not folder.is_dir():
        raise NeurontraceError(
            f"{text}: the hub repo {repo} has no folder {sub} with safetensors/json/yaml files"
        )
    _RESOLVED[text] = folder
    return folder


def download_file(uri: str) -> Path:
    """The local copy of one file named ``hf://OWNER/REPO/PATH[?revision=REV]`` (circuit-tracer's URIs)."""
    parsed = urlparse(uri)
    parts = parsed.path.lstrip("/").split("/", 1)
    if parsed.scheme != "hf" or not parsed.netloc or len(parts) != 2 or not parts[1]:
        raise NeurontraceError(f"{uri!r} is not a hub file; write hf://OWNER/REPO/PATH")
    repo, filename = f"{parsed.netloc}/{parts[0]}", parts[1]
    _check_repo_id(repo, uri, "hf://OWNER/REPO/PATH")
    revision = parse_qs(parsed.query).get("revision", [None])[0] or None

    def download(local_only: bool) -> str:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(repo, filename, revision=revision, local_files_only=local_only)

    return Path(_fetch(uri, repo, download))

"""Official segmenter checkpoints as users get them: from the standard caches, downloaded once.

A segmenter name without ``--checkpoint`` resolves its official weights file here, as
open_clip resolves a pretrained tag:

* **Hugging Face hub** (EfficientViT-SAM: ``mit-han-lab/efficientvit-sam``, files
  ``efficientvit_sam_{l0,l1,l2,xl0,xl1}.pt``): :func:`hub_checkpoint`, i.e.
  ``huggingface_hub.try_to_load_from_cache`` then ``huggingface_hub.hf_hub_download`` into the
  standard HF cache (``$HF_HOME/hub``, ``HF_HUB_CACHE``).
* **A published URL** (SAM's ViT checkpoints on ``dl.fbaipublicfiles.com``):
  :func:`url_checkpoint`, i.e. ``torch.hub.download_url_to_file`` into torch's hub cache
  (``torch.hub.get_dir()/checkpoints``, ``$TORCH_HOME/hub/checkpoints``), where
  ``torch.hub.load_state_dict_from_url`` keeps its files too.

A file already in the cache is used without any network request. Hugging Face's offline
switch ``HF_HUB_OFFLINE=1`` (``huggingface_hub.constants.HF_HUB_OFFLINE``) stops both kinds of
download.
When the file is neither cached nor downloadable, the error is ONE line naming the file, where
it was looked for and ``--checkpoint FILE``. Nothing here reads the file: that is
:func:`retailklip.segment.checkpoint.read_state_dict` (``torch.load(..., weights_only=True)``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.parse import urlparse

import huggingface_hub
import torch.hub
from huggingface_hub import constants as hf_constants

from ..errors import WeightsUnavailableError, exception_line
from ..hub import hub_unreachable

logger = logging.getLogger(__name__)


def _unavailable(name: str, filename: str, where: str, source: str, reason: str) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"segmenter {name}: weights file {filename} is not in {where} and cannot be downloaded from {source} "
        f"({reason}); download it yourself and pass --checkpoint FILE (checkpoint=... in load_segmenter)"
    )


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache ``hf_hub_download`` uses (``HF_HUB_CACHE``, default ``$HF_HOME/hub``)."""
    return Path(hf_constants.HF_HUB_CACHE)


def hub_checkpoint(repo_id: str, filename: str, *, name: str) -> Path:
    """Path of ``filename`` of Hugging Face model repo ``repo_id`` in the HF cache, downloaded
    there first (``hf_hub_download``, revision ``main``) unless it is cached already.

    Args:
        repo_id: e.g. ``"mit-han-lab/efficientvit-sam"``.
        filename: file in the repo, e.g. ``"efficientvit_sam_l0.pt"``.
        name: segmenter name, for messages.

    Returns:
        The cached file (a path inside :func:`hub_cache_dir`).

    Raises:
        WeightsUnavailableError: not cached and the download failed (offline, the hub
            unreachable: at once, :func:`retailklip.hub.hub_unreachable`; missing repo/file); one
            line naming the file, the cache and ``--checkpoint``.
    """
    cached = huggingface_hub.try_to_load_from_cache(repo_id, filename)
    if isinstance(cached, str):
        logger.info("%s: using cached %s", name, cached)
        return Path(cached)
    where = f"the Hugging Face cache {hub_cache_dir()}"
    source = f"https://huggingface.co/{repo_id}"
    reason = hub_unreachable()  # one probe instead of huggingface_hub's retries (retailklip.hub)
    if reason is not None:
        raise _unavailable(name, filename, where, source, reason)
    logger.warning("%s: downloading %s from %s into %s", name, filename, source, hub_cache_dir())
    try:
        return Path(huggingface_hub.hf_hub_download(repo_id, filename))
    except Exception as exc:  # any hub/network failure becomes the one-line message
        raise _unavailable(name, filename, where, source, f"download failed: {exception_line(exc)}") from exc


def torch_hub_checkpoint_dir() -> Path:
    """Where torch keeps downloaded checkpoints: ``torch.hub.get_dir()/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def url_checkpoint(url: str, *, name: str) -> Path:
    """Path of the file published at ``url`` in torch's hub cache, downloaded there first
    (``torch.hub.download_url_to_file``; a partial download is never left under the final name)
    unless it is cached already.

    Args:
        url: direct link to the file; its last path component is the file name, e.g.
            ``https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth``.
        name: segmenter name, for messages.

    Returns:
        ``torch_hub_checkpoint_dir() / <file name>``.

    Raises:
        WeightsUnavailableError: not cached and not downloadable (``HF_HUB_OFFLINE`` set, no
            network, HTTP error); one line naming the file, the cache and ``--checkpoint``.
    """
    filename = os.path.basename(urlparse(url).path)
    path = torch_hub_checkpoint_dir() / filename
    if path.is_file():
        logger.info("%s: using cached %s", name, path)
        return path
    where = f"torch's hub cache {path.parent}"
    if hf_constants.HF_HUB_OFFLINE:
        raise _unavailable(name, filename, where, url, "offline: HF_HUB_OFFLINE is set")
    logger.warning("%s: downloading %s into %s", name, url, path.parent)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), progress=True)
    except Exception as exc:  # URLError, HTTPError, OSError (disk full, read-only cache)
        raise _unavailable(name, filename, where, url, f"download failed: {exception_line(exc)}") from exc
    return path

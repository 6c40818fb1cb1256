"""Reaching the Hugging Face hub: one probe, so that no network costs a second, not a minute.

Pretrained weights named by a hub tag (``timm:mobilenetv2_100``, ``open_clip:ViT-L-14/laion2b_s32b_b82k``,
``--segment efficientvit-sam-l0``) are fetched by ``huggingface_hub.hf_hub_download`` into the
standard cache.  Without network that call retries every request 5 times with backoff
(1 + 2 + 4 + 8 + 8 s), logging each try, and a model tries up to two files: measured on this
project's offline machine, ``catalog init --encoder timm:mobilenetv2_100`` took 52-54 s and printed
44 warning lines before its one-line error (22 messages, each through huggingface_hub's own log
handler and the CLI's; the CLIs now stop that propagation).

:func:`hub_unreachable` asks the hub endpoint once (``huggingface_hub.constants.ENDPOINT``, so a
mirror set by ``HF_ENDPOINT`` is asked, through the proxy settings the hub client uses).
:func:`hub_or_cache` runs a download block in huggingface_hub's own offline mode
(``HF_HUB_OFFLINE``) when that probe fails: files already in the cache load as they would have
after the retries, missing ones fail at once, and the caller's one-line error says why.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import exception_line

logger = logging.getLogger(__name__)

#: Seconds the probe waits for the hub to answer (connect and response).
PROBE_TIMEOUT_S = 5.0

_OFFLINE_LOCK = threading.Lock()


def hub_unreachable(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the Hugging Face hub cannot be reached now, or None when it answers.

    One ``HEAD`` request to the hub endpoint, no retries.  Any HTTP answer (even an error status)
    counts as reachable: the download's own retries deal with a hub that answers.

    Args:
        timeout: seconds to wait (connect and response).

    Returns:
        None, or one line: ``"offline: HF_HUB_OFFLINE is set"`` or ``"cannot reach URL (ERROR)"``.
    """
    from huggingface_hub import constants, get_session

    if constants.HF_HUB_OFFLINE:
        return "offline: HF_HUB_OFFLINE is set"
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - DNS, connection, TLS and timeout errors come in many types
        return f"cannot reach {constants.ENDPOINT} ({exception_line(exc)})"
    return None


@contextmanager
def hub_or_cache(what: str) -> Iterator[str | None]:
    """Run a block that may download from the hub; offline (cache only) if the hub is unreachable.

    Yields the probe's reason (:func:`hub_unreachable`), or None when the hub answered, for the
    caller's error message.  While the block runs offline, huggingface_hub's offline switch is
    on for the whole process (it is a process-wide setting); blocks that switch it are
    serialised, and the previous value is restored afterwards.

    Args:
        what: names the weights in the log line (e.g. ``"timm:mobilenetv2_100"``).
    """
    reason = hub_unreachable()
    if reason is None:
        yield None
        return
    from huggingface_hub import constants

    logger.info("%s: %s; looking in the local cache only", what, reason)
    with _OFFLINE_LOCK:
        saved = constants.HF_HUB_OFFLINE
        constants.HF_HUB_OFFLINE = True
        try:
            yield reason
        finally:
            constants.HF_HUB_OFFLINE = saved

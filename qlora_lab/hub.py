"""The Hugging Face hub with limits: no request waits forever, and a hub that stalls costs one timeout.

huggingface_hub's shared HTTP client has no timeout (`timeout=None` since huggingface_hub 1.0) and retries a
timed-out request up to 5 times with backoff. A hub that accepts connections and never answers (a captive portal,
a stalled proxy) then hangs whatever asks it, for minutes: importing bitsandbytes on a CPU (it asks the hub for an
optional kernel through the `kernels` package), transformers' config and file lookups. `install()`, run when
`qlora_lab` is imported, gives that client

- a timeout: TIMEOUT_S to connect, and TIMEOUT_S between bytes of an answer (a slow download goes on, a stalled
  one stops), also where a caller passes `timeout=None` (HfApi.model_info does); a request that sets its own
  timeout keeps it;
- a breaker: once a request waits TIMEOUT_S for an answer that never starts, every hub request for the next
  COOL_DOWN_S seconds fails at once with `HubStalled`, which is not retried, so a stalled hub costs one timeout
  instead of one per lookup and retry.

`reachable()` is the quick probe the loaders ask before going online; `stalled()` says whether the breaker is open.

Shortcuts: only the synchronous client is limited (transformers, peft and `kernels` use it); a download that
stalls midway through a file's body (after its headers came) is left to huggingface_hub's own resume and retries;
hf_xet's transfers have their own network stack.
"""

import os
import sys
import time
import urllib.request

TIMEOUT_S = 10.0  # seconds a hub request may wait to connect, or for the next bytes of an answer
COOL_DOWN_S = 60.0  # seconds the breaker stays open after a stall: hub requests fail at once meanwhile
PROBE_TIMEOUT_S = 5.0  # seconds reachable() waits for the first bytes of a tiny answer

_stalled = {"at": None, "url": "", "waited": TIMEOUT_S}  # when the breaker opened (time.monotonic()), the request
#                                                          that stalled, and how long it waited


class HubStalled(ConnectionError):
    """The hub stopped answering; raised instead of a request while the breaker is open (not retried)."""


def endpoint() -> str:
    """The hub's address, as huggingface_hub read it from $HF_ENDPOINT when imported (else https://huggingface.co).

    Example: endpoint() -> "https://huggingface.co"
    """
    try:
        from huggingface_hub import constants
        return constants.ENDPOINT.rstrip("/")
    except ImportError:
        return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def offline() -> bool:
    """Whether $HF_HUB_OFFLINE asks for no network at all.

    Example: offline() -> False (unless HF_HUB_OFFLINE=1)
    """
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def stalled() -> str | None:
    """Why hub requests fail at once now (the breaker is open), or None.

    Example: stalled() -> "the hub at http://127.0.0.1:8000 stopped answering (nothing for 10 s from GET ...)"
    """
    at = _stalled["at"]
    if at is None or time.monotonic() - at > COOL_DOWN_S:
        return None
    return f"the hub at {endpoint()} stopped answering (nothing for {_stalled['waited']:g} s from {_stalled['url']})"


def reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the hub answers an HTTPS request within `timeout` seconds (connect and first bytes).

    False at once when $HF_HUB_OFFLINE is set or the breaker is open.
    Example: reachable() -> True on a machine with network
    """
    if offline() or stalled():
        return False
    try:
        with urllib.request.urlopen(endpoint() + "/api/models?limit=1", timeout=timeout) as reply:
            reply.read(1)
        return True
    except (OSError, ValueError):  # URLError, timeouts, TLS errors and refused connections are all OSErrors
        return False


def _guarded(send, timeout_errors: tuple, timeout_s: float):
    """Wrap an httpx Client.send: refuse while the breaker is open; open it when an answer never starts."""
    def send_unless_stalled(request, **kwargs):
        reason = stalled()
        if reason:
            raise HubStalled(f"{reason}; not retried for {COOL_DOWN_S:.0f} s")
        # httpcore obeys the request's limits; `timeout=None` passed per request (HfApi.model_info does) means none
        # at all, so every unset limit gets ours
        limits = request.extensions.get("timeout") or {}
        request.extensions["timeout"] = {k: timeout_s if limits.get(k) is None else limits[k]
                                         for k in ("connect", "read", "write", "pool")}
        try:
            return send(request, **kwargs)
        except timeout_errors:
            if request.extensions["timeout"]["read"] >= timeout_s:  # our limit, not a caller's deliberately short probe
                _stalled.update(at=time.monotonic(), url=f"{request.method} {request.url}", waited=timeout_s)
            raise
    return send_unless_stalled


def install(timeout_s: float = TIMEOUT_S) -> bool:
    """Give huggingface_hub's shared client the timeout and the breaker (again with a new timeout: replaced).

    Returns False where huggingface_hub is missing or has no client factory (before 1.0).
    Example: install() -> True
    """
    try:  # here, not at the top: the package imports (and says what is missing) without huggingface_hub
        from huggingface_hub.utils import _http
    except ImportError:
        return False
    factory = getattr(_http, "_GLOBAL_CLIENT_FACTORY", None)
    if factory is None:
        return False
    if getattr(factory, "timeout_s", None) == timeout_s:
        return True
    unlimited = getattr(factory, "unlimited", factory)

    def limited_client():
        client = unlimited()
        client.timeout = timeout_s  # connect, read, write and pool, each
        httpx = sys.modules[type(client).__module__.split(".")[0]]  # httpx, or httpx2 (huggingface_hub >= 2)
        client.send = _guarded(client.send, (httpx.TimeoutException,), timeout_s)
        return client

    limited_client.timeout_s, limited_client.unlimited = timeout_s, unlimited
    _http.set_client_factory(limited_client)  # closes the shared client: the next request gets a limited one
    return True

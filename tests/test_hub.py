"""A hub that stalls: every request times out, a stall costs one timeout, the loaders fail in one line that names
the fix (issue 22). A stand-in server answers the probe and stalls on everything else, or stalls after N answers."""

import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from huggingface_hub.utils import get_session

from qlora_lab import hub, models


class StallingHub:
    """Answers requests whose first line contains one of `answer` (or the first `first_n` requests) with a tiny
    JSON body; accepts every other connection and never answers. `seen` lists (request line, answered)."""

    def __init__(self, answer=("/api/models?limit=1", "/api/agent-harnesses"), first_n=0):
        self.answer, self.first_n, self.seen, self.held = answer, first_n, [], []
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            line = conn.recv(65536).split(b"\r\n")[0].decode(errors="replace")
            answered = len(self.seen) < self.first_n or any(a in line for a in self.answer)
            self.seen.append((line, answered))
            if not answered:
                self.held.append(conn)  # accepted, never answered
                continue
            body = b'{"standardEnvVars": [], "harnesses": {}}' if "agent-harnesses" in line else b'[{"id": "x"}]'
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            conn.close()

    def close(self):
        self.server.close()
        for conn in self.held:
            conn.close()


def timeout_error() -> type:
    """httpx's TimeoutException, or httpx2's (huggingface_hub >= 2): whichever the hub client is made of."""
    return sys.modules[type(get_session()).__module__.split(".")[0]].TimeoutException


@pytest.fixture
def stalling_hub(monkeypatch):
    """A stand-in hub at $HF_ENDPOINT, a 1 s hub timeout for this test, a closed breaker before and after."""
    from huggingface_hub import constants

    stub = StallingHub()
    monkeypatch.setenv("HF_ENDPOINT", stub.url)  # huggingface_hub read it at import: set what it read, too
    monkeypatch.setattr(constants, "ENDPOINT", stub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", stub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setitem(hub._stalled, "at", None)
    hub.install(timeout_s=1.0)
    yield stub
    hub.install()  # the package's own timeout again, on a fresh client
    hub._stalled["at"] = None
    stub.close()


def test_the_package_gives_the_hub_client_a_timeout():
    import qlora_lab  # noqa: F401  (installs on import)

    timeout = get_session().timeout
    assert (timeout.connect, timeout.read) == (hub.TIMEOUT_S, hub.TIMEOUT_S)  # huggingface_hub's own: None


def test_a_stall_costs_one_timeout_then_requests_fail_at_once(stalling_hub):
    session = get_session()
    assert session.get(stalling_hub.url + "/api/models?limit=1").status_code == 200 and hub.stalled() is None
    start = time.perf_counter()
    with pytest.raises(timeout_error()):
        session.get(stalling_hub.url + "/api/models/org/name")
    assert 0.9 < time.perf_counter() - start < 5  # the 1 s limit, not forever
    assert "stopped answering" in hub.stalled() and "/api/models/org/name" in hub.stalled()
    start = time.perf_counter()
    with pytest.raises(hub.HubStalled):  # not retried by huggingface_hub's backoff: a ConnectionError, not httpx's
        session.get(stalling_hub.url + "/api/models?limit=1")  # even what the hub answers: the breaker is open
    assert time.perf_counter() - start < 0.5
    assert not hub.reachable()  # the loaders' probe agrees, without a request
    assert len(stalling_hub.seen) == 2


def test_a_lookup_that_passes_timeout_none_still_times_out(stalling_hub):
    """HfApi.model_info passes `timeout=None`, which in httpx means no limit at all: transformers' resolve_revision
    hung there for minutes after the probe had answered."""
    from huggingface_hub import HfApi

    start = time.perf_counter()
    with pytest.raises(timeout_error()):
        HfApi(endpoint=stalling_hub.url).model_info("org/name", timeout=None)
    assert time.perf_counter() - start < 5 and hub.stalled()


def test_a_callers_own_short_timeout_does_not_open_the_breaker(stalling_hub):
    with pytest.raises(timeout_error()):
        get_session().get(stalling_hub.url + "/slow", timeout=0.2)  # e.g. huggingface_hub's 3 s agent lookup
    assert hub.stalled() is None


def test_the_breaker_closes_after_its_cool_down(stalling_hub, monkeypatch):
    with pytest.raises(timeout_error()):
        get_session().get(stalling_hub.url + "/api/models/org/name")
    assert hub.stalled()
    monkeypatch.setitem(hub._stalled, "at", time.monotonic() - hub.COOL_DOWN_S - 1)
    assert hub.stalled() is None and hub.reachable()


def test_a_hub_that_accepts_but_never_answers_fails_the_probe_with_the_offline_message(stalling_hub):
    """A captive portal or stalling proxy: TCP connects, nothing comes back, not even to the probe."""
    stalling_hub.answer = ()
    start = time.perf_counter()
    with pytest.raises(models.HubUnavailable, match="this machine is offline .* did not answer within 5 s"):
        models.checkpoint_for("someorg/somemodel")
    assert time.perf_counter() - start < hub.PROBE_TIMEOUT_S + 2


def test_loading_a_hub_model_from_a_hub_that_stalls_after_the_probe_fails_fast_in_one_line(stalling_hub):
    """The probe answers, transformers' lookups stall: before, minutes (no timeout, 5 retries each)."""
    start = time.perf_counter()
    with pytest.raises(models.HubUnavailable) as err:
        models.load_model("someorg/somemodel", device="cpu")
    assert time.perf_counter() - start < 15
    message = str(err.value)
    assert "\n" not in message and "stopped answering" in message and "HF_HUB_OFFLINE=1" in message
    assert ("GET /api/models?limit=1 HTTP/1.1", True) in stalling_hub.seen  # the probe said: online
    assert sum(not answered for _, answered in stalling_hub.seen) == 1  # one stalled request, then none sent


def test_vram_for_a_hub_id_on_a_stalled_hub_exits_2_with_one_line_within_30_s(tmp_path):
    """The issue's command, in a fresh process with the package's real 10 s timeout and a fresh hub cache."""
    stub = StallingHub()
    env = dict(os.environ, HF_ENDPOINT=stub.url, HF_HOME=str(tmp_path), HF_HUB_OFFLINE="0")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "qlora_lab", "vram", "--model", "org/name"], env=env,
                          capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - start
    stub.close()
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and seconds < 30, (done.returncode, seconds, done.stderr[-2000:])
    assert len(errors) == 1 and "stopped answering" in errors[0] and "HF_HUB_OFFLINE=1" in errors[0], done.stderr

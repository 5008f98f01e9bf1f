"""Missing weights without a network: fail fast, quietly, create nothing, name everything (no real network here).

The network is simulated: the socket layer refuses every connection (unreachable), or
huggingface_hub's session / download functions are replaced by fakes (reachable).
"""
import logging
import socket
import time

import huggingface_hub
import huggingface_hub.constants
import huggingface_hub.utils
import pytest

import k4flash.weights as weights
from k4flash.published import COMPONENTS_REPO, DIT_FILENAME, DIT_REPO
from k4flash.weights import REQUIRED_FILES, resolve_weight_paths

KINDS = ("dit", "vae", "text_encoder", "tokenizer", "scheduler")


@pytest.fixture
def online_env(monkeypatch):
    """Downloads allowed as far as the environment goes (the suite itself runs with HF_HUB_OFFLINE=1)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read at import time


@pytest.fixture
def no_network(monkeypatch):
    """Every outgoing connection fails as with no DNS / no route; returns the list of attempted addresses."""
    attempts = []

    def unreachable(address, *args, **kwargs):
        attempts.append(address)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: unreachable((host, a[0] if a else None)))
    # A client made earlier may hold pooled connections: use a fresh one here, restore the old one after.
    http = huggingface_hub.utils._http
    monkeypatch.setattr(http, "_GLOBAL_CLIENT", None, raising=False)
    yield attempts
    client = getattr(http, "_GLOBAL_CLIENT", None)
    if client is not None:
        client.close()


@pytest.fixture
def probe_must_not_run(monkeypatch):
    def fail(*args, **kwargs):
        pytest.fail("the Hub was probed")

    monkeypatch.setattr(weights, "_probe_hub", fail, raising=False)
    monkeypatch.setattr(socket, "create_connection", fail)


def _assert_names_every_component(message, folder):
    assert "\n" not in message
    assert message.startswith(f"dit weights not found at {folder / DIT_FILENAME}"), message
    for kind in KINDS:
        assert kind in message, (kind, message)
    assert f"{DIT_REPO}/{DIT_FILENAME}" in message and COMPONENTS_REPO in message, message
    assert "weights_dir=" in message and "cache_dir=" in message, message  # what to do, for CLI and Python
    assert "explicitly" not in message, message


def _nothing_created(tmp_path):
    return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == []


def test_offline_env_fails_fast_naming_every_component_and_creates_nothing(tmp_path, monkeypatch, capfd,
                                                                            probe_must_not_run):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "nonexistent" / "weights"
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as err:
        resolve_weight_paths(folder)
    assert time.perf_counter() - start < 2
    _assert_names_every_component(str(err.value), folder)
    assert "HF_HUB_OFFLINE" in str(err.value)
    assert _nothing_created(tmp_path)
    assert capfd.readouterr() == ("", "")


def test_unreachable_hub_fails_fast_and_quietly_after_one_probe(tmp_path, online_env, no_network, capfd, caplog):
    folder = tmp_path / "nonexistent" / "weights"
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as err:
        resolve_weight_paths(folder)  # download=True
    elapsed = time.perf_counter() - start
    assert _nothing_created(tmp_path), sorted(tmp_path.rglob("*"))  # not the folder, not .cache/huggingface locks
    assert capfd.readouterr() == ("", "")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert elapsed < 2, f"{elapsed:.1f} s to the error"
    assert len(no_network) == 1, no_network  # one probe, no retries, no second component tried
    message = str(err.value)
    _assert_names_every_component(message, folder)
    assert "unreachable" in message, message


class _FakeResponse:
    def __init__(self, status_code):
        self.status_code = status_code


class _FakeSession:
    """huggingface_hub's session, answering HEAD with a fixed status (and checking nothing exists yet)."""

    def __init__(self, status_code, folder):
        self.status_code, self.folder, self.calls = status_code, folder, []

    def head(self, url, **kwargs):
        assert not self.folder.exists(), "created before the probe"
        assert kwargs.get("timeout") is not None and kwargs["timeout"] <= 10
        self.calls.append(url)
        return _FakeResponse(self.status_code)


def _fake_downloads(monkeypatch, calls):
    def hf_hub_download(repo_id, filename, local_dir=None, **kwargs):
        calls.append((repo_id, filename))
        assert repo_id == DIT_REPO and filename == DIT_FILENAME
        path = weights.Path(local_dir) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"fake")
        return str(path)

    def snapshot_download(repo_id, allow_patterns=None, local_dir=None, **kwargs):
        assert repo_id == COMPONENTS_REPO
        patterns = [allow_patterns] if isinstance(allow_patterns, str) else list(allow_patterns)
        calls.append((repo_id, tuple(patterns)))
        for pattern in patterns:
            kind = pattern.split("/")[0]
            for alternatives in REQUIRED_FILES[kind]:
                path = weights.Path(local_dir) / kind / alternatives[0]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("{}")
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)


@pytest.mark.parametrize("status", [200, 302, 404])
def test_reachable_hub_downloads_into_the_published_layout(tmp_path, monkeypatch, online_env, status):
    folder = tmp_path / "new" / "weights"
    session = _FakeSession(status, folder)
    monkeypatch.setattr(huggingface_hub.utils, "get_session", lambda: session)
    calls = []
    _fake_downloads(monkeypatch, calls)
    paths = resolve_weight_paths(folder)
    assert paths.dit == folder / DIT_FILENAME and paths.dit.is_file()
    for kind in KINDS[1:]:
        assert getattr(paths, kind) == folder / kind and (folder / kind).is_dir()
    assert {c[0] for c in calls} == {DIT_REPO, COMPONENTS_REPO}
    assert len(session.calls) == 1  # exactly the one probe: none would skip the reachability check, two retry


def test_hub_server_error_counts_as_unreachable(tmp_path, monkeypatch, online_env):
    folder = tmp_path / "weights"
    monkeypatch.setattr(huggingface_hub.utils, "get_session", lambda: _FakeSession(503, folder))
    _fake_downloads(monkeypatch, calls := [])
    with pytest.raises(FileNotFoundError, match=r"dit weights not found .*unreachable \(HTTP 503"):
        resolve_weight_paths(folder)
    assert calls == [] and not folder.exists()


def test_download_false_never_probes(tmp_path, online_env, probe_must_not_run, capfd):
    folder = tmp_path / "nonexistent"
    with pytest.raises(FileNotFoundError) as err:
        resolve_weight_paths(folder, download=False)
    _assert_names_every_component(str(err.value), folder)
    assert _nothing_created(tmp_path)
    assert capfd.readouterr() == ("", "")


def test_explicit_paths_are_never_downloaded(tmp_path, online_env, probe_must_not_run):
    folder = tmp_path / "weights"
    for kind in KINDS[1:]:
        for alternatives in REQUIRED_FILES[kind]:
            (folder / kind).mkdir(parents=True, exist_ok=True)
            (folder / kind / alternatives[0]).write_text("{}")
    missing = tmp_path / "typo" / "dit.pt"
    with pytest.raises(FileNotFoundError, match=r"^dit weights not found at .*typo/dit\.pt"):
        resolve_weight_paths(folder, dit_path=missing)
    assert not missing.parent.exists()
    (folder / DIT_FILENAME).write_bytes(b"fake")
    assert resolve_weight_paths(folder).dit == folder / DIT_FILENAME  # the published layout, no network

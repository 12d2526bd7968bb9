"""One API server per test module (started lazily), on the tiny ERNIE checkpoint."""

from __future__ import annotations

import pytest

from server_utils import API_SERVER, ENGINE_FLAGS, RemoteServer


@pytest.fixture(scope="module")
def server(tiny_ernie, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    srv = RemoteServer([*API_SERVER, "--model", str(tiny_ernie), *ENGINE_FLAGS], log).wait_ready()
    yield srv
    code = srv.stop()
    assert code == 0, f"server exited with {code}:\n{srv.log()[-3000:]}"


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def model(server):
    return server.model()

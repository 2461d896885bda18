"""The downloader against a real HTTP server on 127.0.0.1: success, bad checksum, truncation,
mirror fallback, and the messages a user sees when the network is unreachable."""

from __future__ import annotations

import hashlib
import http.server
import os
import socket
import threading
from pathlib import Path

import pytest

from metalab.data import download
from metalab.data.download import (
    DownloadError,
    Resource,
    check_files,
    fetch,
    fetch_dataset,
    require,
    resource,
)
from metalab.errors import ConfigError, DataError
from metalab.io import file_checksums

PAYLOAD = os.urandom(200_000)  # several chunks, so streaming and hashing span reads


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.routes``: path -> (status, body, mode), mode "ok" or "truncate"."""

    timeout = 5  # a stuck client cannot hold a handler thread for long

    def do_GET(self) -> None:
        self.server.hits.append(self.path)
        status, body, mode = self.server.routes.get(self.path, (404, b"not found", "ok"))
        self.send_response(status)
        # "truncate" promises more bytes than it sends, then closes: a cut connection.
        length = len(body) + 1000 if mode == "truncate" else len(body)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.routes, httpd.hits = {}, []
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True  # never outlives the test run, even if teardown is skipped
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/file.bin"


@pytest.fixture(autouse=True)
def _no_mirror_env(monkeypatch):
    monkeypatch.delenv("METALAB_MIRROR", raising=False)


def _res(body: bytes = PAYLOAD, urls: tuple[str, ...] = ()) -> Resource:
    return Resource(
        "ds/sub/file.bin",
        urls,
        md5=hashlib.md5(body).hexdigest(),
        sha256=hashlib.sha256(body).hexdigest(),
    )


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_fetch_success_is_verified_and_atomic(server, tmp_path):
    server.routes["/file.bin"] = (200, PAYLOAD, "ok")
    path = fetch(_res(urls=(server.base + "/file.bin",)), tmp_path, progress=False, backoff=0)
    assert path == tmp_path / "ds/sub/file.bin"
    assert path.read_bytes() == PAYLOAD
    assert _leftovers(tmp_path) == [path]  # no .part file left
    assert file_checksums(path) == (
        hashlib.md5(PAYLOAD).hexdigest(),
        hashlib.sha256(PAYLOAD).hexdigest(),
    )


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    server.routes["/file.bin"] = (200, b"an html error page", "ok")
    url = server.base + "/file.bin"
    with pytest.raises(DataError, match="checksum") as info:
        fetch(_res(urls=(url,)), tmp_path, progress=False, backoff=0)
    message = str(info.value)
    assert "ds/sub/file.bin" in message and url in message
    assert hashlib.md5(PAYLOAD).hexdigest() in message  # expected
    assert hashlib.md5(b"an html error page").hexdigest() in message  # got
    assert _leftovers(tmp_path) == []


def test_truncated_body_is_retried_then_fails(server, tmp_path):
    server.routes["/file.bin"] = (200, PAYLOAD[:5000], "truncate")
    with pytest.raises(DownloadError, match="truncated"):
        fetch(_res(urls=(server.base + "/file.bin",)), tmp_path, retries=2, backoff=0)
    assert server.hits == ["/file.bin"] * 3  # the first try and two retries
    assert _leftovers(tmp_path) == []


def test_mirror_fallback_after_404(server, tmp_path):
    server.routes["/good/file.bin"] = (200, PAYLOAD, "ok")
    urls = (server.base + "/gone/file.bin", server.base + "/good/file.bin")
    path = fetch(_res(urls=urls), tmp_path, progress=False, backoff=0)
    assert path.read_bytes() == PAYLOAD
    assert server.hits == ["/gone/file.bin", "/good/file.bin"]  # a 404 is not retried


def test_server_error_is_retried(server, tmp_path):
    server.routes["/file.bin"] = (503, b"busy", "ok")
    with pytest.raises(DownloadError, match="HTTP 503"):
        fetch(_res(urls=(server.base + "/file.bin",)), tmp_path, retries=1, backoff=0)
    assert len(server.hits) == 2


def test_mirror_env_replaces_the_public_urls(server, tmp_path, monkeypatch):
    server.routes["/ds/sub/file.bin"] = (200, PAYLOAD, "ok")
    monkeypatch.setenv("METALAB_MIRROR", server.base + "/")
    res = _res(urls=("http://127.0.0.1:9/never-used",))
    assert require(res, tmp_path, progress=False).read_bytes() == PAYLOAD


def test_require_unreachable_gives_one_line_howto(tmp_path, closed_port_url):
    res = _res(urls=(closed_port_url,))
    with pytest.raises(DataError) as info:
        require(res, tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("missing ds/sub/file.bin: download failed (")
    assert closed_port_url in message
    assert f"{tmp_path / 'ds' / 'sub'}/" in message
    assert _leftovers(tmp_path) == []


def test_require_without_download_names_file_url_and_folder(tmp_path):
    res = _res(urls=("https://example.org/file.bin",))
    with pytest.raises(DataError) as info:
        require(res, tmp_path, download=False)
    assert str(info.value) == (
        f"missing ds/sub/file.bin: get it from https://example.org/file.bin "
        f"and put it in {tmp_path / 'ds' / 'sub'}/"
    )


def test_require_returns_existing_file_without_network(tmp_path, closed_port_url):
    existing = tmp_path / "ds/sub/file.bin"
    existing.parent.mkdir(parents=True)
    existing.write_bytes(b"local copy, checksum not checked here")
    assert require(_res(urls=(closed_port_url,)), tmp_path) == existing


def test_fetch_dataset_skips_present_files(server, tmp_path, monkeypatch):
    server.routes["/b.bin"] = (200, PAYLOAD, "ok")
    present = Resource("ds/a.bin", (server.base + "/a.bin",), md5=None)
    missing = Resource("ds/b.bin", (server.base + "/b.bin",), md5=hashlib.md5(PAYLOAD).hexdigest())
    monkeypatch.setitem(download.RESOURCES, "tiny", (present, missing))
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds/a.bin").write_bytes(b"already here")
    paths = fetch_dataset("tiny", tmp_path, progress=False)
    assert paths == [tmp_path / "ds/a.bin", tmp_path / "ds/b.bin"]
    assert server.hits == ["/b.bin"]


def test_unknown_names_are_config_errors():
    with pytest.raises(ConfigError, match="mnist, omniglot"):
        fetch_dataset("cifar", Path("."))
    with pytest.raises(ConfigError, match="known datasets"):
        resource("nope/file.zip")


def test_resource_table():
    assert resource("mnist/t10k-labels-idx1-ubyte.gz").md5 == "ec29112dd5afa0611ce80d1b7f02629c"
    assert len(download.RESOURCES["omniglot"]) == 9
    assert all(r.md5 or r.sha256 for group in download.RESOURCES.values() for r in group)
    assert download.RESOURCES["mnist"][0].urls[0].startswith("https://ossci-datasets")


def test_check_files_statuses(tmp_path, monkeypatch):
    good = Resource("ds/good.bin", ("u",), md5=hashlib.md5(b"x").hexdigest())
    bad = Resource("ds/bad.bin", ("u",), md5=hashlib.md5(b"x").hexdigest())
    repacked = Resource("ds/re.bin", ("u",), md5="0" * 32, accept_repacked=True)
    unknown = Resource("ds/unknown.bin", ("u",), md5=None)
    gone = Resource("ds/gone.bin", ("u",), md5=None)
    monkeypatch.setitem(download.RESOURCES, "tiny", (good, bad, repacked, unknown, gone))
    (tmp_path / "ds").mkdir()
    for name, body in [("good", b"x"), ("bad", b"y"), ("re", b"z"), ("unknown", b"w")]:
        (tmp_path / f"ds/{name}.bin").write_bytes(body)
    rows = {Path(r["path"]).stem: r for r in check_files("tiny", tmp_path)}
    assert {k: r["status"] for k, r in rows.items()} == {
        "good": "ok",
        "bad": "corrupt",
        "re": "repacked",
        "unknown": "unverified",
        "gone": "missing",
    }
    assert rows["good"]["md5"] is True and rows["good"]["sha256"] is None
    assert rows["bad"]["md5"] is False and rows["bad"]["size"] == 1
    assert rows["gone"]["present"] is False and rows["gone"]["size"] is None


@pytest.mark.realdata
def test_check_files_on_the_staged_data(mnist_root, omniglot_root):
    root = mnist_root  # the one data root (omniglot_root is the same)
    assert {r["status"] for r in check_files("mnist", root)} == {"ok"}
    statuses = {r["path"]: r["status"] for r in check_files("omniglot", root)}
    assert statuses.pop("omniglot/images_background.zip") == "repacked"
    assert statuses.pop("omniglot/images_evaluation.zip") == "repacked"
    assert set(statuses.values()) == {"ok"}

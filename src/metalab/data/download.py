"""Known data files, their mirrors and checksums, and a verified, atomic downloader.

Every file is downloaded to a unique ``<name>.<random>.part`` file next to its destination, hashed
while streaming, checked against every known checksum and only then renamed into place, so a
crash or a bad mirror never leaves a half-written file where a loader would trust it.

Mirror override: set ``METALAB_MIRROR`` to a base URL laid out like the data root; each file is
then fetched from ``$METALAB_MIRROR/<resource path>``, e.g. ``$METALAB_MIRROR/mnist/<file>.gz``,
*instead of* its public mirrors (nothing leaks to the internet). Serving a copy of a data root
with ``python -m http.server`` is enough. Checksums are still verified, so such a mirror must
hold the official files (a repacked Omniglot zip is only accepted when already on disk).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import ssl
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from metalab import __version__
from metalab.errors import ConfigError, DataError
from metalab.io import atomic_file, file_checksums

MIRROR_ENV = "METALAB_MIRROR"
_CHUNK = 1 << 16
# Errors that mean "the network or the server let us down", worth a retry or another mirror.
# Plain OSError is left out on purpose: a full disk or a read-only folder is not a network problem.
_NETWORK_ERRORS = (
    urllib.error.URLError,
    http.client.HTTPException,
    ConnectionError,
    TimeoutError,
    ssl.SSLError,
)


@dataclass(frozen=True)
class Resource:
    """One data file.

    Attributes:
        path: Path relative to the data root, e.g. ``"omniglot/images_background.zip"``.
        urls: Mirrors, tried in order.
        md5: Official md5, or None if unknown.
        sha256: Official sha256, or None if unknown.
        note: Free text shown by ``metalab data check``.
        accept_repacked: A copy whose checksums differ from the official ones is still accepted
            (after the dataset loader's content check): the staged Omniglot zips are repacked.
    """

    path: str
    urls: tuple[str, ...]
    md5: str | None
    sha256: str | None = None
    note: str = ""
    accept_repacked: bool = False

    @property
    def name(self) -> str:
        """The file name, without folders."""
        return Path(self.path).name


_OMNIGLOT = "https://github.com/brendenlake/omniglot/raw/master/python/"
_VINYALS = (
    "https://raw.githubusercontent.com/jakesnell/prototypical-networks/master/"
    "data/omniglot/splits/vinyals/"
)
_MNIST = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
_REPACKED = "a repacked copy (other checksums, same PNGs) is accepted after a content check"


def _vinyals(split: str, sha256: str, what: str) -> Resource:
    return Resource(
        f"omniglot/splits/vinyals/{split}.txt",
        (f"{_VINYALS}{split}.txt",),
        md5=None,
        sha256=sha256,
        note=f"Vinyals et al. (2016) split: {what}",
    )


def _mnist(name: str, md5: str, sha256: str, what: str) -> Resource:
    return Resource(f"mnist/{name}", tuple(m + name for m in _MNIST), md5, sha256, what)


RESOURCES: dict[str, tuple[Resource, ...]] = {
    "omniglot": (
        Resource(
            "omniglot/images_background.zip",
            (_OMNIGLOT + "images_background.zip",),
            md5="68d2efa1b9178cc56df9314c21c6e718",
            note=f"background set, 30 alphabets, 964 characters; {_REPACKED}",
            accept_repacked=True,
        ),
        Resource(
            "omniglot/images_evaluation.zip",
            (_OMNIGLOT + "images_evaluation.zip",),
            md5="6b91aef0f799c5bb55b94e3f2daec811",
            note=f"evaluation set, 20 alphabets, 659 characters; {_REPACKED}",
            accept_repacked=True,
        ),
        Resource(
            "omniglot/all_runs.zip",
            (_OMNIGLOT + "one-shot-classification/all_runs.zip",),
            md5="e8996daecdf12afeeb4a53a179f06b19",
            sha256="437c1eeab0af8484112e1b4cc0f3d541ec727f7c47b9b202da738af9dfd6c325",
            note="Lake et al. (2015): the 20 official 20-way one-shot runs",
        ),
        Resource(
            "omniglot/images_background_small1.zip",
            (_OMNIGLOT + "images_background_small1.zip",),
            md5="e704a628b5459e08445c13499850abc4",
            sha256="f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4",
            note="official small background subset 1 (5 alphabets)",
        ),
        Resource(
            "omniglot/images_background_small2.zip",
            (_OMNIGLOT + "images_background_small2.zip",),
            md5="b75a71a51d3b13f821f212756fe481fd",
            sha256="3ccaa407515a8778e5d0861875af38b17e418f301ad5bb3b5a6b65d901a41c7f",
            note="official small background subset 2 (5 alphabets)",
        ),
        _vinyals(
            "train",
            "984522c194c30fb678ce53304a160a42faf5403ad4f9a67010f32dd3a35738e0",
            "1028 characters x 4 rotations",
        ),
        _vinyals(
            "val",
            "11f99e54faee3e26f53d3231c1cceac5bf7b8730e9be31cb6dab256551dc0c1a",
            "172 characters x 4 rotations",
        ),
        _vinyals(
            "trainval",
            "5276ae50c755596d0bff7f2284e85625695549a85ee6e36b6491ad1e5d1cc26a",
            "train + val, 1200 characters x 4 rotations",
        ),
        _vinyals(
            "test",
            "845264cc5c156180828ccf17915668b17ee21424d0170df6e7d81676aa5d1204",
            "423 characters x 4 rotations",
        ),
    ),
    "mnist": (
        _mnist(
            "train-images-idx3-ubyte.gz",
            "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            "training images, 60000x28x28",
        ),
        _mnist(
            "train-labels-idx1-ubyte.gz",
            "d53e105ee54ea40749a09fcbcd1e9432",
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            "training labels, 60000",
        ),
        _mnist(
            "t10k-images-idx3-ubyte.gz",
            "9fb629c4189551a2d022fa330f9573f3",
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            "test images, 10000x28x28",
        ),
        _mnist(
            "t10k-labels-idx1-ubyte.gz",
            "ec29112dd5afa0611ce80d1b7f02629c",
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
            "test labels, 10000",
        ),
    ),
}


class DownloadError(DataError):
    """Every mirror failed for network reasons (unreachable, HTTP error, truncated body).

    Attributes:
        reason: Why, for the first mirror tried.
        url: That mirror's URL.
    """

    def __init__(self, res: Resource, root: Path, reason: str, url: str) -> None:
        super().__init__(f"could not download {res.path} ({reason}); {_how_to_get(res, root, url)}")
        self.reason = reason
        self.url = url


def resource(path: str) -> Resource:
    """The known resource whose path (relative to the data root) is ``path``.

    Raises:
        ConfigError: No known resource has that path.
    """
    for group in RESOURCES.values():
        for res in group:
            if res.path == path:
                return res
    raise ConfigError(f"unknown data file {path!r}; known datasets: {', '.join(sorted(RESOURCES))}")


def mirror_urls(res: Resource) -> tuple[str, ...]:
    """The URLs to try for ``res``: ``$METALAB_MIRROR/<path>`` if that is set, else its mirrors."""
    base = os.environ.get(MIRROR_ENV)
    if base:
        return (f"{base.rstrip('/')}/{res.path}",)
    return res.urls


def _how_to_get(res: Resource, root: Path, url: str) -> str:
    return f"get it from {url} and put it in {(root / res.path).parent}/"


def require(res: Resource, root: Path, download: bool = True, progress: bool = True) -> Path:
    """The local path of ``res`` under ``root``, downloading it first if it is missing.

    An existing file is returned as is, without network access or checksum check (the Omniglot
    zips may be accepted repacked copies; ``check_files`` reports on checksums).

    Raises:
        DataError: The file is missing and could not (or may not) be downloaded. The one-line
            message names the file, a URL and the folder to put it in.
    """
    root = Path(root)
    dest = root / res.path
    if dest.is_file():
        return dest
    urls = mirror_urls(res)
    if not download:
        raise DataError(f"missing {res.path}: {_how_to_get(res, root, urls[0])}")
    try:
        return fetch(res, root, progress=progress)
    except DownloadError as err:
        raise DataError(
            f"missing {res.path}: download failed ({err.reason}); {_how_to_get(res, root, err.url)}"
        ) from None


def _mismatches(res: Resource, md5: str, sha256: str) -> list[str]:
    return [
        f"{kind} expected {want}, got {got}"
        for kind, want, got in (("md5", res.md5, md5), ("sha256", res.sha256, sha256))
        if want is not None and want != got
    ]


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
        # Bars in a log file or a CI transcript are noise.
        disable=not (enabled and sys.stderr.isatty()),
    )


class _ChecksumMismatch(Exception):
    """A download's bytes are not the file's: discard them and try the next mirror."""


def _download_once(
    url: str, out: BinaryIO, res: Resource, timeout: float, bar: Progress
) -> tuple[str, str]:
    """Stream ``url`` into the open file ``out``; return its (md5, sha256).

    Raises:
        urllib.error.HTTPError: The server answered with an error status.
        http.client.IncompleteRead: The body was shorter than its Content-Length.
        Other members of ``_NETWORK_ERRORS`` on connection problems.
    """
    request = urllib.request.Request(url, headers={"User-Agent": f"metalab/{__version__}"})
    md5, sha256 = hashlib.md5(), hashlib.sha256()
    with urllib.request.urlopen(request, timeout=timeout) as response:
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        task = bar.add_task(res.name, total=expected)
        received = 0
        try:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                md5.update(chunk)
                sha256.update(chunk)
                received += len(chunk)
                bar.update(task, completed=received)
        finally:
            bar.remove_task(task)
    # http.client returns a short body silently when the server closes early, so check it here.
    if expected is not None and received != expected:
        raise http.client.IncompleteRead(b"", expected - received)
    return md5.hexdigest(), sha256.hexdigest()


def _describe(err: BaseException) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, http.client.IncompleteRead):
        return f"truncated download, {err.expected} bytes missing"
    if isinstance(err, urllib.error.URLError):
        return f"{err.reason}"
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def _retryable(err: BaseException) -> bool:
    # A 404 or 403 will not change on retry; go to the next mirror. 5xx and 429 may.
    if isinstance(err, urllib.error.HTTPError):
        return err.code >= 500 or err.code == 429
    # No DNS or nobody listening: retrying within seconds only delays the offline user's message.
    if isinstance(err, urllib.error.URLError):
        return not isinstance(err.reason, (socket.gaierror, ConnectionRefusedError))
    return True


def fetch(
    res: Resource,
    root: Path,
    retries: int = 3,
    progress: bool = True,
    timeout: float = 60,
    *,
    urls: tuple[str, ...] | None = None,
    backoff: float = 1.0,
) -> Path:
    """Download ``res`` to ``root / res.path`` (replacing any file there), verified and atomic.

    Each mirror is tried in turn. On a timeout, a reset connection, a 5xx answer or a truncated
    body the same mirror is retried up to ``retries`` more times, waiting ``backoff * 2**attempt``
    seconds; a 4xx answer, a DNS failure or a refused connection moves on to the next mirror.

    Args:
        res: The file to download.
        root: The data root.
        retries: Extra attempts per mirror after a retryable failure.
        progress: Show a progress bar (only when stderr is a terminal).
        timeout: Socket timeout in seconds.
        urls: URLs to use instead of :func:`mirror_urls` (mainly for tests).
        backoff: Base wait between attempts in seconds; 0 for none.

    Returns:
        The final path.

    Raises:
        DataError: A download did not match a known checksum (and no other mirror had the right
            file); nothing is left behind.
        DownloadError: Every mirror failed for network reasons.
    """
    root = Path(root)
    dest = root / res.path
    dest.parent.mkdir(parents=True, exist_ok=True)
    urls = urls or mirror_urls(res)
    network_failures: list[tuple[str, str]] = []
    checksum_failure: str | None = None
    with _progress(progress) as bar:
        for url in urls:
            for attempt in range(retries + 1):
                try:
                    # A unique .part file: concurrent fetches of one file cannot mix their bytes.
                    with atomic_file(dest) as part:
                        wrong = _mismatches(res, *_download_once(url, part, res, timeout, bar))
                        if wrong:
                            raise _ChecksumMismatch("; ".join(wrong))
                except _NETWORK_ERRORS as err:
                    failure = (_describe(err), url)
                    if attempt < retries and _retryable(err):
                        time.sleep(backoff * 2**attempt)
                        continue
                    network_failures.append(failure)
                    break
                except _ChecksumMismatch as err:
                    checksum_failure = (
                        f"checksum mismatch for {res.path} from {url} ({err}); "
                        f"the download was discarded: put a good copy in {dest.parent}/"
                    )
                    break
                return dest
    if checksum_failure is not None:
        raise DataError(checksum_failure)
    reason, url = network_failures[0]
    if len(network_failures) > 1:
        reason += f"; {len(network_failures) - 1} other mirror(s) failed too"
    raise DownloadError(res, root, reason, url)


def fetch_dataset(name: str, root: Path, progress: bool = True) -> list[Path]:
    """Download every missing file of dataset ``name``; files already present are kept.

    Returns:
        The local paths of all the dataset's files, in :data:`RESOURCES` order.

    Raises:
        ConfigError: ``name`` is not a known dataset.
        DataError: A file could not be downloaded.
    """
    return [require(res, root, progress=progress) for res in _dataset(name)]


def _dataset(name: str) -> tuple[Resource, ...]:
    if name not in RESOURCES:
        raise ConfigError(f"unknown dataset {name!r}; known: {', '.join(sorted(RESOURCES))}")
    return RESOURCES[name]


def check_files(name: str, root: Path) -> list[dict]:
    """Presence and checksums of each file of dataset ``name`` under ``root``, for a report.

    Each row has ``path`` (str), ``present`` (bool), ``size`` (int or None), ``md5`` and
    ``sha256`` (True/False when checked against a known value, None when unknown or absent),
    ``status`` and ``note``. ``status`` is ``"ok"``, ``"missing"``, ``"unverified"`` (no known
    checksum), ``"repacked"`` (differs from official, which is accepted for this file after the
    loader's content check) or ``"corrupt"`` (differs from official: delete and re-fetch).

    Raises:
        ConfigError: ``name`` is not a known dataset.
    """
    rows = []
    for res in _dataset(name):
        path = Path(root) / res.path
        row = {"path": res.path, "present": path.is_file(), "size": None, "md5": None}
        row |= {"sha256": None, "status": "missing", "note": res.note}
        if row["present"]:
            row["size"] = path.stat().st_size
            md5, sha256 = file_checksums(path)
            if res.md5 is not None:
                row["md5"] = md5 == res.md5
            if res.sha256 is not None:
                row["sha256"] = sha256 == res.sha256
            checks = [row["md5"], row["sha256"]]
            if all(c is None for c in checks):
                row["status"] = "unverified"
            elif False not in checks:
                row["status"] = "ok"
            else:
                row["status"] = "repacked" if res.accept_repacked else "corrupt"
        rows.append(row)
    return rows

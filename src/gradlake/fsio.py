"""URLs and filesystems: the one place gradlake turns a path or URL into fsspec objects."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import posixpath
import re
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import IO, Any

import fsspec

from gradlake.errors import InputError


def filesystem(url: str, storage_options: dict[str, Any] | None = None):
    """(fs, path) for any fsspec URL or local path."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path


_PATH_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def is_path_name(name: object) -> bool:
    """Usable as one path component and as a partition value: letters, digits, '.', '_', '-'."""
    return isinstance(name, str) and bool(_PATH_NAME.match(name))


_IDENTIFIER = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def is_identifier(name: object) -> bool:
    """A path name that is also a column name of the --where language: a letter, then letters,
    digits or '_' (observable names: store arrays and columns norm_<name>)."""
    return isinstance(name, str) and bool(_IDENTIFIER.match(name))


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL or local path, keeping the protocol."""
    if "://" in url:
        proto, rest = url.split("://", 1)
        return f"{proto}://" + posixpath.join(rest, *parts)
    return posixpath.join(url, *parts)


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


@contextlib.contextmanager
def _local_replace(path: str) -> Iterator[IO[bytes]]:
    """A new file next to ``path``, renamed onto it when the block completes, removed if it fails."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "xb") as f:  # permissions as for any new file (umask), unlike mkstemp's 0600
            yield f
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def open_output(url: str, storage_options: dict[str, Any] | None = None) -> Iterator[IO[bytes]]:
    """A binary file to write at any fsspec URL; it appears whole when the block completes.

    Local disk: a temporary file renamed into place. Elsewhere: an fsspec transaction (on S3
    a multipart upload completed at the end, aborted if the block fails), so a failed or
    interrupted export never leaves a truncated file under the final name.
    """
    fs, path = filesystem(url, storage_options)
    if is_local(url):
        with _local_replace(path) as f:
            yield f
        return
    with fs.transaction, fs.open(path, "wb") as f:
        yield f


def storage_access_error(err: BaseException, url: str = "") -> InputError | None:
    """The user's fix for a storage failure that is theirs to fix (missing or refused
    credentials, an endpoint that cannot be reached, a local file they may not write), as
    one line; None for any other failure."""
    try:
        from botocore.exceptions import EndpointConnectionError, NoCredentialsError, PartialCredentialsError
    except ImportError:  # pragma: no cover -- s3fs brings botocore
        return None
    where = f"{url}: " if url else ""
    seen = set()
    while err is not None and id(err) not in seen:  # the cause may be wrapped (Ray task errors, s3fs)
        seen.add(id(err))
        if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
            found = "incomplete S3 credentials" if isinstance(err, PartialCredentialsError) else "no S3 credentials"
            return InputError(
                f"{where}{found} ({err}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(plus AWS_SESSION_TOKEN for temporary ones) in the environment, or name a profile "
                "(AWS_PROFILE or --profile), or run where an instance or pod role provides them")
        if isinstance(err, EndpointConnectionError):
            address = urllib.parse.urlsplit(err.kwargs.get("endpoint_url", ""))
            return InputError(f"{where}cannot reach the storage endpoint {address.scheme}://{address.netloc} "
                              "(connection failed); check --endpoint-url (or storage_options.endpoint_url) "
                              "and that the service is up")
        if isinstance(err, PermissionError) and getattr(err, "filename", None):  # local disk, not a store
            return InputError(f"{err.filename}: {err.strerror or 'permission denied'}")
        if isinstance(err, PermissionError):
            return InputError(f"{where}access refused by the storage ({err}); check the credentials "
                              "and their permissions on this bucket and prefix")
        err = getattr(err, "cause", None) or err.__cause__ or err.__context__
    return None


def check_access(url: str, storage_options: dict[str, Any] | None = None, what: str = "") -> None:
    """Fail early, with one line, if ``url`` cannot be reached: no credentials, access refused,
    an endpoint that does not answer, or (object stores) no such bucket."""
    if is_local(url):
        return
    protocol = url.split("://", 1)[0]
    options = dict(storage_options or {})
    if protocol in ("s3", "s3a"):  # a quick answer: one retry of a transient fault, not minutes of a dead endpoint
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("retries", {"max_attempts": 2, "mode": "standard"})
        config.setdefault("connect_timeout", 5)
        options["config_kwargs"] = config
    fs, path = filesystem(url, options)
    name = f"{what} {url}".strip()
    bucket = path.split("/", 1)[0] if protocol in _BUCKET_PROTOCOLS else ""
    try:
        fs.exists(path)
        if bucket and not fs.exists(bucket):
            raise InputError(f"{name}: bucket {bucket!r} does not exist (or these credentials cannot see it)")
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 -- only the user's failures are translated
        translated = storage_access_error(err, name)
        if translated is None:
            raise
        raise translated from None


def check_output(url: str, storage_options: dict[str, Any] | None = None, what: str = "--out",
                 folder: bool = True) -> None:
    """Fail early, with one line naming the path and the reason, if the output ``url`` (a folder,
    or a file with ``folder=False``) cannot be written; creates nothing. Object stores: as
    :func:`check_access`. Local disk: the path (or what stands in its place) is of the right
    kind and its nearest existing folder takes a new file (tried, then removed)."""
    if not is_local(url):
        check_access(url, storage_options, what)
        return
    path = os.path.abspath(filesystem(url, storage_options)[1])
    name = f"{what} {url}"
    if os.path.exists(path) and os.path.isdir(path) != folder:
        raise InputError(f"{name}: {path} is a {'file' if folder else 'folder'}, not a "
                         f"{'folder' if folder else 'file'}")
    parent = path if folder and os.path.isdir(path) else os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise InputError(f"{name}: {parent} is a file, not a folder")
    probe = os.path.join(parent, f".gradlake-probe-{uuid.uuid4().hex}")
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.unlink(probe)
    except OSError as err:
        reason = "the filesystem takes no new files" if err.errno == errno.ENOENT else err.strerror
        raise InputError(f"{name}: cannot write in {parent} ({reason})") from None


_BUCKET_PROTOCOLS = ("s3", "s3a", "gs", "gcs")


class Folder:
    """Files in one folder at any fsspec URL, named by paths relative to it.

    Whole-file writes are atomic (a rename on local disk, a single PUT on object stores), and
    existence checks and listings bypass the object stores' listing cache, so they see files
    that other processes wrote.
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url = url.rstrip("/") or url
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = filesystem(self.url, self.storage_options)
        self.local = is_local(self.url)
        self._zarr: dict[tuple[str, bool], Any] = {}

    def path(self, rel: str) -> str:
        """The filesystem path of ``rel`` (the folder itself for "")."""
        return posixpath.join(self.root, rel) if rel else self.root

    def join_url(self, rel: str) -> str:
        return join(self.url, rel)

    def forget_listing(self, rel: str) -> None:
        """Drop the cached listing of subfolder ``rel`` (object stores cache listings)."""
        if not self.local:
            self.fs.invalidate_cache(self.path(rel))

    def exists(self, rel: str) -> bool:
        path = self.path(rel)
        if not self.local:
            self.fs.invalidate_cache(posixpath.dirname(path))
        return self.fs.exists(path)

    def ls(self, rel: str = "") -> list[str]:
        """Names of the entries of subfolder ``rel``, listed afresh ([] when it is no folder)."""
        self.forget_listing(rel)
        try:
            entries = self.fs.ls(self.path(rel), detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [posixpath.basename(entry.rstrip("/")) for entry in entries]

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def write_bytes(self, rel: str, data: bytes | list) -> None:
        """Replace a file whole: a rename on local disk, a single PUT on object stores.

        ``data`` is bytes or a list of buffers (written in order).
        """
        path = self.path(rel)
        parts = data if isinstance(data, list) else [data]
        if not self.local:
            self.fs.pipe_file(path, b"".join(parts))
            return
        with _local_replace(path) as f:
            f.writelines(parts)

    def write_json(self, rel: str, value: Any) -> None:
        self.write_bytes(rel, json.dumps(value, indent=2, default=str).encode())

    def remove(self, rel: str) -> None:
        """Delete a file or a subfolder with everything in it, if present."""
        if self.exists(rel):
            self.fs.rm(self.path(rel), recursive=True)

    def zarr_store(self, rel: str, read_only: bool = False):
        """The zarr store rooted at ``rel`` (LocalStore on local disk, FsspecStore elsewhere)."""
        from zarr.storage import FsspecStore, LocalStore

        key = (rel, read_only)
        if key not in self._zarr:
            if self.local:
                self._zarr[key] = LocalStore(self.path(rel), read_only=read_only)
            else:
                self._zarr[key] = FsspecStore.from_url(self.join_url(rel), storage_options=self.storage_options,
                                                       read_only=read_only)
        return self._zarr[key]

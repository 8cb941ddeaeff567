"""`S3Store`: keys are objects under a prefix of an S3 bucket, on AWS or any S3-compatible store.

boto3 is imported when the first request is made, not with this module: the API starts without it.
The endpoint, region and credentials are boto3's own settings (AWS_ENDPOINT_URL or
AWS_ENDPOINT_URL_S3, AWS_REGION or AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY,
or a profile), which it reads itself.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from app.storage.base import (
    DEFAULT_CHUNK_SIZE,
    ObjectInfo,
    ObjectMissing,
    StorageError,
    UnsafeKey,
    check_key,
    check_prefix,
    join_key,
)
from app.storage.local import temp_beside

T = TypeVar("T")
# S3's DeleteObjects takes at most this many keys per request.
DELETE_BATCH = 1000
# Files from this size on go up and down in parts of this size, several at once: a 0.8 GB
# checkpoint is not one 0.8 GB request that starts over when the connection drops.
MULTIPART_BYTES = 16 * 2**20
TRANSFER_THREADS = 4
# Error codes that mean "no such object" (HEAD answers a bare 404, GET NoSuchKey).
_MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound"})


class S3Store:
    """Objects under `s3://bucket/prefix`. `client`: a boto3 S3 client (default: one from the
    environment, made at the first request); `page_size`: keys per listing request (at most 1000)."""

    is_local = False

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: Any = None,
        page_size: int = 1000,
        multipart_bytes: int = MULTIPART_BYTES,
    ) -> None:
        self.bucket = bucket
        self.prefix = check_prefix(prefix)
        self.page_size = page_size
        self.multipart_bytes = multipart_bytes
        self._client = client
        self._transfer_config: Any = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def __repr__(self) -> str:
        return f"S3Store({self.url!r})"

    @property
    def client(self) -> Any:
        """The boto3 client (made once, shared by threads: boto3 clients are thread-safe)."""
        with self._lock:
            if self._client is None:
                self._client = self._call("connect", "", _make_client)
            return self._client

    def _transfer(self) -> Any:
        if self._transfer_config is None:
            from boto3.s3.transfer import TransferConfig

            self._transfer_config = TransferConfig(
                multipart_threshold=self.multipart_bytes,
                multipart_chunksize=self.multipart_bytes,
                max_concurrency=TRANSFER_THREADS,
            )
        return self._transfer_config

    def _object(self, key: str) -> str:
        return join_key(self.prefix, check_key(key))

    def _key(self, name: str) -> str:
        return name[len(self.prefix) + 1 :] if self.prefix else name

    def _call(self, action: str, key: str, fn: Callable[[], T]) -> T:
        """`fn()`, with the store's failures turned into `StorageError` (a missing object into
        `ObjectMissing`)."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        where = f"s3://{self.bucket}/{join_key(self.prefix, key)}" if key else self.url
        try:
            return fn()
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            if code in _MISSING_CODES:
                raise ObjectMissing(f"no object {where}") from exc
            raise StorageError(
                f"object store: {action} {where} failed: {code} {error.get('Message', '')}".rstrip()
            ) from exc
        except (BotoCoreError, Boto3Error) as exc:
            # Boto3Error: S3UploadFailedError and its kin, which carry the ClientError as text.
            raise StorageError(f"object store: {action} {where} failed: {exc}") from exc

    def local_path(self, key: str) -> None:
        """None: objects are not files on this machine (`StoreCache` makes local copies)."""
        check_key(key)
        return None

    def put_file(self, key: str, path: Path) -> None:
        """Upload `path` (in parts when large)."""
        name = self._object(key)
        self._call(
            "upload",
            key,
            lambda: self.client.upload_file(str(path), self.bucket, name, Config=self._transfer()),
        )

    def get_file(self, key: str, dest: Path) -> None:
        """Download to a temporary name beside `dest`, then rename it into place."""
        name = self._object(key)
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        temp = temp_beside(dest)
        try:
            self._call(
                "download",
                key,
                lambda: self.client.download_file(self.bucket, name, str(temp), Config=self._transfer()),
            )
            temp.replace(dest)
        finally:
            temp.unlink(missing_ok=True)

    def stat(self, key: str) -> ObjectInfo | None:
        """HEAD the object: size, last change and ETag; None when there is none."""
        name = self._object(key)
        try:
            head = self._call("stat", key, lambda: self.client.head_object(Bucket=self.bucket, Key=name))
        except ObjectMissing:
            return None
        return _info(key, head["ContentLength"], head["LastModified"], head["ETag"])

    def list(self, prefix: str) -> list[ObjectInfo]:
        """Every object under the folder `prefix`, page by page (`page_size` keys per request)."""
        prefix = check_prefix(prefix)
        folder = "/".join(part for part in (self.prefix, prefix) if part)

        def pages() -> list[ObjectInfo]:
            paginator = self.client.get_paginator("list_objects_v2")
            found = []
            for page in paginator.paginate(
                Bucket=self.bucket,
                Prefix=f"{folder}/" if folder else "",
                PaginationConfig={"PageSize": self.page_size},
            ):
                for obj in page.get("Contents", []):
                    found.append(_info(self._key(obj["Key"]), obj["Size"], obj["LastModified"], obj["ETag"]))
            return found

        return sorted(self._call("list", prefix, pages), key=lambda info: info.key)

    def delete(self, key: str) -> None:
        """Delete the object (S3 answers the same when there is none)."""
        name = self._object(key)
        self._call("delete", key, lambda: self.client.delete_object(Bucket=self.bucket, Key=name))

    def delete_prefix(self, prefix: str) -> int:
        """List the folder, then delete its objects 1000 per request; how many were deleted."""
        if not check_prefix(prefix):
            raise UnsafeKey("delete_prefix needs a folder: the whole store is never deleted")
        keys = [info.key for info in self.list(prefix)]
        for start in range(0, len(keys), DELETE_BATCH):
            batch = [{"Key": self._object(key)} for key in keys[start : start + DELETE_BATCH]]

            def delete_batch(batch: list[dict[str, str]] = batch) -> None:
                answer = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )
                # DeleteObjects answers 200 with per-key errors: any is a failure.
                if answer.get("Errors"):
                    first = answer["Errors"][0]
                    raise StorageError(
                        f"object store: delete s3://{self.bucket}/{first.get('Key')} failed: "
                        f"{first.get('Code')} {first.get('Message', '')} "
                        f"({len(answer['Errors'])} keys not deleted)"
                    )

            self._call("delete", prefix, delete_batch)
        return len(keys)

    def open_stream(self, key: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[bytes]:
        """GET the object now (`ObjectMissing` at the call), then yield its body in chunks."""
        name = self._object(key)
        answer = self._call("download", key, lambda: self.client.get_object(Bucket=self.bucket, Key=name))
        return self._chunks(key, answer["Body"], chunk_size)

    def _chunks(self, key: str, body: Any, chunk_size: int) -> Iterator[bytes]:
        try:
            chunks = body.iter_chunks(chunk_size)
            while True:
                chunk = self._call("download", key, lambda: next(chunks, b""))
                if not chunk:
                    return
                yield chunk
        finally:
            body.close()


# Clients made so far, by the AWS_* environment they were made from (most recent last). boto3's own
# `boto3.client` goes through one default session that resolves the credentials once per process and
# keeps them, so a process whose environment names another store or key later (a test run starting
# several stores, a rotated key) would sign with the first one; and making a client per store would
# cost a session and a client (tens of milliseconds) on every request that opens the store.
_CLIENTS: dict[tuple[tuple[str, str], ...], Any] = {}
_CLIENTS_MAX = 8
_CLIENTS_LOCK = threading.Lock()


def _make_client() -> Any:
    """The S3 client for the current AWS_* environment: made with its own session on first use."""
    from boto3.session import Session
    from botocore.config import Config

    environment = tuple(
        sorted((name, value) for name, value in os.environ.items() if name.startswith("AWS_"))
    )
    with _CLIENTS_LOCK:
        client = _CLIENTS.pop(environment, None)
        if client is None:
            # Standard retries: throttling and dropped connections are retried with backoff.
            config = Config(retries={"mode": "standard", "max_attempts": 5})
            client = Session().client("s3", config=config)
        _CLIENTS[environment] = client
        while len(_CLIENTS) > _CLIENTS_MAX:
            del _CLIENTS[next(iter(_CLIENTS))]
        return client


def _info(key: str, size: int, modified: datetime, etag: str) -> ObjectInfo:
    mtime = modified if modified.tzinfo else modified.replace(tzinfo=UTC)
    return ObjectInfo(key=key, size=int(size), mtime=mtime.astimezone(UTC), etag=etag.strip('"'))

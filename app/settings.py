"""One settings object, read from `SGJOBS_*` environment variables, with safe embedded defaults."""

from __future__ import annotations

import json
import re
import socket
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.ml.types import DEFAULT_MAX_BATCH_IMAGES

# Listening on every interface names no host: the machine's own name is what clients use then.
ANY_INTERFACE = ("0.0.0.0", "::", "")
# SGJOBS_WEBHOOK_SECRET shorter than this is refused.
MIN_WEBHOOK_SECRET_LENGTH = 16
# The first admin key's file in `home`: the service writes it, the client CLI reads it by default.
ADMIN_KEY_FILE = "admin.key"
# A worker pool's name (spec `queue`, SGJOBS_WORKER_QUEUE): short, lower case, usable in a queue name.
POOL_NAME = r"[a-z0-9][a-z0-9_-]{0,62}"
POOL_PATTERN = f"^{POOL_NAME}$"


class Settings(BaseSettings):
    """Defaults run everything on one machine: a SQLite file and a SQLite-backed Celery broker."""

    model_config = SettingsConfigDict(env_prefix="SGJOBS_", env_file=".env", extra="ignore")

    home: Path = Field(default=Path("var"), description="SQLite file, job directories and logs.")
    # The five below default to places under `home` (filled in by `_derive_defaults`).
    datasets_dir: Path = Field(default=Path(), description="Dataset paths in specs resolve here only.")
    jobs_dir: Path = Field(default=Path(), description="One directory per job.")
    weights_dir: Path = Field(
        default=Path(), description="Registered weights, and the published files scanned at start."
    )
    database_url: str = Field(default="", description="SQLAlchemy URL; default: SQLite in home.")
    broker_url: str = Field(default="", description="Celery broker; default: SQLite in home.")
    task_queue: str = "sgjobs"
    # The pool of workers this worker belongs to (`sgjobs worker --queue`): it takes the jobs whose
    # spec names it in `queue` (`app.queue.queue_for`); "": the default pool (jobs without `queue`).
    worker_queue: str = Field(
        default="",
        pattern=f"^(?:{POOL_NAME})?$",
        description='The worker pool this worker serves; "": the default pool.',
    )
    # GPU ids, "0,1": `sgjobs worker` runs one worker process (one training slot) per listed GPU,
    # each with CUDA_VISIBLE_DEVICES=<id> (`sgjobs worker --gpus`); "": one worker, as it finds it.
    worker_gpus: str = Field(default="", description='GPU ids, "0,1": one worker each.')
    # GPUs per training slot (`sgjobs worker --gpus-per-slot`): with `worker_gpus` listed, their ids
    # in groups of this many, one worker each (CUDA_VISIBLE_DEVICES="0,1", ...); without, the one
    # worker offers this many. A slot trains jobs of up to this many `gpus` (data-parallel, one process
    # per GPU; on a CPU-only worker, one process per share of the cores).
    worker_gpus_per_slot: int = Field(
        default=1, ge=1, le=64, description="GPUs per training slot: the largest `gpus` it trains."
    )
    # Redis hands an unacknowledged message to another worker after this long. A training's message
    # is acknowledged when it ends; a redelivery of a running job's message finds it claimed and does
    # nothing, so this only bounds how long a message lost with its worker waits in Redis.
    broker_visibility_timeout_seconds: float = Field(default=7 * 24 * 3600.0, gt=0)
    # The embedded (SQLite) broker has no way to push a message: a worker asks it for one this often
    # while idle, and a job posted in between waits for the next ask (kombu's default, 1 s, was most of
    # the time from POST to claim on a warm worker). Each empty ask costs the worker about 1.5-2 ms of
    # CPU (measured): 0.25 s is about 0.6% of a core while idle, 0.1 s about 2%. None while it trains.
    broker_poll_seconds: float = Field(
        default=0.25, gt=0, le=10, description="How often an idle worker polls the SQLite broker."
    )

    # Artifacts (checkpoints, logs, exports, uploaded datasets and weights; `app.storage`): "" keeps
    # them as files under `home`; `s3://bucket/prefix` puts them in any S3-compatible store, whose
    # endpoint, region and credentials are boto3's own settings (AWS_ENDPOINT_URL, AWS_REGION,
    # AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...).
    storage_url: str = Field(default="", description='"" (files under home) or s3://bucket/prefix.')
    # Each machine keeps the store's objects it reads (models to serve, checkpoints to resume from)
    # in a folder of its home; the least recently used go beyond this size.
    storage_cache_max_bytes: int = Field(
        default=20 * 2**30, ge=2**20, description="Local copies of stored objects, at most (bytes)."
    )
    # A training process uploads its new checkpoints and logs to a remote store this often (and
    # everything once more before the attempt ends), so a resume elsewhere loses at most this much.
    storage_sync_seconds: float = Field(default=2.0, gt=0, le=3600)
    # A trained job's final upload is retried this long while the store is unreachable; after that
    # the attempt is given up as lost and the job queued again (resumed from its checkpoints), or
    # failed as `storage_unavailable` once its restarts are spent.
    storage_retry_seconds: float = Field(default=300.0, ge=0, le=86400)

    # Worker behaviour.
    device: str = Field(default="auto", pattern="^(auto|cpu|cuda)$")
    dataloader_workers: int = Field(default=0, ge=0, le=64)
    # Each worker keeps a fork server that has imported super-gradients, and a child of it with the
    # device set up waiting for the next job (`worker.standby`): a job starts in about a second
    # instead of several. They hold about 1 GB of memory, mostly shared (and the child a CUDA context
    # on a GPU). `training_spare` starts it with the worker (off: at the first claim, so the first job
    # waits for the imports); `training_fork_server` off makes it a spare used up by one attempt, and
    # with both off each attempt starts a fresh process.
    training_spare: bool = Field(default=True, description="Start a worker's fork server with the worker.")
    training_fork_server: bool = Field(
        default=True, description="Fork each attempt's training process from a process that imported SG once."
    )
    # glibc's malloc in training processes keeps freed memory for the next batch instead of handing
    # it back to the kernel: what and why, measured, at `app.ml.sg_setup.TRAINING_MALLOC`.
    training_malloc_tuning: bool = Field(
        default=True, description="Tune glibc's malloc for training processes (operator's MALLOC_* win)."
    )
    # The supervising worker renews its job's lease this often, and at least three times per lease
    # (`heartbeat_interval`); the training process renews it too, with every write it makes, but it
    # writes nothing while it loads the dataset and builds the model.
    heartbeat_seconds: float = Field(default=5.0, gt=0)
    # A running job's attempt holds a lease this long past its last renewal (database clock). An
    # attempt whose lease expired is lost: its job is resumed by another attempt (or failed as
    # "worker_lost" after max_restarts), and nothing the old attempt writes lands any more.
    lease_seconds: float = Field(default=30.0, gt=0)
    # The most automatic restarts a job spec may ask for (`max_restarts`, default 2).
    max_restarts_limit: int = Field(default=10, ge=0, le=1000)
    # PostgreSQL ends the session of a transaction that holds row locks and has sat idle this long,
    # freeing them (`app.db.bound_locked_idle`): a process frozen mid-transaction (SIGSTOP, a paused
    # VM) then holds up other writers of its rows, and the expiry of its own lease, no longer.
    db_lock_idle_seconds: float = Field(default=60.0, gt=0)
    # Each worker's sweeper runs this often: leases, lost messages, its own presence.
    sweep_interval_seconds: float = Field(default=10.0, gt=0)
    # A queued job is sent again when a worker has been idle this long and the job's last send is
    # older than this: an idle worker would have received its message, so the message is lost.
    resend_after_seconds: float = Field(default=30.0, gt=0)
    # A training process that reports nothing (no batch, metric or event) this long is killed.
    stall_timeout_seconds: float = Field(default=3600.0, gt=0)
    # How long a training process may take to stop after a cancel before it is killed.
    cancel_grace_seconds: float = Field(default=30.0, gt=0)
    # The training callback reads the cancel flag and writes buffered metrics at most this often.
    report_interval_seconds: float = Field(default=0.5, gt=0)

    # Per-batch metric points (loss components and LR of every batch: most of the metrics table) of
    # jobs that finished longer ago than this are deleted by the sweeper; per-epoch points stay.
    # Empty or "none": kept forever.
    batch_metrics_retention_days: float | None = Field(default=30.0, gt=0)

    # Prediction (`/predict`).
    predict_cache_size: int = Field(default=4, ge=1, le=64, description="Models held ready for /predict.")
    predict_cache_max_bytes: int = Field(
        default=2 * 2**30,
        ge=2**20,
        description="Memory the models held ready for /predict may take together (roughly: ONNX file "
        "sizes, or twice a PyTorch model's weights); least recently used ones are dropped beyond it.",
    )
    predict_max_request_bytes: int = Field(default=64 * 2**20, ge=1024)
    predict_max_images: int = Field(default=32, ge=1, le=1024)
    predict_max_image_pixels: int = Field(default=50_000_000, ge=1, description="Decompression-bomb guard.")
    # All the images of one request together, from their headers before any is decoded: 32 small
    # files can decode to gigabytes.
    predict_max_total_pixels: int = Field(
        default=100_000_000, ge=1, description="Pixels of all the images of one request."
    )
    # An export traces the model on one batch of its input shape: YOLO-NAS-S took about 1.5 GB plus
    # 150 bytes a pixel here (2.0 GB for 8 x 640 x 640; 41 x 1824 x 1568 was killed for memory at
    # 18 GB). The default allows 32 images of 640 x 640 per call.
    export_max_pixels: int = Field(
        default=32 * 640 * 640,
        ge=32 * 32,
        description="Largest batch_size x height x width of one ONNX export (POST .../export).",
    )
    # A job that succeeds is exported for serving (an ONNX file that onnxruntime runs, `/predict`'s
    # fast path) by its training process before it is recorded as succeeded; off: PyTorch serves it.
    serving_export: bool = Field(default=True, description="Export each succeeded job for onnxruntime.")
    # What /predict found for a succeeded job or registered weights (`app.prediction.lookups`).
    predict_lookup_seconds: float = Field(
        default=5.0,
        ge=0,
        description="How long an API process reuses the checkpoint /predict found for a succeeded job or "
        "registered weights without asking the database again. Deleting them removes their files, which "
        "ends the reuse at once where the files were; an API process on another machine with a remote "
        "store may predict with a deleted model for this long (0: every request asks).",
    )
    # The API loads a freshly succeeded job's model before anyone asks (`app.prediction.warm`).
    predict_warm: bool = Field(default=True, description="Load new models before their first /predict.")
    predict_warm_poll_seconds: float = Field(default=0.5, gt=0, le=60)
    # Requests for the same model and thresholds that reach the inference process within this window
    # share one forward pass (`app.ml.batcher`); 0: only requests already queued are merged. Waited
    # only while the model is busy: a request to an idle model runs at once.
    predict_batch_window_ms: float = Field(
        default=5.0,
        ge=0,
        le=1000,
        description="How long a batch of a busy model waits for more requests (ms).",
    )
    # Images per merged forward pass; a request with more runs alone, never split.
    predict_max_batch_images: int = Field(
        default=DEFAULT_MAX_BATCH_IMAGES, ge=1, le=1024, description="Images per merged batch."
    )
    # Predictions this API process runs at once (headers checked, then waiting for the inference
    # process, which decodes the images), on threads of their own: more get a 503 with Retry-After
    # instead of a thread from the pool that every other route uses.
    predict_max_in_flight: int = Field(
        default=32, ge=1, le=1024, description="Predictions at once; more: 503."
    )

    # JSON bodies (and any body a route reads into memory), `app.limits.JsonBodyLimit`.
    json_max_bytes: int = Field(default=2**20, ge=1024, description="Largest JSON request body.")

    # Dataset uploads (`POST /datasets`).
    upload_max_bytes: int = Field(default=8 * 2**30, ge=1024, description="Compressed archive size.")
    upload_max_uncompressed_bytes: int = Field(default=32 * 2**30, ge=1024)
    upload_max_members: int = Field(default=500_000, ge=1)
    upload_max_ratio: float = Field(default=200.0, gt=1, description="Uncompressed / compressed size.")
    # Annotation files a format parses whole (COCO JSON; a Hugging Face dataset's metadata, JSON and
    # CSV files): parsing takes many times a file's size in memory, so larger ones are refused first.
    # Also for datasets named by path, not only uploads.
    annotation_max_bytes: int = Field(default=512 * 2**20, ge=1024, description="Largest annotation file.")

    # Weights uploads (`POST /weights`). A YOLO-NAS-L training checkpoint with its optimizer state is
    # about 0.8 GB; 4 GiB leaves room without letting one request fill the disk.
    weights_max_bytes: int = Field(default=4 * 2**30, ge=1024, description="Largest checkpoint upload.")

    # Fault injection for the chaos tests (`app.failpoints`): a JSON object; empty in production.
    failpoints: str = Field(default="", description="Test-only: faults to inject (see app/failpoints.py).")

    # Live feeds (`GET /jobs/{id}/stream`). Each API process polls the database once per tick for
    # each job that has open streams, in one short session, and fans the rows out to all of them.
    stream_poll_seconds: float = Field(default=0.5, gt=0, le=60, description="How often a feed polls.")
    # Keep-alive comments, so proxies and clients do not take a quiet stream for a dead one.
    stream_ping_seconds: float = Field(default=15.0, gt=0, le=3600)
    # A stream ends after this long (clients reconnect with Last-Event-ID and lose nothing): no
    # request lives forever, and a stream of a job that is never picked up ends too.
    stream_max_seconds: float = Field(default=3600.0, gt=0)
    # Database sessions all the streams of one API process use at once (polls and catch-ups), out
    # of the pool's 15: streams never starve the other routes.
    stream_db_sessions: int = Field(default=2, ge=1, le=15)

    # API.
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    log_level: str = "info"
    # Access. The first admin key: taken from here, or made at the first start; either way written
    # to $SGJOBS_HOME/admin.key (mode 0600).
    admin_key: SecretStr | None = Field(default=None, description="The first admin API key (>= 32 chars).")
    key_cache_seconds: float = Field(
        default=5.0,
        ge=0,
        description="How long an API process trusts a key it checked without asking the database "
        "again: a revoked key stops working within this time (0: every request asks).",
    )
    # Host headers the API answers (DNS rebinding): loopback names and `host` are always allowed;
    # add the names clients use ("*" allows any). JSON list or comma-separated.
    allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Browser origins allowed to call the API (CORS); none by default. JSON list or comma-separated.
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # Webhooks (`spec.webhook`, app/webhooks). Hosts a webhook URL may name: host names, IP
    # addresses or host:port, matched exactly (case-insensitive); none by default, so webhooks are
    # refused until an operator names the receivers. "*" allows any host whose every address is
    # public (not loopback, private, link-local, ...), checked when each message is sent.
    webhook_allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # The HMAC-SHA256 key of `X-Sgjobs-Signature`; unset: made at the first start and kept in
    # $SGJOBS_HOME/webhook.secret (mode 0600), which every process sharing that home reads.
    webhook_secret: SecretStr | None = Field(default=None, description="Webhook signing key (>= 16 chars).")
    # One POST waits this long for the receiver's answer.
    webhook_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    # A message is tried this many times (with exponential backoff and jitter) before it is failed.
    webhook_max_attempts: int = Field(default=8, ge=1, le=100)
    # The wait before the second try; it doubles with each try, up to webhook_backoff_max_seconds.
    webhook_backoff_seconds: float = Field(default=10.0, gt=0)
    webhook_backoff_max_seconds: float = Field(default=3600.0, gt=0)
    # The sender (in the API and in each worker) looks for messages to send this often.
    webhook_poll_seconds: float = Field(default=2.0, gt=0)
    # Absolute links in webhook messages start with this; default: http://<host>:<port>.
    public_url: str = Field(default="", description="The API's address as clients reach it.")

    # Quotas, per tenant (`tenant_quotas` overrides them for named tenants).
    # Jobs queued or running at once; past it a new job is a 429 with Retry-After.
    quota_active_jobs: int = Field(default=10, ge=0)
    # Bytes of uploaded datasets and weights kept; past it an upload is a 413.
    quota_storage_bytes: int = Field(default=100 * 2**30, ge=0)
    # max_epochs x input height x input width of one job (the compute one job may ask for): the
    # default allows 1000 epochs at 640x640.
    quota_epoch_pixels: int = Field(default=1000 * 640 * 640, ge=1)
    # {"tenant": {"active_jobs": 20, "storage_bytes": ..., "epoch_pixels": ...}}, as JSON; the names
    # are those of the quota_* settings above.
    tenant_quotas: dict[str, dict[str, int]] = Field(default_factory=dict)

    @field_validator("allowed_hosts", "cors_origins", "webhook_allowed_hosts", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        # "a,b" in an environment variable, or a JSON list.
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                return json.loads(value)
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _long_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_WEBHOOK_SECRET_LENGTH:
            raise ValueError(f"at least {MIN_WEBHOOK_SECRET_LENGTH} characters: a short key can be guessed")
        return value

    @field_validator("webhook_allowed_hosts")
    @classmethod
    def _lower_hosts(cls, value: list[str]) -> list[str]:
        return [v.strip().lower() for v in value if v.strip()]

    @field_validator("public_url")
    @classmethod
    def _absolute_url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if value and not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("an absolute http:// or https:// URL, such as https://sgjobs.example.com")
        return value

    @field_validator("storage_url")
    @classmethod
    def _known_storage(cls, value: str) -> str:
        # A typo here would otherwise surface at the first upload, on a worker, mid-training.
        from app.storage.url import parse_storage_url

        parse_storage_url(value)
        return value.strip()

    @field_validator("tenant_quotas")
    @classmethod
    def _known_quotas(cls, value: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
        # A misspelt override would silently leave the default in force: refused at start instead.
        known = {name.removeprefix("quota_") for name in cls.model_fields if name.startswith("quota_")}
        for tenant, overrides in value.items():
            unknown = set(overrides) - known
            if unknown:
                raise ValueError(
                    f"tenant_quotas[{tenant!r}] names unknown quotas {sorted(unknown)}; "
                    f"known: {sorted(known)}"
                )
        return value

    @field_validator("batch_metrics_retention_days", mode="before")
    @classmethod
    def _none_keeps_forever(cls, value: Any) -> Any:
        # An environment variable cannot be null: an empty value (or "none") is how it says "forever".
        if isinstance(value, str) and value.strip().lower() in ("", "none"):
            return None
        return value

    @model_validator(mode="before")
    @classmethod
    def _derive_defaults(cls, data: Any) -> Any:
        # Before field validation, so every location is a plain typed field with one name.
        if not isinstance(data, dict):
            return data
        home = Path(data.get("home") or "var").expanduser().resolve()
        data = {**data, "home": home}
        data["datasets_dir"] = Path(data.get("datasets_dir") or home / "datasets").expanduser().resolve()
        data["jobs_dir"] = Path(data.get("jobs_dir") or home / "jobs").expanduser().resolve()
        data["weights_dir"] = Path(data.get("weights_dir") or home / "weights").expanduser().resolve()
        data["database_url"] = data.get("database_url") or f"sqlite:///{home / 'sgjobs.db'}"
        data["broker_url"] = data.get("broker_url") or f"sqla+sqlite:///{home / 'broker.db'}"
        return data

    @property
    def base_url(self) -> str:
        """Where clients reach the API: `public_url`, else this service's own address."""
        if self.public_url:
            return self.public_url
        host = socket.gethostname() if self.host in ANY_INTERFACE else self.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    def as_env(self) -> dict[str, str]:
        """The resolved locations as `SGJOBS_*` variables, for child processes.

        A child started in another working directory (the training process runs in its job
        directory) would otherwise resolve a relative `SGJOBS_HOME` to somewhere else.
        """
        return {
            "SGJOBS_HOME": str(self.home),
            "SGJOBS_DATASETS_DIR": str(self.datasets_dir),
            "SGJOBS_JOBS_DIR": str(self.jobs_dir),
            "SGJOBS_WEIGHTS_DIR": str(self.weights_dir),
            "SGJOBS_DATABASE_URL": self.database_url,
            "SGJOBS_BROKER_URL": self.broker_url,
            "SGJOBS_TASK_QUEUE": self.task_queue,
        }

    @field_validator("worker_gpus")
    @classmethod
    def _gpu_list(cls, value: str) -> str:
        gpu_ids(value)
        return value

    @property
    def worker_gpu_ids(self) -> list[str]:
        """`worker_gpus` as a list of ids, in order, without repeats ([]: none listed)."""
        return gpu_ids(self.worker_gpus)

    @property
    def worker_slots(self) -> list[list[str]]:
        """The listed GPU ids in slots of `worker_gpus_per_slot`, in order ([]: none listed)."""
        ids = self.worker_gpu_ids
        size = self.worker_gpus_per_slot
        return [ids[i : i + size] for i in range(0, len(ids), size)]

    @model_validator(mode="after")
    def _slots_fill_up(self) -> Settings:
        count = len(self.worker_gpu_ids)
        if count % self.worker_gpus_per_slot:
            raise ValueError(
                f"worker_gpus lists {count} GPU{'' if count == 1 else 's'}, not a multiple of "
                f"worker_gpus_per_slot {self.worker_gpus_per_slot}"
            )
        return self

    @property
    def heartbeat_interval(self) -> float:
        """How often a worker renews its job's lease: `heartbeat_seconds`, but at least 3 times a lease."""
        # Two missed beats (a slow database, a loaded machine) must not lose a healthy attempt.
        return min(self.heartbeat_seconds, self.lease_seconds / 3)

    @property
    def admin_key_file(self) -> Path:
        """Where the first admin key is written (mode 0600)."""
        return self.home / ADMIN_KEY_FILE

    def ensure_dirs(self) -> None:
        """Create the home, datasets, jobs and weights directories."""
        for path in (self.home, self.datasets_dir, self.jobs_dir, self.weights_dir):
            path.mkdir(parents=True, exist_ok=True)


def gpu_ids(text: str) -> list[str]:
    """GPU ids from "0,1" (`--gpus`, SGJOBS_WORKER_GPUS); ValueError for anything but numbers or a repeat."""
    ids = [part.strip() for part in text.split(",") if part.strip()]
    for gpu in ids:
        if not gpu.isdigit():
            raise ValueError(f"GPU ids are numbers separated by commas, not {text!r}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"a GPU is listed twice in {text!r}")
    return ids


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (tests clear the cache after changing the environment)."""
    return Settings()

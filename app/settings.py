"""One settings object, read from `SGJOBS_*` environment variables, with safe embedded defaults."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Defaults run everything on one machine: a SQLite file and a SQLite-backed Celery broker."""

    model_config = SettingsConfigDict(env_prefix="SGJOBS_", env_file=".env", extra="ignore")

    home: Path = Field(default=Path("var"), description="SQLite file, job directories and logs.")
    datasets_dir: Path | None = Field(default=None, description="Dataset paths in specs resolve here only.")
    jobs_dir: Path | None = None
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; default: SQLite in home.")
    broker_url: str | None = Field(default=None, description="Celery broker; default: SQLite in home.")
    task_queue: str = "sgjobs"

    # Worker behaviour.
    device: str = Field(default="auto", pattern="^(auto|cpu|cuda)$")
    dataloader_workers: int = Field(default=0, ge=0, le=64)
    heartbeat_seconds: float = Field(default=5.0, gt=0)
    # A running job whose heartbeat is older than this is failed as "worker lost".
    stale_after_seconds: float = Field(default=120.0, gt=0)
    # Queued jobs whose message may have been lost are sent again after this long.
    requeue_after_seconds: float = Field(default=600.0, gt=0)
    # A training process that reports nothing (no batch, metric or event) this long is killed.
    stall_timeout_seconds: float = Field(default=3600.0, gt=0)
    # How long a training process may take to stop after a cancel before it is killed.
    cancel_grace_seconds: float = Field(default=30.0, gt=0)
    # The training callback reads the cancel flag and writes buffered metrics at most this often.
    report_interval_seconds: float = Field(default=0.5, gt=0)

    # Prediction (`/predict`).
    predict_cache_size: int = Field(default=4, ge=1, le=64, description="Models held ready for /predict.")
    predict_max_request_bytes: int = Field(default=64 * 2**20, ge=1024)
    predict_max_images: int = Field(default=32, ge=1, le=1024)
    predict_max_image_pixels: int = Field(default=50_000_000, ge=1, description="Decompression-bomb guard.")

    # Dataset uploads (`POST /datasets`).
    upload_max_bytes: int = Field(default=8 * 2**30, ge=1024, description="Compressed archive size.")
    upload_max_uncompressed_bytes: int = Field(default=32 * 2**30, ge=1024)
    upload_max_members: int = Field(default=500_000, ge=1)
    upload_max_ratio: float = Field(default=200.0, gt=1, description="Uncompressed / compressed size.")

    # API.
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    log_level: str = "info"

    @model_validator(mode="after")
    def _derive_paths(self) -> Settings:
        self.home = self.home.expanduser().resolve()
        if self.datasets_dir is None:
            self.datasets_dir = self.home / "datasets"
        self.datasets_dir = self.datasets_dir.expanduser().resolve()
        if self.jobs_dir is None:
            self.jobs_dir = self.home / "jobs"
        self.jobs_dir = self.jobs_dir.expanduser().resolve()
        if self.database_url is None:
            self.database_url = f"sqlite:///{self.home / 'sgjobs.db'}"
        if self.broker_url is None:
            self.broker_url = f"sqla+sqlite:///{self.home / 'broker.db'}"
        return self

    @property
    def db_url(self) -> str:
        assert self.database_url is not None
        return self.database_url

    @property
    def broker(self) -> str:
        assert self.broker_url is not None
        return self.broker_url

    @property
    def datasets_root(self) -> Path:
        assert self.datasets_dir is not None
        return self.datasets_dir

    @property
    def jobs_root(self) -> Path:
        assert self.jobs_dir is not None
        return self.jobs_dir

    def as_env(self) -> dict[str, str]:
        """The resolved locations as `SGJOBS_*` variables, for child processes.

        A child started in another working directory (the training process runs in its job
        directory) would otherwise resolve a relative `SGJOBS_HOME` to somewhere else.
        """
        return {
            "SGJOBS_HOME": str(self.home),
            "SGJOBS_DATASETS_DIR": str(self.datasets_root),
            "SGJOBS_JOBS_DIR": str(self.jobs_root),
            "SGJOBS_DATABASE_URL": self.db_url,
            "SGJOBS_BROKER_URL": self.broker,
            "SGJOBS_TASK_QUEUE": self.task_queue,
        }

    def ensure_dirs(self) -> None:
        """Create the home, datasets and jobs directories."""
        for path in (self.home, self.datasets_root, self.jobs_root):
            path.mkdir(parents=True, exist_ok=True)


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (tests clear the cache after changing the environment)."""
    return Settings()

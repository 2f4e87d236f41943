"""The one pipeline config: every knob with its default; the CLI, the environment and prefect.yaml only override."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BeforeValidator, Field, PlainSerializer, WithJsonSchema, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tasks import storage
from tasks.dataset import BatchesConfig, DatasetConfig, DownloadConfig, ValidateConfig
from tasks.errors import Log, quiet
from tasks.layout import CACHE_DIR, REGISTRY_DIR
from tasks.locks import LOCK_EXPIRY_S, redacted, stage_locks
from tasks.models import TrainConfig
from tasks.registry import PromotionConfig
from tasks.sweep import SweepConfig

PROJECT_ROOT = Path(__file__).resolve().parents[1]
Stage = Literal["download", "validate", "preprocess", "train", "evaluate", "report"]
STAGES: tuple[Stage, ...] = get_args(Stage)
# A root: a folder on this machine (made absolute against the caller's working directory once, here, never later) or
# an s3:// URL of object storage that several machines share.
Root = Annotated[Any, BeforeValidator(storage.as_root), PlainSerializer(str, return_type=str), WithJsonSchema({"type": "string"})]


class PipelineConfig(BaseSettings):
    """Settings of a pipeline run. Environment: MNIST_PIPELINE_DATA_DIR, MNIST_PIPELINE_DOWNLOAD__SOURCE, ..."""

    model_config = SettingsConfigDict(env_prefix="MNIST_PIPELINE_", env_nested_delimiter="__", extra="forbid")

    data_dir: Root = Field(PROJECT_ROOT / "data", description="Root of raw and processed data (a folder or s3://BUCKET/PREFIX).")
    artifacts_dir: Root = Field(PROJECT_ROOT / "artifacts", description="Root of reports, models, metrics and the cache "
                                "(a folder or s3://BUCKET/PREFIX).")
    download: DownloadConfig = DownloadConfig()
    dataset: DatasetConfig = DatasetConfig()
    validation: ValidateConfig = ValidateConfig()
    batches: BatchesConfig = BatchesConfig()
    train: TrainConfig = TrainConfig()
    promotion: PromotionConfig = PromotionConfig()
    sweep: SweepConfig = SweepConfig()
    # Its password never leaves this process: JSON (a flow run's parameters, which the Prefect server stores) has it
    # as ***, and the repr leaves the URL out.
    locks: Annotated[str | None, PlainSerializer(lambda url: url and redacted(url), when_used="json")] = Field(
        None, repr=False, description="Stage locks from a Redis server that several machines share "
        "(redis://[:PASSWORD@]HOST:PORT/DB, or rediss:// for TLS); default: flock on this machine.")
    lock_expiry_s: float = Field(LOCK_EXPIRY_S, gt=0, description="A Redis stage lock expires this many seconds after its "
                                 "holder stopped renewing it (it renews every third of that while it lives).")

    @field_validator("locks")
    @classmethod
    def _redis_url(cls, url: str | None) -> str | None:
        if url and not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("expected a Redis URL: redis://HOST:PORT/DB (or rediss://, unix://)")
        return url or None

    @property
    def cache_dir(self) -> Path:
        """Where stage results (artifact references) are recorded for reuse across runs."""
        return self.artifacts_dir / CACHE_DIR

    def lock_manager(self) -> Any:
        """Return the lock manager of the stages of this config's cache (a manager of tasks.locks)."""
        return stage_locks(self.locks, self.cache_dir, self.lock_expiry_s)

    def check_services(self, log: Log = quiet) -> None:
        """Fail with one line unless the lock server and the object storage of the roots answer; warn (through `log`)
        when roots on object storage have no lock server to share."""
        self.lock_manager().check()
        storage.check_roots({"data-dir": self.data_dir, "artifacts-dir": self.artifacts_dir}, bool(self.locks), log)

    @property
    def registry_dir(self) -> Path:
        """Where the champion model and the history of promotion decisions are kept."""
        return self.artifacts_dir / REGISTRY_DIR

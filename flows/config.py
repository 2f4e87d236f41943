"""The one pipeline config: every knob with its default; the CLI, the environment and prefect.yaml only override."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tasks.dataset import DatasetConfig
from tasks.download import DownloadConfig
from tasks.promote import PromotionConfig
from tasks.sweep import SweepConfig
from tasks.train import TrainConfig
from tasks.validate import ValidateConfig

PROJECT_ROOT = Path(__file__).resolve().parents[1]
Stage = Literal["download", "validate", "preprocess", "train", "evaluate", "report"]
STAGES: tuple[Stage, ...] = get_args(Stage)


class PipelineConfig(BaseSettings):
    """Settings of a pipeline run. Environment: MNIST_PIPELINE_DATA_DIR, MNIST_PIPELINE_DOWNLOAD__SOURCE, ..."""

    model_config = SettingsConfigDict(env_prefix="MNIST_PIPELINE_", env_nested_delimiter="__", extra="forbid")

    data_dir: Path = Field(PROJECT_ROOT / "data", description="Root of raw and processed data.")
    artifacts_dir: Path = Field(PROJECT_ROOT / "artifacts", description="Root of reports, models, metrics and the cache.")
    download: DownloadConfig = DownloadConfig()
    dataset: DatasetConfig = DatasetConfig()
    validation: ValidateConfig = ValidateConfig()
    train: TrainConfig = TrainConfig()
    promotion: PromotionConfig = PromotionConfig()
    sweep: SweepConfig = SweepConfig()

    @field_validator("data_dir", "artifacts_dir")
    @classmethod
    def _absolute(cls, path: Path) -> Path:
        # Relative paths are taken against the caller's working directory once, here, never later.
        return path.expanduser().absolute()

    @property
    def cache_dir(self) -> Path:
        """Where stage results (artifact references) are recorded for reuse across runs."""
        return self.artifacts_dir / "cache"

    @property
    def registry_dir(self) -> Path:
        """Where the champion model and the history of promotion decisions are kept."""
        return self.artifacts_dir / "registry"

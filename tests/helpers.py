"""Helpers shared by several test files: reading a run's summary, and giving a config to the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def states(summary) -> dict[str, str]:
    """Return {stage: state} of a run's summary."""
    return {stage: info["state"] for stage, info in summary["stages"].items()}


def artifact(summary, stage, name) -> Path:
    """Return the path of a stage's file (the first whose path ends with `name`) in a run's summary."""
    return Path(next(p for p in summary["stages"][stage]["artifacts"] if p.endswith(name)))


def config_env(config) -> dict[str, str]:
    """Return the environment that gives `config` to a command (the synthetic one of conftest: no flags for all)."""
    fields = config.model_dump(mode="json", include={"data_dir", "artifacts_dir", "download", "validation", "train", "dataset", "promotion"})
    return {f"MNIST_PIPELINE_{name.upper()}": value if isinstance(value, str) else json.dumps(value)
            for name, value in fields.items()}


def synthetic_run(source: Path, digests: dict[str, str], data_dir, artifacts_dir) -> tuple[dict[str, str], list[str]]:
    """Return the environment and the `run` arguments for the synthetic source of conftest with tiny training."""
    env = {
        "MNIST_PIPELINE_DOWNLOAD__SHA256": json.dumps(digests),
        "MNIST_PIPELINE_DOWNLOAD__MIRRORS": "[]",
        "MNIST_PIPELINE_DOWNLOAD__RETRIES": "0",
        "MNIST_PIPELINE_VALIDATION__TRAIN_COUNT": "200",
        "MNIST_PIPELINE_VALIDATION__TEST_COUNT": "50",
        "MNIST_PIPELINE_TRAIN__JIT_COMPILE": "false",
    }
    args = ["run", "--json", "--source", str(source), "--data-dir", str(data_dir), "--artifacts-dir", str(artifacts_dir),
            "--epochs", "2", "--hidden-units", "32", "--batch-size", "32"]
    return env, args


def run_cli(env, args, code=None) -> subprocess.CompletedProcess:
    """Run `mnist-pipeline ARGS` (or `python -c CODE ARGS`) in the repo with exactly `env`."""
    command = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "flows.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


def dataset_key(config) -> str:
    """Return the registry key of a configuration's dataset (its classes as its recorded download found them)."""
    from flows.stages import configured_dataset

    return configured_dataset(config).key()


def champion_of(config):
    """Return the champion record of a configuration's dataset, None if it has none."""
    from tasks.registry import read_champion

    return read_champion(config.registry_dir, dataset_key(config))

"""Sweep spaces: which training configurations a sweep tries, from `--grid` flags or a YAML/JSON file.

A space is a grid (every combination of the listed values) and/or `samples: N` random draws (from lists, or from
ranges `{low, high, log}`) with a seed; with both, every grid point is combined with each draw. Parameters are the
train config's fields (`model`, `learning_rate`, `hidden_units`, ...). A model's size knob applies to the trials of
the models that have it: `--grid model=mlp,cnn --grid hidden_units=128,512` gives four mlp trials and one cnn trial.
Everything is checked before a sweep starts.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tasks.artifacts import ArtifactRef, publish
from tasks.errors import Log, PipelineError, quiet, validation_problems
from tasks.files import sha256_json, workdir
from tasks.layout import SWEEP_HTML, SWEEP_MD, SWEEP_PNG
from tasks.models import KNOBS, MODEL_DEFAULTS, TrainConfig

PARAMETERS = tuple(TrainConfig.model_fields)


class SweepConfig(BaseModel):
    """Where a sweep's trials run."""

    model_config = ConfigDict(extra="forbid")

    dask_address: str | None = Field(
        None, description="a running Dask scheduler, tcp://HOST:PORT (default: a LocalCluster started for the sweep)")
    dask_workers: int | None = Field(None, ge=1, description="workers of the LocalCluster (default: one per core)")
    dask_timeout_s: float = Field(30.0, gt=0, description="how long to wait for the scheduler at dask_address")


class Range(BaseModel):
    """Draw uniformly from [low, high] (log-uniformly with `log`); integers when both bounds are integers."""

    model_config = ConfigDict(extra="forbid")

    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.low < self.high:
            raise ValueError(f"expected low < high, found low {self.low} and high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"expected low > 0 for a log range, found {self.low}")
        return self


class Space(BaseModel):
    """What a sweep tries: a grid and/or random draws."""

    model_config = ConfigDict(extra="forbid")

    grid: dict[str, list[Any]] = Field(default_factory=dict)
    samples: int = Field(0, ge=0, le=10_000, description="random draws from `random`")
    random: dict[str, list[Any] | Range] = Field(default_factory=dict)
    seed: int = 0

    @field_validator("grid", "random")
    @classmethod
    def _known(cls, values: dict[str, Any]) -> dict[str, Any]:
        for name, value in values.items():
            if name not in PARAMETERS:
                raise ValueError(f"unknown parameter {name!r}; expected one of {', '.join(PARAMETERS)}")
            if isinstance(value, list) and not value:
                raise ValueError(f"{name}: expected at least one value, found an empty list")
        return values

    @model_validator(mode="after")
    def _something(self) -> Space:
        if set(self.grid) & set(self.random):
            raise ValueError(f"{sorted(set(self.grid) & set(self.random))[0]}: in both grid and random; give it once")
        if self.random and not self.samples:
            raise ValueError("random: expected samples: N (how many draws), found none")
        if self.samples and not self.random:
            raise ValueError("samples: expected random: the parameters to draw, found none")
        if not self.grid and not self.samples:
            raise ValueError("expected a grid or random draws, found neither")
        return self


def parse_grid(flags: list[str]) -> dict[str, list[str]]:
    """Return {parameter: values} from `--grid name=v1,v2` flags (values as typed; the config converts them)."""
    grid: dict[str, list[str]] = {}
    for flag in flags:
        name, sep, values = flag.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise PipelineError(f"--grid {flag}: expected NAME=V1,V2,..., found no '='")
        if name in grid:
            raise PipelineError(f"--grid {flag}: {name} given twice; list all its values in one flag")
        grid[name] = [v.strip() for v in values.split(",") if v.strip()]
    return grid


def load_space(path: Path) -> dict[str, Any]:
    """Return the raw space document of a YAML or JSON file."""
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise PipelineError(f"{path}: cannot read the sweep space ({exc.strerror or exc})") from None
    try:
        document = json.loads(text) if Path(path).suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise PipelineError(f"{path}: expected a YAML or JSON sweep space, found unparsable text ({exc})") from None
    if not isinstance(document, dict):
        raise PipelineError(f"{path}: expected a mapping with grid, samples, random, seed; found {type(document).__name__}")
    return document


def build_space(document: dict[str, Any], where: str) -> Space:
    """Check a space document; a problem is one line naming `where`."""
    try:
        return Space.model_validate(document)
    except ValidationError as exc:
        raise PipelineError(f"{where}: invalid sweep space: {validation_problems(exc)}") from None


def expand(space: Space, base: dict[str, Any], where: str) -> list[TrainConfig]:
    """Return the resolved train config of every trial (in order, duplicates kept): `base` overridden by each point."""
    rng = random.Random(space.seed)
    draws = [{name: _draw(rng, spec) for name, spec in sorted(space.random.items())} for _ in range(space.samples)] or [{}]
    points = [dict(zip(space.grid, values)) for values in itertools.product(*space.grid.values())]
    trials = []
    for point in points:
        for draw in draws:
            overrides = {**base, **point, **draw}
            if "model" in point or "model" in draw:
                # A size knob of another model does not apply to this trial (only when the model itself is swept).
                own = MODEL_DEFAULTS.get(str(overrides["model"]), {})
                overrides = {k: v for k, v in overrides.items() if k not in KNOBS or k in own}
            try:
                trials.append(TrainConfig(**overrides).resolved())
            except ValidationError as exc:
                shown = ", ".join(f"{k}={v}" for k, v in {**point, **draw}.items())
                raise PipelineError(f"{where}: trial {shown}: {validation_problems(exc)}") from None
    return trials


def _draw(rng: random.Random, spec: list[Any] | Range) -> Any:
    if isinstance(spec, list):
        return rng.choice(spec)
    if spec.log:
        value = math.exp(rng.uniform(math.log(spec.low), math.log(spec.high)))
    else:
        value = rng.uniform(spec.low, spec.high)
    if float(spec.low).is_integer() and float(spec.high).is_integer() and not spec.log:
        return int(round(value))
    return float(f"{value:.6g}")  # a readable value; the same seed gives the same draws


def trial_id(config: TrainConfig) -> str:
    """Return a short identity of a resolved trial config (identical trials share it)."""
    return sha256_json(config.model_dump(mode="json"))[:12]


def write_report(rows: list[dict[str, Any]], columns: list[str], best_id: str, decision: Any, out_dir: Path,
                 log: Log = quiet) -> ArtifactRef:
    """Write `sweep.md`, a self-contained `sweep.html` and the accuracy figure; publish them under `out_dir`."""
    from tasks.report.figures import sweep_figure, to_png
    from tasks.report.render import data_uri, markdown_page, render

    rows = [{"test_accuracy": None, "test_loss": None, "fit_seconds": None, "model_digest": None, **row} for row in rows]
    best = next(row for row in rows if row["id"] == best_id)
    labels = ["\n".join(f"{name}={row[name]}" for name in columns) for row in rows]
    png = to_png(sweep_figure(labels, [row["test_accuracy"] for row in rows], rows.index(best)))
    values = {"rows": rows, "columns": columns, "best": best, "decision": decision}
    with workdir(out_dir) as work:
        (work / SWEEP_PNG).write_bytes(png)
        (work / SWEEP_MD).write_text(render("sweep.md.j2", src=SWEEP_PNG, **values))
        page = markdown_page(render("sweep.md.j2", src=data_uri(png), **values), f"Sweep of {len(rows)} trials")
        (work / SWEEP_HTML).write_text(page)
        ref = publish("sweep", work)
    log(f"sweep report of {len(rows)} trials written")
    return ref

"""The mnist-predict flow: score new images with the champion (or another model), each step cached by content."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows import ui
from flows.config import PipelineConfig
from flows.runner import TASKS, run_stage
from flows.stages import configured_dataset
from tasks import predict
from tasks.artifacts import ArtifactRef, file_ref, published_problem
from tasks.errors import PipelineError
from tasks.files import sha256_file
from tasks.images import Invert
from tasks.layout import MODEL_FILE, MODELS_DIR, PREDICTIONS_FILE
from tasks.locks import holding_run_lock
from tasks.registry import KnownModel, find_model, read_history


def resolve_model(spec: str, config: PipelineConfig, dataset: str) -> KnownModel:
    """Return the model that `spec` names: `champion` (the dataset's), a digest prefix, or a path to a model.keras
    file."""
    models_dir = config.artifacts_dir / MODELS_DIR
    path = Path(spec).expanduser()
    if spec not in ("champion",) and (path.suffix == ".keras" or path.is_dir() or "/" in spec):
        if path.is_dir():
            path = path / MODEL_FILE
        if not path.is_file():
            raise PipelineError(f"{path}: model file: expected a model.keras file, found none")
        path = path.absolute()
        # A model the pipeline trained keeps its digest (and class names); any other file is known by its bytes.
        known = {Path(d.model_path): d for d in read_history(config.registry_dir)}
        decision = known.get(path)
        if decision is not None:
            return KnownModel(decision.model_digest, path, decision.class_names)
        return KnownModel(sha256_file(path), path)
    model = find_model(config.registry_dir, models_dir, spec, dataset)
    if published_problem(model.path.parent) is not None:
        raise PipelineError(f"{model.path}: model {model.digest[:16]}: its files differ from those published; "
                            "retrain it (`mnist-pipeline run --rerun train`) or name another model")
    return model


@flow(name="mnist-predict")
def mnist_predict(
    inputs: list[str],
    model: str = "champion",
    output: str | None = None,
    invert: Invert = "auto",
    class_names: list[str] | None = None,
    config: PipelineConfig | None = None,
    dataset: str | None = None,
) -> dict[str, Any]:
    """Score image files, folders, IDX or parquet files with a model; write one row per image.

    `model`: `champion` (the champion of `dataset`, a key in the registry, default the configured dataset's), a
    digest or unique prefix, or a path to a model.keras. `output`: a parquet
    (or .csv) file to write besides the predictions artifact. `invert`: auto detects dark-on-light image files.
    """
    config = config or PipelineConfig()
    config.check_services(log=get_run_logger().warning)
    with holding_run_lock(config.lock_manager()):  # gc removes nothing until the run ends
        if output is not None and not Path(output).expanduser().parent.is_dir():
            raise PipelineError(f"{output}: output folder {Path(output).expanduser().parent} does not exist: "
                                "expected an existing folder")
        dataset = dataset or configured_dataset(config).key()
        chosen = resolve_model(model, config, dataset)
        files = predict.list_inputs(inputs)
        names = class_names or chosen.class_names
        logger = get_run_logger()
        logger.info("scoring %d input files with model %s (%s)", len(files), chosen.digest[:16], chosen.path)

        stages: dict[str, str] = {}

        def run(name: str, inputs: dict[str, Any]) -> ArtifactRef:
            ref, computed = run_stage(TASKS[name], {**inputs, "artifacts_dir": config.artifacts_dir}, config)
            stages[name] = "completed" if computed else "cached"
            return ref

        # Keyed by the files' contents (`fingerprint`): the same images under other names are not decoded again.
        decoded = run("load_inputs", {"files": files, "fingerprint": [sha256_file(path) for path in files],
                                      "invert": invert})
        scores = run("predict_classes", {"inputs": decoded, "model": model_ref(chosen)})
        table = run("write_predictions", {"files": files, "inputs": decoded, "scores": scores,
                                          "model_digest": chosen.digest, "class_names": list(names) if names else None})

        frame = predict.read_table(table.path(PREDICTIONS_FILE))
        if output is not None:
            predict.write_table(frame, Path(output).expanduser().absolute())
        ui.publish_predictions(frame, decoded)
        return {
            "run_id": str(flow_run.get_id()),
            "output": str(Path(output).expanduser().absolute()) if output else str(table.path(PREDICTIONS_FILE)),
            "predictions": str(table.path(PREDICTIONS_FILE)),
            "images": len(frame),
            "model": chosen.digest,
            **({"dataset": dataset} if model == "champion" else {}),
            "counts": table.meta["counts"],
            "stages": stages,
        }


def model_ref(model: KnownModel) -> ArtifactRef:
    """Return a reference to a model file under the digest it is known by (its cache identity)."""
    try:
        return ArtifactRef(stage="model", digest=model.digest, files={MODEL_FILE: file_ref(model.path)})
    except FileNotFoundError:
        raise PipelineError(f"{model.path}: model file: expected a model.keras file, found none") from None

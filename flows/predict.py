"""The mnist-predict flow: score new images with the champion (or another model), each step cached by content."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from flows.config import PipelineConfig
from flows.pipeline import run_stage
from tasks import predict, storage
from tasks.core import PipelineError, sha256_file
from tasks.registry import KnownModel, find_model, read_history

TABLE_KEY = "mnist-predictions"
STRIP_KEY = "mnist-predictions-strip"
TABLE_ROWS = 50


def resolve_model(spec: str, config: PipelineConfig) -> KnownModel:
    """Return the model that `spec` names: `champion`, a digest prefix, or a path to a model.keras file."""
    models_dir = config.artifacts_dir / "models"
    path = Path(spec).expanduser()
    if spec not in ("champion",) and (path.suffix == ".keras" or path.is_dir() or "/" in spec):
        if path.is_dir():
            path = path / predict.MODEL_FILE
        if not path.is_file():
            raise PipelineError(f"{path}: model file: expected a model.keras file, found none")
        path = path.absolute()
        # A model the pipeline trained keeps its digest (and class names); any other file is known by its bytes.
        known = {Path(d.model_path): d for d in read_history(config.registry_dir)}
        decision = known.get(path)
        if decision is not None:
            return KnownModel(decision.model_digest, path, decision.class_names)
        return KnownModel(sha256_file(path), path)
    model = find_model(config.registry_dir, models_dir, spec)
    if storage.published_problem(model.path.parent) is not None:
        raise PipelineError(f"{model.path}: model {model.digest[:16]}: its files differ from those published; "
                            "retrain it (`mnist-pipeline run --rerun train`) or name another model")
    return model


@flow(name="mnist-predict")
def mnist_predict(
    inputs: list[str],
    model: str = "champion",
    output: str | None = None,
    invert: predict.Invert = "auto",
    class_names: list[str] | None = None,
    config: PipelineConfig | None = None,
) -> dict[str, Any]:
    """Score image files, folders, IDX or parquet files with a model; write one row per image.

    `model`: `champion` (the registry's), a digest or unique prefix, or a path to a model.keras. `output`: a parquet
    (or .csv) file to write besides the predictions artifact. `invert`: auto detects dark-on-light image files.
    """
    config = config or PipelineConfig()
    config.check_services(log=get_run_logger().warning)
    if output is not None and not Path(output).expanduser().parent.is_dir():
        raise PipelineError(f"{output}: output folder {Path(output).expanduser().parent} does not exist: "
                            "expected an existing folder")
    chosen = resolve_model(model, config)
    files = predict.list_inputs(inputs)
    names = class_names or chosen.class_names
    logger = get_run_logger()
    logger.info("scoring %d input files with model %s (%s)", len(files), chosen.digest[:16], chosen.path)

    stages: dict[str, str] = {}
    fingerprint = [sha256_file(path) for path in files]
    decoded, computed = run_stage(predict.load_inputs, {"files": files, "fingerprint": fingerprint, "invert": invert,
                                                        "artifacts_dir": config.artifacts_dir}, config)
    stages["load_inputs"] = "completed" if computed else "cached"
    scores, computed = run_stage(predict.predict_classes, {
        "inputs": decoded, "model": predict.model_ref(chosen.path, chosen.digest), "artifacts_dir": config.artifacts_dir},
        config)
    stages["predict_classes"] = "completed" if computed else "cached"
    table, computed = run_stage(predict.write_predictions, {
        "files": files, "inputs": decoded, "scores": scores, "model_digest": chosen.digest,
        "class_names": list(names) if names else None, "artifacts_dir": config.artifacts_dir}, config)
    stages["write_predictions"] = "completed" if computed else "cached"

    frame = predict.read_table(table.path(predict.PREDICTIONS_FILE))
    if output is not None:
        predict.write_table(frame, Path(output).expanduser().absolute())
    _publish_ui_artifacts(frame, decoded)
    return {
        "run_id": str(flow_run.get_id()),
        "output": str(Path(output).expanduser().absolute()) if output else str(table.path(predict.PREDICTIONS_FILE)),
        "predictions": str(table.path(predict.PREDICTIONS_FILE)),
        "images": len(frame),
        "model": chosen.digest,
        "counts": table.meta["counts"],
        "stages": stages,
    }


def _publish_ui_artifacts(frame: Any, decoded: Any) -> None:
    """Publish the first predictions as a table and the first input images, titled, as a markdown strip."""
    from tasks.report.figures import predictions_figure, to_png
    from tasks.report.render import data_uri

    head = frame.head(TABLE_ROWS).astype(object).where(frame.head(TABLE_ROWS).notna(), None)
    rows = [{key: (round(value, 4) if isinstance(value, float) else value) for key, value in row.items()}
            for row in head.to_dict(orient="records")]
    create_table_artifact(rows, key=TABLE_KEY, description=f"First {len(rows)} of {len(frame)} predictions")
    images = predict.strip_images(decoded)
    label = frame["name"] if "name" in frame else frame["predicted"]
    captions = [f"{predict_name}\n{p:.2f}" for predict_name, p in zip(label.astype(str), frame["probability"])]
    png = to_png(predictions_figure(images, captions[: len(images)]))
    create_markdown_artifact(f"## Predictions\n\n![First inputs with their predictions]({data_uri(png)})\n",
                             key=STRIP_KEY, description="First inputs titled with their predicted class")

"""Every stage's Prefect task (flows/runner.py) called on its own, outside a flow, chained by artifact references."""

import json

import pytest

from flows.runner import download_mnist, evaluate_model, preprocess_mnist, report_results, train_model, validate_mnist
from tasks.artifacts import ArtifactRef
from tasks.preprocess import load_split


@pytest.fixture(autouse=True)
def _server(prefect_api_url):
    return prefect_api_url


def test_tasks_chain_outside_a_flow(synthetic_config):
    c = synthetic_config
    # Each task takes its stage function's arguments, then the root it publishes under (by keyword).
    raw = download_mnist(c.download, data_dir=c.data_dir)
    checked = validate_mnist(raw, c.validation, c.dataset.num_classes, artifacts_dir=c.artifacts_dir)
    processed = preprocess_mnist(raw, checked, data_dir=c.data_dir)
    model = train_model(processed, c.train, c.dataset.num_classes, artifacts_dir=c.artifacts_dir)
    evaluation = evaluate_model(model, processed, artifacts_dir=c.artifacts_dir)
    report = report_results(checked, processed, model, evaluation, None, c.dataset, artifacts_dir=c.artifacts_dir)

    for ref in (raw, checked, processed, model, evaluation, report):
        assert isinstance(ref, ArtifactRef) and ref.problem() is None
    pixels, labels = load_split(processed.path("test.parquet"))
    metrics = json.loads(evaluation.path("metrics.json").read_text())
    assert metrics["num_test"] == len(labels) == len(pixels) == 50
    assert metrics["first_20_labels"] == labels[:20].tolist()
    assert report.path("report.html").read_text().count("data:image/png;base64,") >= 4

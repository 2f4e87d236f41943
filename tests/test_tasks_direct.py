"""Every stage's Prefect task called on its own, outside a flow, chained by artifact references."""

import json

import pytest

from tasks.core import ArtifactRef
from tasks.download import download_mnist
from tasks.evaluate import evaluate_model
from tasks.preprocess import load_split, preprocess_mnist
from tasks.report import report_results
from tasks.train import train_model
from tasks.validate import validate_mnist


@pytest.fixture(autouse=True)
def _server(prefect_api_url):
    return prefect_api_url


def test_tasks_chain_outside_a_flow(synthetic_config):
    c = synthetic_config
    raw = download_mnist(c.download, c.data_dir)
    checked = validate_mnist(raw, c.validation, c.dataset.num_classes, c.artifacts_dir)
    processed = preprocess_mnist(raw, checked, c.data_dir)
    model = train_model(processed, c.train, c.dataset.num_classes, c.artifacts_dir)
    evaluation = evaluate_model(model, processed, c.artifacts_dir)
    report = report_results(checked, processed, model, evaluation, c.artifacts_dir, None, c.dataset)

    for ref in (raw, checked, processed, model, evaluation, report):
        assert isinstance(ref, ArtifactRef) and ref.problem() is None
    pixels, labels = load_split(processed.path("test.parquet"))
    metrics = json.loads(evaluation.path("metrics.json").read_text())
    assert metrics["num_test"] == len(labels) == len(pixels) == 50
    assert metrics["first_20_labels"] == labels[:20].tolist()
    assert report.path("report.html").read_text().count("data:image/png;base64,") >= 4

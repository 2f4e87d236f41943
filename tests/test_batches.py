"""Labelled batches beside the base dataset: found once complete, checked, accepted or quarantined with reasons, taken
by flag; each checked once by its content; added safely by `add-batch`."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from flows.pipeline import mnist_pipeline
from flows.status import STALE, UP_TO_DATE, pipeline_status
from helpers import run_cli
from synthetic import NAMES as IDX_NAMES
from synthetic import idx_bytes, make_split
from tasks.batches import add_batch
from tasks.dataset import landed
from tasks.errors import PipelineError
from tasks.idx import idx_array, read_payload
from tasks.layout import SUCCESS_MARKER
from tasks.sources import write_class_folders, write_npz


@pytest.fixture(autouse=True)
def _server(prefect_api_url):
    return prefect_api_url


def land(root, name, write):
    """Write a batch with `write(folder)`, then its marker, as add-batch does."""
    (root / name).mkdir(parents=True, exist_ok=True)
    write(root / name)
    (root / name / SUCCESS_MARKER).write_text("")


def with_batches(config, root, **batches):
    return config.model_copy(update={"batches": config.batches.model_copy(update={"root": str(root), **batches})})


def test_only_complete_batches_are_seen_in_name_order(tmp_path):
    for name in ("2026-12-14", "2026-12-07", ".hidden", "_tmp"):
        (tmp_path / name).mkdir()
    for name in ("2026-12-14", "2026-12-07"):
        (tmp_path / name / SUCCESS_MARKER).write_text("")
    (tmp_path / "2026-12-21").mkdir()  # still being copied

    assert landed(tmp_path) == (["2026-12-07", "2026-12-14"], ["2026-12-21"])


def test_batches_are_checked_quarantined_with_reasons_and_taken_by_flag(synthetic_config, tmp_path):
    root = tmp_path / "batches"
    base_test = idx_array(read_payload(Path(synthetic_config.download.source) / "t10k-images-idx3-ubyte.gz"))
    land(root, "1-good", lambda f: write_class_folders(f, {"": make_split(100, 7)}))
    images, labels = make_split(100, 8)
    land(root, "2-shifted", lambda f: write_class_folders(f, {"": (images[labels < 2], labels[labels < 2])}))
    leaky = make_split(60, 9)
    land(root, "3-leaky", lambda f: write_class_folders(f, {"": (np.concatenate([leaky[0], base_test[:5]]),
                                                                 np.concatenate([leaky[1], [0] * 5]))}))
    land(root, "4-letters", lambda f: write_class_folders(f, {"": make_split(40, 10, 2)}, ["a", "b"]))
    write_class_folders(root / "5-half-copied", {"": make_split(20, 11)})
    config = with_batches(synthetic_config, root)

    summary = mnist_pipeline(config=config, until="preprocess")

    verdicts = {name: batch["verdict"] for name, batch in summary["batches"].items()}
    assert verdicts == {"1-good": "accepted", "2-shifted": "quarantined", "3-leaky": "quarantined",
                        "4-letters": "quarantined"}
    reasons = {name: batch["reasons"] for name, batch in summary["batches"].items()}
    assert reasons["1-good"] == [] and reasons["2-shifted"][0].startswith("drift of the label distribution: 0.8")
    assert reasons["3-leaky"] == ["5 images identical to holdout images"]
    assert reasons["4-letters"] == ["classes outside the dataset's: a, b"]
    quarantine = config.artifacts_dir / "quarantine"
    assert sorted(p.name for p in quarantine.iterdir()) == ["2-shifted.json", "3-leaky.json", "4-letters.json"]
    assert json.loads((quarantine / "2-shifted.json").read_text())["drift"]["label_tvd"] > 0.3
    processed = Path(summary["stages"]["preprocess"]["artifacts"][0]).parent
    assert summary["data_version"]["base"][:16] == processed.name  # folders are named by their digest
    assert summary["data_version"]["batches"] == [summary["batches"]["1-good"]["digest"]]
    recorded = {p.name: p.stat().st_mtime_ns for p in quarantine.iterdir()}
    mnist_pipeline(config=config, until="preprocess")
    assert {p.name: p.stat().st_mtime_ns for p in quarantine.iterdir()} == recorded  # a no-op run rewrites nothing

    accepted = mnist_pipeline(config=with_batches(synthetic_config, root, accept=["2-shifted", "4-letters"]),
                              until="preprocess")

    assert accepted["batches"]["2-shifted"]["verdict"] == "accepted"
    assert accepted["batches"]["4-letters"]["verdict"] == "quarantined"  # its labels have no place in the dataset
    assert accepted["batches"]["2-shifted"]["reasons"] == reasons["2-shifted"]  # recorded with the batch
    assert not (quarantine / "2-shifted.json").exists()
    assert len(accepted["data_version"]["batches"]) == 2


def test_copies_pixel_drift_and_an_unreadable_batch_are_quarantined_with_their_reasons(synthetic_config, tmp_path):
    root = tmp_path / "batches"
    base_train = make_split(200, 0)  # the training split of the synthetic source (tests/synthetic.payloads)
    fresh = make_split(40, 70)
    land(root, "1-copies", lambda f: write_class_folders(f, {"": (np.concatenate([base_train[0][:20], fresh[0]]),
                                                                  np.concatenate([base_train[1][:20], fresh[1]]))}))
    good = make_split(60, 71)
    land(root, "2-good", lambda f: write_npz(f / "week.npz", {"train": good, "test": make_split(10, 72)}))
    land(root, "3-again", lambda f: write_class_folders(f, {"": good}))  # the accepted batch 2-good once more
    images, labels = make_split(60, 73)
    land(root, "4-dim", lambda f: write_npz(f / "week.npz", {"train": (images // 3, labels), "test": make_split(0, 74)}))

    def unreadable(folder):
        write_class_folders(folder, {"": make_split(20, 75)})
        (folder / "3" / "notes.png").write_text("not an image")

    land(root, "5-unreadable", unreadable)

    summary = mnist_pipeline(config=with_batches(synthetic_config, root), until="preprocess")

    reasons = {name: batch["reasons"] for name, batch in summary["batches"].items()}
    assert reasons["1-copies"] == ["20 of 60 images are copies of training images or earlier batches (more than 10%)"]
    assert reasons["2-good"] == [] and reasons["3-again"] == [
        "60 of 60 images are copies of training images or earlier batches (more than 10%)"]
    assert [r.split(":")[0] for r in reasons["4-dim"]] == ["drift of the mean intensity", "drift of the ink fraction"]
    (why,) = reasons["5-unreadable"]
    assert why.startswith("unreadable: ") and "notes.png" in why
    assert [name for name, b in summary["batches"].items() if b["verdict"] == "accepted"] == ["2-good"]
    quarantine = synthetic_config.artifacts_dir / "quarantine"
    assert sorted(p.name for p in quarantine.iterdir()) == ["1-copies.json", "3-again.json", "4-dim.json",
                                                            "5-unreadable.json"]
    assert json.loads((quarantine / "4-dim.json").read_text())["drift"]["mean_shift"] > 0.3


def test_each_batch_is_checked_once_and_a_changed_batch_is_a_new_version(synthetic_config, tmp_path):
    root = tmp_path / "batches"
    land(root, "a", lambda f: write_class_folders(f, {"": make_split(80, 3)}))
    config = with_batches(synthetic_config, root)
    first = mnist_pipeline(config=config, until="preprocess")
    land(root, "b", lambda f: write_npz(f / "data.npz", {"train": make_split(60, 4), "test": make_split(20, 5)}))

    second = mnist_pipeline(config=config, until="preprocess")

    assert first["batches"]["a"]["state"] == "completed" and second["batches"]["a"]["state"] == "cached"
    assert second["batches"]["b"] == {**second["batches"]["b"], "state": "completed", "verdict": "accepted",
                                      "images": 80}
    # Changed in place after it was taken: checked again, under a new digest; then deleted: gone from the version.
    extra = root / "a" / "0" / "extra.png"
    shutil.copy(next((root / "a" / "1").iterdir()), extra)
    third = mnist_pipeline(config=config, until="preprocess")
    assert third["batches"]["a"]["state"] == "completed"
    assert third["batches"]["a"]["digest"] != first["batches"]["a"]["digest"]
    shutil.rmtree(root / "a")
    fourth = mnist_pipeline(config=config, until="preprocess")
    assert list(fourth["batches"]) == ["b"] and fourth["data_version"]["batches"] == [second["batches"]["b"]["digest"]]


def test_a_batch_changed_in_place_after_training_is_a_new_version_and_the_model_retrains(synthetic_config, tmp_path):
    from helpers import artifact
    from PIL import Image

    from tasks.idx import pixel_digests

    root = tmp_path / "batches"
    land(root, "a", lambda f: write_class_folders(f, {"": make_split(100, 40)}))
    land(root, "b", lambda f: write_class_folders(f, {"": make_split(100, 41)}))
    config = with_batches(synthetic_config, root)
    first = mnist_pipeline(config=config, until="evaluate")
    # One image of the taken batch "b" replaced in place by another of its class (same file name, marker kept).
    images, labels = make_split(20, 42)
    new = images[labels == 3][:1]
    write_class_folders(tmp_path / "new", {"": (new, [3])})
    replaced = min((root / "b" / "3").iterdir())
    old = pixel_digests(np.asarray(Image.open(replaced))[None])[0]
    shutil.copyfile(tmp_path / "new" / "3" / "000000.png", replaced)

    second = mnist_pipeline(config=config, until="evaluate")

    assert first["batches"]["b"]["state"] == "completed" and second["batches"]["b"]["state"] == "completed"
    assert second["batches"]["b"]["digest"] != first["batches"]["b"]["digest"]
    # The batch before it is unchanged: not checked again, the same version.
    assert second["batches"]["a"] == {**first["batches"]["a"], "state": "cached"}
    assert second["data_version"] == {"base": first["data_version"]["base"], "batches": [
        first["batches"]["a"]["digest"], second["batches"]["b"]["digest"]]} != first["data_version"]
    assert {s: second["stages"][s]["state"] for s in ("preprocess", "train", "evaluate")} == {
        "preprocess": "cached", "train": "completed", "evaluate": "completed"}
    trained = json.loads(artifact(second, "train", "config.json").read_text())
    assert trained["data_version"] == second["data_version"]
    assert artifact(second, "train", "model.keras") != artifact(first, "train", "model.keras")
    # What was read is the new file: its image is in the new version, the one it replaced is gone.
    checked = next((config.data_dir / "batches").glob(f"{second['batches']['b']['digest'][:16]}/digests.bin"))
    digests = {checked.read_bytes()[i : i + 16] for i in range(0, checked.stat().st_size, 16)}
    assert pixel_digests(new)[0] in digests and old not in digests and len(digests) == 100
    # The new version is checked once: the next run has nothing to do.
    third = mnist_pipeline(config=config, until="evaluate")
    assert {b["state"] for b in third["batches"].values()} == {"cached"}
    assert {s["state"] for s in third["stages"].values()} == {"cached"}


def test_two_runs_started_at_once_when_a_batch_lands_check_it_and_train_once(tmp_path, prefect_api_url):
    import os
    import subprocess
    import sys

    from helpers import REPO, artifact, synthetic_run
    from synthetic import write_source
    from tasks.registry import read_champion, read_history

    digests = write_source(tmp_path / "source")
    env, args = synthetic_run(tmp_path / "source", digests, tmp_path / "data", tmp_path / "artifacts")
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url, **env}
    root = tmp_path / "batches"
    args = [*args, "--batches", str(root)]
    write_class_folders(tmp_path / "week-50", {"": make_split(100, 60)})
    add_batch(tmp_path / "week-50", root, "2026-12-07")
    first = run_cli(env, args)
    assert first.returncode == 0, first.stderr
    write_class_folders(tmp_path / "week-51", {"": make_split(100, 61)})
    add_batch(tmp_path / "week-51", root, "2026-12-14")

    runs = [subprocess.Popen([sys.executable, "-m", "flows.cli", *args], env=env, cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=600) for run in runs]

    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    summaries = [json.loads(out) for out, _ in outputs]
    # The new batch is checked by one run; the other waits for it and takes its result. The earlier one stays cached.
    assert sorted(s["batches"]["2026-12-14"]["state"] for s in summaries) == ["cached", "completed"]
    assert [s["batches"]["2026-12-07"]["state"] for s in summaries] == ["cached", "cached"]
    assert summaries[0]["batches"] == {**summaries[1]["batches"], "2026-12-14": {
        **summaries[1]["batches"]["2026-12-14"], "state": summaries[0]["batches"]["2026-12-14"]["state"]}}
    assert summaries[0]["data_version"] == summaries[1]["data_version"] and len(summaries[0]["data_version"]["batches"]) == 2
    for stage in ("train", "evaluate", "report"):
        assert sorted(s["stages"][stage]["state"] for s in summaries) == ["cached", "completed"], stage
        assert summaries[0]["stages"][stage]["artifacts"] == summaries[1]["stages"][stage]["artifacts"]
    assert len(list((tmp_path / "data" / "batches").iterdir())) == 2  # one checked folder per batch
    assert len(list((tmp_path / "artifacts" / "models").iterdir())) == 2  # the first run's model and one more
    # One decision on the new model, the same for both runs; the champion is what that decision says.
    model = artifact(summaries[0], "train", "model.keras").parent.name
    history = read_history(tmp_path / "artifacts" / "registry")
    assert [d.model_digest[:16] for d in history].count(model) == 1
    (decision,) = [d for d in history if d.model_digest.startswith(model)]
    assert summaries[0]["promotion"] == summaries[1]["promotion"] == {
        "promoted": decision.promoted, "reason": decision.reason, "dataset": decision.dataset}
    champion = read_champion(tmp_path / "artifacts" / "registry", decision.dataset)
    assert (champion is not None and champion.model_digest == decision.model_digest) == decision.promoted


def test_a_batch_of_idx_files_or_a_manifest_is_read_too(synthetic_config, tmp_path):
    root = tmp_path / "batches"

    def idx(folder):
        for split, n, seed in (("train", 50, 20), ("test", 10, 21)):
            images, labels = make_split(n, seed)
            (folder / IDX_NAMES[split][0]).write_bytes(idx_bytes(images))
            (folder / IDX_NAMES[split][1]).write_bytes(idx_bytes(labels))

    def manifest(folder):
        write_class_folders(folder, {"": make_split(40, 22)})
        rows = [f"{p.relative_to(folder)},{p.parent.name}" for p in sorted(folder.rglob("*.png"))]
        (folder / "labels.csv").write_text("file_name,label\n" + "\n".join(rows) + "\n")

    land(root, "idx", idx)
    land(root, "manifest", manifest)

    summary = mnist_pipeline(config=with_batches(synthetic_config, root), until="preprocess")

    assert {name: (b["verdict"], b["images"]) for name, b in summary["batches"].items()} == {
        "idx": ("accepted", 60), "manifest": ("accepted", 40)}


def test_add_batch_copies_files_then_the_marker_and_refuses_a_bad_batch_leaving_nothing(tmp_path):
    write_class_folders(tmp_path / "week", {"": make_split(30, 1)})
    root = tmp_path / "batches"

    assert add_batch(tmp_path / "week", root, "2026-12-07") == 30

    assert (root / "2026-12-07" / SUCCESS_MARKER).is_file()
    assert len(list((root / "2026-12-07").rglob("*.png"))) == 30
    with pytest.raises(PipelineError, match="found a batch of that name already"):
        add_batch(tmp_path / "week", root, "2026-12-07")
    (tmp_path / "bad" / "3").mkdir(parents=True)
    (tmp_path / "bad" / "3" / "x.png").write_bytes(b"not a png")
    with pytest.raises(PipelineError, match=r"x.png: format: expected an image file"):
        add_batch(tmp_path / "bad", root, "2026-12-14")
    write_class_folders(tmp_path / "linked", {"": make_split(30, 2)})
    (tmp_path / "linked" / "3" / "outside.png").symlink_to(next((tmp_path / "week" / "3").iterdir()))
    with pytest.raises(PipelineError, match=r"outside.png: location: expected a file inside the batch folder"):
        add_batch(tmp_path / "linked", root, "2026-12-21")
    assert sorted(p.name for p in root.iterdir()) == ["2026-12-07"]


# Runs `mnist-pipeline add-batch`, SIGKILLed as it is about to copy its 11th file: a crash in the middle of the copy.
ADD_THEN_DIE = """
import os, signal, sys
from tasks import storage
real, copied = storage.copy_file, []
def copy_file(path, location):
    if len(copied) == 10:
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, location)
    copied.append(location)
storage.copy_file = copy_file
from flows.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_add_batch_killed_mid_copy_leaves_a_batch_that_runs_skip_until_it_is_added_again(synthetic_config, tmp_path,
                                                                                         caplog):
    import logging
    import os
    import signal

    write_class_folders(tmp_path / "week", {"": make_split(30, 12)})
    root = tmp_path / "batches"
    env = {**os.environ, "MNIST_PIPELINE_BATCHES__ROOT": str(root)}
    env.pop("PREFECT_API_URL", None)
    add = ["add-batch", str(tmp_path / "week"), "--name", "2026-12-07"]

    killed = run_cli(env, add, code=ADD_THEN_DIE)

    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = root / "2026-12-07"
    assert len(list(left.rglob("*.png"))) == 10 and not (left / SUCCESS_MARKER).exists()
    config = with_batches(synthetic_config, root)
    with caplog.at_level(logging.WARNING, logger="prefect"):
        skipped = mnist_pipeline(config=config, until="preprocess")
    assert skipped["batches"] == {} and skipped["data_version"]["batches"] == []
    assert f"batch 2026-12-07 has no {SUCCESS_MARKER} marker (still being copied, or abandoned): skipped" in caplog.text
    (row,) = [row for row in pipeline_status(config, until="preprocess") if row.stage == "batches"]
    assert row.state == UP_TO_DATE and f"1 without their {SUCCESS_MARKER} marker" in row.why[0]
    # Adding it again under that name says what is in the way; once that is removed, it lands whole and is taken.
    again = run_cli(env, add)
    assert again.returncode == 1 and f"without its {SUCCESS_MARKER} marker" in again.stderr and "remove it" in again.stderr
    shutil.rmtree(left)
    assert run_cli(env, add).returncode == 0
    taken = mnist_pipeline(config=config, until="preprocess")
    assert taken["batches"]["2026-12-07"] == {**taken["batches"]["2026-12-07"], "verdict": "accepted", "images": 30}


def test_add_batch_command_names_the_batch_by_date_and_says_what_it_added(tmp_path):
    import os

    write_class_folders(tmp_path / "week", {"": make_split(12, 2)})
    env = {**os.environ, "MNIST_PIPELINE_BATCHES__ROOT": str(tmp_path / "batches")}
    env.pop("PREFECT_API_URL", None)

    out = run_cli(env, ["add-batch", str(tmp_path / "week")])

    assert out.returncode == 0, out.stderr
    (name,) = [p.name for p in (tmp_path / "batches").iterdir()]
    assert out.stdout.strip() == f"added batch {name} (12 images) to {tmp_path / 'batches'}"
    bad = run_cli(env, ["add-batch", str(tmp_path / "nowhere")])
    assert bad.returncode == 1 and bad.stderr.strip().startswith("mnist-pipeline: error: ") and "\n" not in bad.stderr.strip()


def test_a_batches_root_on_s3(synthetic_config, tmp_path, s3_bucket):
    write_class_folders(tmp_path / "week", {"": make_split(50, 6)})
    root = f"{s3_bucket}/batches"
    add_batch(tmp_path / "week", root, "2026-12-07")
    write_class_folders(tmp_path / "partial", {"": make_split(10, 7)})
    from tasks.storage import copy_file

    copy_file(next((tmp_path / "partial" / "3").iterdir()), f"{root}/2026-12-14/3/x.png")  # no marker yet

    assert landed(root) == (["2026-12-07"], ["2026-12-14"])
    # The roots on object storage too: the batch's files are staged for training and evaluation like any artifact.
    from tasks.storage import as_root

    config = with_batches(synthetic_config, root).model_copy(update={
        "data_dir": as_root(f"{s3_bucket}/data"), "artifacts_dir": as_root(f"{s3_bucket}/artifacts")})
    summary = mnist_pipeline(config=config)
    assert summary["batches"]["2026-12-07"] == {**summary["batches"]["2026-12-07"], "verdict": "accepted", "images": 50}
    assert summary["report"].startswith(s3_bucket) and summary["stages"]["train"]["state"] == "completed"
    assert len(mnist_pipeline(config=config)["data_version"]["batches"]) == 1


def test_accepted_batches_are_trained_on_and_scored_on_their_holdout_share(synthetic_config, tmp_path):
    from helpers import artifact, states

    root = tmp_path / "batches"
    config = with_batches(synthetic_config, root)
    land(root, "2026-12-07", lambda f: write_class_folders(f, {"": make_split(120, 30)}))
    first = mnist_pipeline(config=config, until="evaluate")
    again = mnist_pipeline(config=config, until="evaluate")  # nothing new: nothing runs
    land(root, "2026-12-14", lambda f: write_class_folders(f, {"": make_split(120, 31)}))
    stale = {row.stage: row for row in pipeline_status(config, until="evaluate")}
    assert stale["batches"].state == STALE and stale["batches"].why == ["batch 2026-12-14 not checked yet (a run checks it)"]
    assert stale["train"].state == STALE and stale["train"].why == ["after batches, which is stale"]

    second = mnist_pipeline(config=config, until="evaluate")

    assert states(again) == dict.fromkeys(states(first), "cached")
    assert {row.state for row in pipeline_status(config, until="evaluate")} == {UP_TO_DATE}
    assert {s: second["stages"][s]["state"] for s in ("preprocess", "train", "evaluate")} == {
        "preprocess": "cached", "train": "completed", "evaluate": "completed"}
    assert second["batches"]["2026-12-07"]["state"] == "cached"
    assert [row.state for row in pipeline_status(config, until="evaluate")] == [UP_TO_DATE] * 6
    trained = json.loads(artifact(second, "train", "config.json").read_text())
    assert trained["data_version"] == second["data_version"] and len(trained["data_version"]["batches"]) == 2
    batch_rows = sum(json.loads(next((config.data_dir / "batches").glob(f"{b['digest'][:16]}/batch.json"))
                                .read_text())["train"] for b in second["batches"].values())
    assert trained["train_rows"] == 200 + batch_rows
    metrics = json.loads(artifact(second, "evaluate", "metrics.json").read_text())
    slices = metrics["holdout_slices"]
    assert [s["name"] for s in slices] == ["base", "2026-12-07", "2026-12-14"] and slices[0]["images"] == 50
    assert metrics["num_test"] == sum(s["images"] for s in slices) and all(0 <= s["accuracy"] <= 1 for s in slices)
    assert metrics["data_version"] == second["data_version"]
    third = mnist_pipeline(config=config)  # and the report
    report = artifact(third, "report", "report.md").read_text()
    assert "## Data version" in report and f"`{trained['data_version']['batches'][1][:16]}`." in report
    assert f"| 2026-12-14 | {slices[2]['images']} | {100 * slices[2]['accuracy']:.2f}% |" in report
    from flows.gc import plan

    unused = plan(config).folders  # the checked batches are the configuration's: gc keeps them
    assert not [folder for folder in unused if "/batches/" in folder] and plan(config).records == []


def test_add_batch_emits_the_batch_landed_event_to_the_prefect_server(tmp_path, prefect_api_url):
    import os
    import time
    import urllib.request

    write_class_folders(tmp_path / "week", {"": make_split(12, 3)})
    env = {**os.environ, "PREFECT_API_URL": prefect_api_url}

    out = run_cli(env, ["add-batch", str(tmp_path / "week"), "--batches", str(tmp_path / "batches"), "--name", "wk50"])

    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "emitted mnist-pipeline.batch.landed for batch wk50"
    query = json.dumps({"filter": {"event": {"name": ["mnist-pipeline.batch.landed"]}}, "limit": 50}).encode()
    deadline = time.monotonic() + 30
    while True:
        request = urllib.request.Request(f"{prefect_api_url}/events/filter", data=query,
                                         headers={"Content-Type": "application/json"})
        events = json.load(urllib.request.urlopen(request, timeout=10))["events"]
        found = [e for e in events if e["resource"]["prefect.resource.id"] == "mnist-pipeline.batch.wk50"]
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert found and found[0]["resource"]["mnist-pipeline.batches-root"] == str(tmp_path / "batches")
    assert found[0]["resource"]["mnist-pipeline.images"] == "12"

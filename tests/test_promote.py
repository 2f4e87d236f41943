"""Model promotion on fabricated model and evaluation artifacts: the rules, the registry files, idempotency, locking."""

import json
import subprocess
import sys
import threading
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from tasks import promote
from tasks.artifacts import ArtifactRef, publish
from tasks.errors import PipelineError
from tasks.files import new_workdir, write_json
from tasks.promote import decide_promotion, judge
from tasks.dataset import DatasetConfig
from tasks.registry import PromotionConfig, champion_path, champion_record, read_champion, read_history

REPO = Path(__file__).resolve().parents[1]
RULES = PromotionConfig()  # gate 0.97, tolerance 0.002
DATASET = DatasetConfig().key()  # MNIST's digits


def candidate(root: Path, tag: str, accuracy: float, loss: float = 0.08,
              version: dict | None = None) -> tuple[ArtifactRef, ArtifactRef]:
    """Publish a model and its evaluation (on data version `version`) as the train and evaluate stages would (the
    model file is a stand-in)."""
    work = new_workdir(root / "models")
    (work / "model.keras").write_bytes(f"weights of {tag}".encode())
    write_json(work / "history.json", {"loss": [0.2, loss], "accuracy": [0.95, 0.99]})
    write_json(work / "config.json", {"tag": tag})
    model = publish("train", work)
    work = new_workdir(root / "evaluation")
    write_json(work / "metrics.json", {"schema_version": 1, "test_accuracy": accuracy, "test_loss": loss,
                                       "model_digest": model.digest, "data_version": version})
    evaluation = publish("evaluate", work, meta={"test_accuracy": accuracy, "test_loss": loss})
    return model, evaluation


@pytest.fixture
def registry(tmp_path):
    return tmp_path / "artifacts" / "registry"


def decide(registry, model_and_evaluation, config=RULES, run_id="run-1"):
    return decide_promotion(*model_and_evaluation, registry, config, DATASET, run_id=run_id)


def test_first_model_passing_the_gate_becomes_champion(tmp_path, registry):
    model, evaluation = candidate(tmp_path, "a", 0.9782, 0.0704)
    lines = []
    decision = decide_promotion(model, evaluation, registry, RULES, DATASET, run_id="run-1", log=lines.append)

    assert decision.promoted is True
    assert decision.reason == "first model: no champion yet and test accuracy 0.9782 passes the gate 0.9700"
    assert decision.champion_before is None
    assert decision.model_digest == model.digest and decision.model_path == str(model.path("model.keras"))
    numbers = ("test_accuracy", "test_loss", "gate", "tolerance")
    assert [getattr(decision, key) for key in numbers] == [0.9782, 0.0704, 0.97, 0.002]
    assert decision.schema_version == 1 and decision.run_id == "run-1"
    decided = datetime.fromisoformat(decision.decided_at)
    assert decided.utcoffset() == timedelta(0)
    assert promote.Decision.model_validate_json(decision.model_dump_json()) == decision

    champion = json.loads(champion_path(registry, DATASET).read_text())
    assert promote.Champion.model_validate(champion) == read_champion(registry, DATASET)
    assert {k: champion[k] for k in ("model_digest", "model_path", "test_accuracy", "test_loss", "run_id")} == {
        "model_digest": model.digest, "model_path": str(model.path("model.keras")), "test_accuracy": 0.9782,
        "test_loss": 0.0704, "run_id": "run-1"}
    assert champion["promoted_at"] == decision.decided_at
    assert (registry / "history.jsonl").read_text().count("\n") == 1
    assert read_history(registry) == [decision]
    assert lines and "promoted" in lines[0] and model.digest[:16] in lines[0]


def test_better_and_slightly_worse_models_are_promoted_a_clearly_worse_one_is_not(tmp_path, registry):
    scores = (("a", 0.9782), ("b", 0.98), ("c", 0.9701), ("d", 0.9785))
    a, b, c, d = (candidate(tmp_path, tag, acc) for tag, acc in scores)
    decisions = [decide(registry, m) for m in (a, b)]
    assert decisions[1].promoted is True
    assert decisions[1].reason == "test accuracy 0.9800 beats the champion's 0.9782 by 0.0018"
    assert decisions[1].champion_before.model_dump() == {"model_digest": a[0].digest, "test_accuracy": 0.9782, "test_loss": 0.08}

    worse = decide(registry, c)
    assert worse.promoted is False
    assert worse.reason == "test accuracy 0.9701 is 0.0099 below the champion's 0.9800, more than the tolerance 0.0020"
    assert read_champion(registry, DATASET).model_digest == b[0].digest

    within = decide(registry, d)
    assert within.promoted is True
    assert within.reason == "test accuracy 0.9785 is 0.0015 below the champion's 0.9800, within the tolerance 0.0020"
    assert within.champion_before.model_digest == b[0].digest
    assert read_champion(registry, DATASET).model_digest == d[0].digest

    history = read_history(registry)
    assert history == [*decisions, worse, within]
    assert [h.promoted for h in history] == [True, True, False, True]


def test_model_below_the_gate_is_not_promoted_with_or_without_a_champion(tmp_path, registry):
    low = candidate(tmp_path, "low", 0.9612)
    first = decide(registry, low)
    assert first.promoted is False
    assert first.reason == "no champion yet, but test accuracy 0.9612 is below the gate 0.9700"
    assert read_champion(registry, DATASET) is None and not champion_path(registry, DATASET).exists()

    decide(registry, candidate(tmp_path, "good", 0.975))
    # Within the tolerance of this champion, but the gate comes first.
    lower = decide(registry, candidate(tmp_path, "lower", 0.9699), PromotionConfig(tolerance=0.01))
    assert lower.promoted is False and lower.reason == "test accuracy 0.9699 is below the gate 0.9700"
    history = read_history(registry)
    assert len(history) == 3 and history[0] == first and history[2] == lower


@pytest.mark.parametrize(
    ("accuracy", "champion", "promoted"),
    [
        (0.9699999690055847, None, True),  # 9700 / 10000 as Keras reports it (float32): exactly at the gate
        (0.9698999524116516, None, False),
        (0.978, 0.98, True),  # exactly the tolerance below
        (0.9779, 0.98, False),
        (0.98, 0.98, True),
    ],
)
def test_boundaries_are_inclusive(accuracy, champion, promoted):
    record = None if champion is None else promote.Scores(model_digest="c" * 64, test_accuracy=champion, test_loss=0.1)
    assert judge(accuracy, record, RULES)[0] is promoted


def test_same_model_again_returns_the_recorded_decision_and_writes_nothing(tmp_path, registry):
    good, bad = candidate(tmp_path, "good", 0.98), candidate(tmp_path, "bad", 0.95)
    first_good, first_bad = decide(registry, good, run_id="run-1"), decide(registry, bad, run_id="run-1")
    files = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in registry.rglob("*") if p.is_file()}

    assert decide(registry, good, run_id="run-2") == first_good
    assert decide(registry, bad, run_id="run-2") == first_bad
    same_rules = PromotionConfig(min_test_accuracy=0.97, tolerance=0.002)
    assert decide(registry, good, same_rules, run_id="run-3") == first_good
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in registry.rglob("*") if p.is_file()} == files
    assert len(read_history(registry)) == 2


def test_rejected_model_is_decided_again_when_the_champion_or_the_rules_change(tmp_path, registry):
    a, c, b = candidate(tmp_path, "a", 0.98), candidate(tmp_path, "c", 0.975), candidate(tmp_path, "b", 0.985)
    decide(registry, a)
    rejected = decide(registry, c)
    assert rejected.promoted is False

    decide(registry, b)
    again = decide(registry, c)
    assert again != rejected and again.promoted is False
    assert again.champion_before.model_digest == b[0].digest
    assert again.reason == "test accuracy 0.9750 is 0.0100 below the champion's 0.9850, more than the tolerance 0.0020"

    looser = decide(registry, c, PromotionConfig(tolerance=0.02))
    assert looser.promoted is True and looser.tolerance == 0.02
    assert read_champion(registry, DATASET).model_digest == c[0].digest
    assert len(read_history(registry)) == 5


def test_former_champion_is_decided_again_against_the_new_one(tmp_path, registry):
    a, b = candidate(tmp_path, "a", 0.98), candidate(tmp_path, "b", 0.981)
    first = decide(registry, a)
    decide(registry, b)
    back = decide(registry, a)
    assert back != first and back.promoted is True
    assert back.champion_before.model_digest == b[0].digest
    assert read_champion(registry, DATASET).model_digest == a[0].digest
    assert decide(registry, a) == back and len(read_history(registry)) == 3


def test_champion_without_a_recorded_decision_stays_champion(tmp_path, registry):
    a = candidate(tmp_path, "a", 0.98)
    decide(registry, a)
    champion = champion_path(registry, DATASET).read_bytes()
    (registry / "history.jsonl").unlink()
    decision = decide(registry, a)
    assert decision.promoted is True and decision.reason.startswith("already the champion")
    assert champion_path(registry, DATASET).read_bytes() == champion
    assert decide(registry, a) == decision


@pytest.mark.parametrize(
    "content", ['{"model_digest": "abc", "test_accuracy": 0.9', "[1, 2]", '{"model_digest": "abc"}', ""]
)
def test_corrupt_champion_record_is_an_error_naming_it(tmp_path, registry, content):
    champion_path(registry, DATASET).parent.mkdir(parents=True)
    champion_path(registry, DATASET).write_text(content)
    with pytest.raises(PipelineError, match="the champion record") as error:
        decide(registry, candidate(tmp_path, "a", 0.98))
    assert str(champion_path(registry, DATASET)) in str(error.value) and "\n" not in str(error.value)
    assert not (registry / "history.jsonl").exists()
    assert champion_path(registry, DATASET).read_text() == content


@pytest.mark.parametrize("damage", ["not json\n", '{"model_digest": "x"}\n', '{"model_digest": "x", "promoted": tr'])
def test_corrupt_history_line_is_an_error_naming_the_file_and_line(tmp_path, registry, damage):
    decide(registry, candidate(tmp_path, "a", 0.98))
    with open(registry / "history.jsonl", "a") as fh:
        fh.write(damage)
    before = (registry / "history.jsonl").read_bytes()
    with pytest.raises(PipelineError, match=rf"{registry / 'history.jsonl'}: line 2: "):
        decide(registry, candidate(tmp_path, "b", 0.99))
    assert (registry / "history.jsonl").read_bytes() == before


def test_evaluation_of_another_model_is_refused(tmp_path, registry):
    a, b = candidate(tmp_path, "a", 0.98), candidate(tmp_path, "b", 0.99)
    with pytest.raises(PipelineError, match="metrics.json: evaluates model"):
        decide_promotion(a[0], b[1], registry, RULES, DATASET)
    assert not registry.exists() or not (registry / "history.jsonl").exists()


def test_config_is_strict():
    with pytest.raises(ValidationError):
        PromotionConfig(min_test_accuracy=1.5)
    with pytest.raises(ValidationError):
        PromotionConfig(tolerance=-0.001)
    with pytest.raises(ValidationError):
        PromotionConfig(gate=0.9)


def assert_consistent(registry: Path, expected_lines: int) -> None:
    """Check that the history reads as if the decisions had been made one after another, and matches champion.json."""
    text = (registry / "history.jsonl").read_text()
    assert text.endswith("\n") and text.count("\n") == expected_lines
    champion = None
    for decision in read_history(registry):
        before = decision.champion_before
        assert (before and before.model_digest) == (champion and champion.model_digest)
        assert decision.promoted == judge(decision.test_accuracy, champion, RULES)[0]
        if decision.promoted:
            champion = decision
    assert read_champion(registry, DATASET).model_digest == champion.model_digest


def test_concurrent_threads_decide_one_after_another(tmp_path, registry, monkeypatch):
    scores = (0.975, 0.98, 0.99, 0.96, 0.985, 0.972, 0.995, 0.97)
    models = [candidate(tmp_path, f"m{i}", acc) for i, acc in enumerate(scores)]
    slow_read = promote.read_history

    def read_slowly(folder):
        # Widen the read-decide-write window so that an unlocked registry would interleave here.
        history = slow_read(folder)
        threading.Event().wait(0.02)
        return history

    monkeypatch.setattr(promote, "read_history", read_slowly)
    start, errors = threading.Barrier(len(models)), []

    def run(model):
        start.wait()
        try:
            decide(registry, model)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert_consistent(registry, len(models))
    assert read_champion(registry, DATASET).test_accuracy == 0.995


def test_concurrent_processes_decide_one_after_another(tmp_path, registry):
    models = [candidate(tmp_path, f"p{i}", acc) for i, acc in enumerate((0.975, 0.99, 0.98, 0.97))]
    go = tmp_path / "go"
    code = (
        "import sys, time; from pathlib import Path\n"
        "from tasks import promote; from tasks.artifacts import ArtifactRef\n"
        "from tasks.promote import PromotionConfig, decide_promotion\n"
        # As in the threads test: a slow read widens the window an unlocked registry would interleave in.
        "read = promote.read_history; promote.read_history = lambda folder: (read(folder), time.sleep(0.05))[0]\n"
        "model, evaluation = (ArtifactRef.model_validate_json(Path(p).read_text()) for p in sys.argv[1:3])\n"
        "while not Path(sys.argv[4]).exists(): time.sleep(0.005)\n"
        "decide_promotion(model, evaluation, Path(sys.argv[3]), PromotionConfig(), sys.argv[5], run_id='proc')\n"
    )
    procs = []
    for i, (model, evaluation) in enumerate(models):
        (tmp_path / f"model{i}.json").write_text(model.model_dump_json())
        (tmp_path / f"evaluation{i}.json").write_text(evaluation.model_dump_json())
        procs.append(subprocess.Popen([sys.executable, "-c", code, str(tmp_path / f"model{i}.json"),
                                       str(tmp_path / f"evaluation{i}.json"), str(registry), str(go), DATASET], cwd=REPO))
    go.touch()
    assert [p.wait(timeout=60) for p in procs] == [0] * len(models)
    assert_consistent(registry, len(models))
    assert read_champion(registry, DATASET).test_accuracy == 0.99


def test_importing_the_module_loads_no_tensorflow():
    modules = ("tensorflow", "keras")
    code = f"import sys, tasks.promote; print(sorted(m for m in {modules!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_with_redis_stage_locks_the_registry_is_locked_in_redis(tmp_path, registry, redis_url):
    from tasks.locks import RedisLockManager

    model_and_evaluation = candidate(tmp_path, "a", 0.98)
    elsewhere = RedisLockManager(redis_url, namespace=tmp_path.name)  # another machine's run, deciding right now
    done = threading.Event()
    decider = threading.Thread(target=lambda: (decide_promotion(
        *model_and_evaluation, registry, RULES, DATASET, locks=RedisLockManager(redis_url, namespace=tmp_path.name)), done.set()))
    with elsewhere.held("registry"):
        decider.start()
        assert not done.wait(1.0)  # waits for the registry's key in Redis (its lock file is free)
        assert read_history(registry) == []
    decider.join(timeout=30)
    assert done.is_set() and [d.model_digest for d in read_history(registry)] == [model_and_evaluation[0].digest]


V1 = {"base": "b" * 64, "batches": []}
V2 = {"base": "b" * 64, "batches": ["1" * 64]}


def test_a_champion_scored_on_other_data_is_scored_on_the_challengers_first(tmp_path, registry):
    champion = candidate(tmp_path, "a", 0.985, version=V1)
    decide(registry, champion)
    asked = []

    def rescore(record):  # the champion on V2's holdout: worse than on V1's, and worse than the challenger
        asked.append(record)
        return promote.Scores(model_digest=record.model_digest, test_accuracy=0.975, test_loss=0.09)

    challenger = candidate(tmp_path, "b", 0.98, version=V2)
    lines = []
    decision = decide_promotion(*challenger, registry, RULES, DATASET, log=lines.append, rescore=rescore)
    assert [r.model_digest for r in asked] == [champion[0].digest] and asked[0].data_version == V1
    # Against its 0.985 on V1 the challenger would lose by more than the tolerance; on the same images it wins.
    assert decision.promoted and decision.reason == "test accuracy 0.9800 beats the champion's 0.9750 by 0.0050"
    assert decision.champion_before.test_accuracy == 0.975 and decision.data_version == V2
    assert "scored on data version bbbbbbbb+1: test accuracy 0.9750 (was 0.9850 on bbbbbbbb)" in lines[0]
    assert read_champion(registry, DATASET).data_version == V2

    same_data = candidate(tmp_path, "c", 0.97, version=V2)  # the champion's own data: its recorded scores count
    assert not decide_promotion(*same_data, registry, RULES, DATASET, rescore=rescore).promoted and len(asked) == 1
    with pytest.raises(PipelineError, match="scored on other data"):
        decide(registry, candidate(tmp_path, "d", 0.99, version=V1))
    assert len(read_history(registry)) == 3


def test_each_dataset_has_its_own_champion(tmp_path, registry):
    letters = DatasetConfig(name="letters", num_classes=3, class_names=["a", "b", "c"]).key()
    assert letters.startswith("letters-") and letters != DATASET
    digits = decide(registry, candidate(tmp_path, "digits", 0.99))
    first = decide_promotion(*candidate(tmp_path, "letters", 0.975), registry, RULES, letters)
    # Far below the digits' champion, yet the first model of its dataset: it never competed with the digits'.
    assert first.promoted and first.reason.startswith("first model") and first.dataset == letters
    assert read_champion(registry, DATASET).model_digest == digits.model_digest
    assert read_champion(registry, letters).model_digest == first.model_digest
    assert sorted(p.name for p in champion_path(registry, DATASET).parent.iterdir()) == sorted(
        [f"{DATASET}.json", f"{letters}.json"])


def test_a_registry_from_before_datasets_keeps_its_champion_for_its_dataset(tmp_path, registry):
    model = candidate(tmp_path, "a", 0.98)
    decision = decide(registry, model)
    record = json.loads(champion_path(registry, DATASET).read_text())
    registry.joinpath("champion.json").write_text(json.dumps({k: v for k, v in record.items() if k != "dataset"}))
    champion_path(registry, DATASET).unlink()
    history = registry / "history.jsonl"
    history.write_text(json.dumps({k: v for k, v in json.loads(history.read_text()).items() if k != "dataset"}) + "\n")

    assert read_champion(registry, DATASET).model_digest == model[0].digest
    assert read_champion(registry, DatasetConfig(name="other").key()) is None
    assert read_history(registry)[0].dataset == DATASET
    assert decide(registry, model) == decision  # the recorded decision still holds


def test_on_object_storage_without_redis_a_decision_written_meanwhile_elsewhere_is_found_not_repeated(
        tmp_path, s3_bucket, monkeypatch):
    import os

    registry = f"{s3_bucket}/registry"
    model = candidate(tmp_path, "a", 0.98)
    (tmp_path / "model.json").write_text(model[0].model_dump_json())
    (tmp_path / "evaluation.json").write_text(model[1].model_dump_json())
    (tmp_path / "other").mkdir()
    other_machine = (  # its own temp folder: its own lock files, as on another machine
        "import sys; from pathlib import Path\n"
        "from tasks.artifacts import ArtifactRef\n"
        "from tasks.promote import PromotionConfig, decide_promotion\n"
        "model, evaluation = (ArtifactRef.model_validate_json(Path(p).read_text()) for p in sys.argv[1:3])\n"
        "decide_promotion(model, evaluation, sys.argv[3], PromotionConfig(), sys.argv[4], run_id='other')\n")
    read, lines = promote.read_history, []

    def read_while_another_machine_decides(folder):
        history = read(folder)
        if not lines:  # after this machine read the registry, before it writes its decision
            lines.append(subprocess.run([sys.executable, "-c", other_machine, str(tmp_path / "model.json"),
                                         str(tmp_path / "evaluation.json"), registry, DATASET], cwd=REPO, check=True,
                                        env={**os.environ, "TMPDIR": str(tmp_path / "other")}))
        return history

    monkeypatch.setattr(promote, "read_history", read_while_another_machine_decides)
    logged = []
    decision = decide_promotion(*model, registry, RULES, DATASET, run_id="this", log=logged.append)

    (only,) = read_history(registry)  # one decision, the other machine's: not written a second time
    assert only.run_id == "other" and decision == only and decision.promoted
    assert read_champion(registry, DATASET).model_digest == model[0].digest
    assert any("another machine wrote the registry while this one judged the model" in line for line in logged)


def test_a_promotion_on_record_without_its_champion_record_is_completed_not_decided_again(tmp_path, registry):
    model = candidate(tmp_path, "a", 0.98)
    decision = decide(registry, model)
    champion_path(registry, DATASET).unlink()  # a crash between the history line and the champion record

    assert decide(registry, model, run_id="run-2") == decision
    assert read_history(registry) == [decision] and read_champion(registry, DATASET).model_digest == model[0].digest


def test_a_model_judged_while_another_machine_writes_its_promotion_meets_the_new_champion(tmp_path, registry):
    first = decide(registry, candidate(tmp_path, "a", 0.975))
    winner = decide(registry, candidate(tmp_path, "b", 0.99), run_id="run-2")
    assert winner.promoted
    # Another machine has written its promotion to the history and not yet its champion record: the record still
    # names the champion it beat.
    champion_path(registry, DATASET).write_text(champion_record(first).model_dump_json(indent=2) + "\n")

    third = decide(registry, candidate(tmp_path, "c", 0.985), run_id="run-3")

    # Judged against the new champion (it beats the former by more than the tolerance, not the new one).
    assert third.champion_before.model_digest == winner.model_digest and not third.promoted
    assert third.reason == "test accuracy 0.9850 is 0.0050 below the champion's 0.9900, more than the tolerance 0.0020"
    assert read_champion(registry, DATASET) == champion_record(winner)  # the promotion on record completed
    assert [d.model_digest for d in read_history(registry)] == [first.model_digest, winner.model_digest,
                                                                third.model_digest]
    # A champion record removed on purpose (its model lost) is not brought back: the next model has no champion.
    champion_path(registry, DATASET).unlink()
    fourth = decide(registry, candidate(tmp_path, "d", 0.98), run_id="run-4")
    assert fourth.promoted and fourth.reason.startswith("first model: no champion yet")
    assert read_champion(registry, DATASET) == champion_record(fourth)

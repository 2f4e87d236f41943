"""Code versions follow the import closure: editing a module a stage runs reruns it, editing any other does not."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.keys import code_components, project_modules

REPO = Path(__file__).resolve().parents[1]

# Runs the flow from whatever copy of the package lies beside this script, and prints each stage's state.
RUN_FLOW = """
import json, sys
from flows.config import PipelineConfig
from flows.pipeline import mnist_pipeline
import tasks
assert tasks.__file__.startswith(sys.argv[3]), tasks.__file__  # the copy, not the checkout
summary = mnist_pipeline(config=PipelineConfig.model_validate_json(sys.argv[1]), until=sys.argv[2])
print(json.dumps({stage: info["state"] for stage, info in summary["stages"].items()}))
"""


def test_closure_holds_every_project_module_a_stage_imports_and_no_other():
    train = set(project_modules("tasks.train"))
    # train imports preprocess, which imports dataset (the split names): not imported by train directly.
    assert {"tasks.train", "tasks.preprocess", "tasks.idx", "tasks.dataset", "tasks.artifacts", "tasks.keras_runtime",
            "tasks.models", "tasks.layout"} <= train
    assert not {"tasks.download", "tasks.evaluate", "tasks.report", "tasks.promote", "flows.pipeline",
                "flows.config"} & train
    assert "tasks.dataset" in project_modules("tasks.validate") and "tasks.download" not in project_modules("tasks.validate")
    # Evaluate reads the model's files and loss by their names (tasks.layout, tasks.models), not through train.
    assert "tasks.train" not in project_modules("tasks.evaluate")
    assert set(project_modules("tasks.download")) == {"tasks", "tasks.download", "tasks.dataset", "tasks.artifacts", "tasks.errors",
                                                      "tasks.files", "tasks.idx", "tasks.images", "tasks.layout",
                                                      "tasks.sources", "tasks.storage"}


def test_libraries_that_shape_a_stage_output_are_in_its_code_version():
    import keras
    import pyarrow
    import tensorflow as tf

    train = code_components("tasks.train")["libraries"]
    assert train["tensorflow"] == f"tensorflow {tf.__version__}" and train["keras"] == f"keras {keras.__version__}"
    assert code_components("tasks.preprocess")["libraries"]["pyarrow"] == f"pyarrow {pyarrow.__version__}"
    assert "tensorflow" not in code_components("tasks.preprocess")["libraries"]
    # Orchestration and the standard library never change an output.
    assert not {"prefect", "json", "os"} & set(train)


@pytest.fixture
def package_copy(tmp_path, synthetic_config):
    """Return a copy of the project's code, its flow runner script and a config on small synthetic data."""
    copy = tmp_path / "copy"
    for package in ("tasks", "flows"):
        shutil.copytree(REPO / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "run_flow.py").write_text(RUN_FLOW)
    return copy, synthetic_config.model_dump_json()


def run_copy(copy: Path, config: str, until: str, api_url: str, **env: str) -> dict[str, str]:
    env = {**os.environ, "PREFECT_API_URL": api_url, **env}
    out = subprocess.run([sys.executable, str(copy / "run_flow.py"), config, until, str(copy)], cwd=copy, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def edit(module: Path) -> None:
    """Change a module's source without changing what it does."""
    module.write_text(module.read_text() + "\n# edited\n")


def test_editing_a_module_reruns_exactly_the_stages_whose_closure_holds_it(package_copy, prefect_api_url):
    copy, config = package_copy
    run = lambda: run_copy(copy, config, "train", prefect_api_url)  # noqa: E731
    assert set(run().values()) == {"completed"}
    assert set(run().values()) == {"cached"}

    edit(copy / "tasks" / "evaluate.py")  # in no closure of these stages
    assert set(run().values()) == {"cached"}

    edit(copy / "tasks" / "validate.py")  # validate only: its report is byte-identical, so preprocess stays cached
    assert run() == {"download": "cached", "validate": "completed", "preprocess": "cached", "train": "cached"}

    edit(copy / "tasks" / "preprocess.py")  # train runs code of preprocess (load_split) and reruns despite early cutoff
    assert run() == {"download": "cached", "validate": "cached", "preprocess": "completed", "train": "completed"}

    edit(copy / "tasks" / "idx.py")  # imported by every one of them, directly or not
    assert set(run().values()) == {"completed"}


def test_a_library_version_is_part_of_the_key(package_copy, prefect_api_url, tmp_path):
    copy, config = package_copy
    assert set(run_copy(copy, config, "preprocess", prefect_api_url).values()) == {"completed"}
    # A stand-in pyarrow distribution record, earlier on the path than the real one, reports another version.
    fake = tmp_path / "site"
    (fake / "pyarrow-0.0.1.dist-info").mkdir(parents=True)
    (fake / "pyarrow-0.0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: pyarrow\nVersion: 0.0.1\n")
    (fake / "pyarrow-0.0.1.dist-info" / "top_level.txt").write_text("pyarrow\n")
    states = run_copy(copy, config, "preprocess", prefect_api_url, PYTHONPATH=str(fake))
    assert states == {"download": "cached", "validate": "cached", "preprocess": "completed"}


def test_a_template_is_code_of_the_stage_that_renders_it(package_copy):
    copy, _ = package_copy
    versions = ("import json; from tasks.keys import code_version as v; "
                "print(json.dumps([v('tasks.report'), v('tasks.train')]))")
    read = lambda: json.loads(subprocess.run([sys.executable, "-c", versions], cwd=copy, capture_output=True,  # noqa: E731
                                             text=True, check=True).stdout)
    report, train = read()
    edit(copy / "tasks" / "report" / "templates" / "report.md.j2")
    after_report, after_train = read()
    assert after_report != report and after_train == train


def test_deriving_a_code_version_imports_none_of_the_stage_code():
    # `from tasks.callbacks import EpochBackup` inside a function: resolving the name must not import the module
    # (which imports Keras), or every cached run would pay TensorFlow's import.
    code = ("import sys; from tasks.keys import code_version, project_modules; code_version('tasks.train'); "
            "assert 'tasks.callbacks' in project_modules('tasks.train'); "
            "assert 'keras' not in sys.modules and 'tensorflow' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_a_stage_task_with_its_cache_policy_pickles_to_another_process(tmp_path):
    """Dask ships tasks to worker processes by (cloud)pickle: the lock manager travels, its held locks do not."""
    import pickle
    import subprocess
    import sys

    import cloudpickle

    from flows.config import PipelineConfig
    from flows.runner import cached, train_model

    task = cached(train_model, PipelineConfig(artifacts_dir=tmp_path))
    locks = task.cache_policy.lock_manager
    assert locks.acquire_lock("k", "here")
    blob = cloudpickle.dumps(task)
    copy = pickle.loads(blob)
    assert copy.cache_policy.lock_manager.lock_files_directory == locks.lock_files_directory
    assert not copy.cache_policy.lock_manager.is_lock_holder("k", "here")
    # Another process sees the lock held here through the file, and takes it once it is released.
    probe = ("import pickle, sys; t = pickle.loads(sys.stdin.buffer.read()); m = t.cache_policy.lock_manager; "
             "print(m.is_locked('k'), m.acquire_lock('k', 'there', acquire_timeout=0.2))")
    run = lambda: subprocess.run([sys.executable, "-c", probe], input=blob, capture_output=True, timeout=120,  # noqa: E731
                                 cwd=Path(__file__).resolve().parents[1]).stdout.decode().split()[-2:]
    assert run() == ["True", "False"]
    locks.release_lock("k", "here")
    assert run() == ["False", "True"]


# Edits each module of a copy of the package in turn and prints, per file, the steps whose code version changed.
EDIT_EACH = """
import json, sys
from pathlib import Path
from flows.stages import OTHER_STEPS, STEPS
from tasks import keys
steps = {**STEPS, **OTHER_STEPS}
def versions():
    for cached in (keys.code_components, keys.project_modules, keys._imports):
        cached.cache_clear()
    return {name: keys.code_version(step.module) for name, step in steps.items()}
base, root, changed = versions(), Path(sys.argv[1]), {}
for path in sorted(p for p in root.glob("[tf][al]*s/**/*") if p.is_file() and "__pycache__" not in p.parts):
    text = path.read_text()
    path.write_text(text + "\\n# edited\\n")
    try:
        now = versions()
    finally:
        path.write_text(text)
    changed[path.relative_to(root).as_posix()] = [name for name in steps if now[name] != base[name]]
print(json.dumps(changed))
"""
DATA = ["download", "validate", "preprocess"]
MODEL = ["train", "evaluate"]
PREDICT = ["load_inputs", "predict_classes", "write_predictions"]
SWEEP = "write_sweep_report"
BATCH = "check_batch"
EVERY = [*DATA, *MODEL, "report", *PREDICT, SWEEP, BATCH]
# What each module is code of. Shared foundations are every stage's; a stage's own module and what only it imports
# are its own; orchestration (flows/), the registry's writer, the UI documents, keys and locks are no stage's.
CODE_OF = {
    **{f"tasks/{name}.py": EVERY for name in ("__init__", "artifacts", "dataset", "errors", "files", "idx", "layout",
                                              "storage")},
    "tasks/preprocess.py": ["preprocess", *MODEL, "report", *PREDICT, SWEEP, BATCH],  # load_split and the parquet schema
    "tasks/models.py": [*MODEL, *PREDICT, SWEEP], "tasks/keras_runtime.py": [*MODEL, *PREDICT, SWEEP],
    "tasks/download.py": ["download", BATCH], "tasks/sources.py": ["download", BATCH],  # an IDX batch: local_payloads
    "tasks/images.py": ["download", *PREDICT, BATCH], "tasks/validate.py": ["validate", BATCH],
    "tasks/batches.py": [BATCH], "tasks/train.py": ["train"],
    "tasks/callbacks.py": ["train"], "tasks/evaluate.py": ["evaluate"], "tasks/predict.py": PREDICT,
    "tasks/registry.py": ["report"],  # the decision the report shows
    "tasks/report/__init__.py": ["report"], "tasks/sweep.py": [SWEEP],
    **{f"tasks/report/{name}.py": ["report", SWEEP] for name in ("context", "figures", "render")},
    **{name: [] for name in ("tasks/keys.py", "tasks/locks.py", "tasks/promote.py", "tasks/report/ui.py")},
}


def test_editing_each_module_changes_the_code_version_of_exactly_the_stages_it_is_code_of(tmp_path):
    for package in ("tasks", "flows"):
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-c", EDIT_EACH, str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    changed = json.loads(out.stdout)
    assert len(changed) > 40 and set(CODE_OF) <= set(changed)
    for path, stages in changed.items():
        if path.startswith("flows/"):
            expected = []
        elif path.startswith("tasks/report/templates/"):
            expected = ["report", SWEEP]  # a package's data files count with its modules
        else:
            expected = CODE_OF[path]
        assert stages == expected, path


def test_no_import_cycle_among_the_projects_modules():
    from tasks.keys import _imports, _is_module

    modules = [".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
               for package in ("tasks", "flows") for p in (REPO / package).rglob("*.py")]
    graph = {m: {d for d in _imports(m) if d.partition(".")[0] in ("tasks", "flows") and _is_module(d) and d != m}
             for m in modules}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, " -> ".join((*path[path.index(module):], module))
        if module not in done:
            for dependency in graph.get(module, ()):
                visit(dependency, (*path, module))
            done.add(module)

    for module in modules:
        visit(module, ())
    assert {"tasks.artifacts", "tasks.storage", "flows.runner"} <= done


def test_no_module_under_tasks_imports_prefect_or_branches_on_object_storage():
    from tasks.keys import _imports

    modules = [".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
               for p in (REPO / "tasks").rglob("*.py")]
    assert len(modules) > 20
    assert {m: [d for d in _imports(m) if d.partition(".")[0] == "prefect"] for m in modules} == dict.fromkeys(modules, [])
    # Where a root on object storage differs from a folder is decided in the storage layer only.
    branching = {p.relative_to(REPO).as_posix() for p in (REPO / "tasks").rglob("*.py") if "is_remote(" in p.read_text()}
    assert branching == {"tasks/storage.py", "tasks/artifacts.py"}

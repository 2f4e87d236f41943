"""Command line: `mnist-pipeline run` runs the flow locally and prints a summary; `predict` scores new images;
`sweep` trains many configurations on Dask. Per command: `_add_<command>` (its flags), then its handler."""

from __future__ import annotations

import argparse
import atexit
import errno
import gc
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import UnionType
from typing import Any, Literal, get_args, get_origin

# Machines without internet should not even try to send telemetry; users may still opt in.
QUIET_ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
# The temporary API server of a serverless run needs more than the default 20 s on a busy 2-core machine.
STARTUP_ENV = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
# Set before Prefect is imported (later, by the commands that use it): Prefect reads its settings and telemetry then.
for _key, _value in {**QUIET_ENV, **STARTUP_ENV}.items():
    os.environ.setdefault(_key, _value)

from pydantic import BaseModel, ValidationError  # noqa: E402

from flows import server  # noqa: E402
from flows.config import PROJECT_ROOT, STAGES, PipelineConfig  # noqa: E402
from tasks.errors import PipelineError, validation_problems  # noqa: E402
from tasks.dataset import BatchesConfig, DatasetConfig, DownloadConfig, ValidateConfig, read_sums, version_label  # noqa: E402
from tasks.models import MODEL_DEFAULTS, TrainConfig  # noqa: E402
from tasks.storage import as_root, explained  # noqa: E402

# Per setting that each model defaults on its own: {model: default}, for the help text.
MODEL_DEFAULTS_BY_KNOB = {
    name: {kind: defaults[name] for kind, defaults in MODEL_DEFAULTS.items() if name in defaults}
    for name in {name for defaults in MODEL_DEFAULTS.values() for name in defaults}
}
# The event that `add-batch` emits when a batch has landed; an automation (prefect.yaml) retrains on it.
BATCH_EVENT = "mnist-pipeline.batch.landed"
LOCKS_HELP = ("stage locks from a Redis server that several machines share (env MNIST_PIPELINE_LOCKS; default: flock "
              "on this machine)")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except PipelineError as exc:  # an expected failure (bad input, a bad setting, a service down): one line, exit 1
        print(f"mnist-pipeline: error: {exc}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the command line."""
    parser = argparse.ArgumentParser(prog="mnist-pipeline", description="MNIST training pipeline orchestrated by Prefect.")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (_add_run, _add_status, _add_history, _add_diff, _add_gc, _add_serve, _add_predict, _add_sweep,
                _add_add_batch, _add_server):
        add(commands)
    return parser


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """Add the flags that set a pipeline configuration (those of run, status, gc, serve and sweep)."""
    parser.add_argument("--source", help="auto (MNIST: Keras's ~/.keras/datasets/mnist.npz if it is MNIST's, the "
                        "mirrors, then the shipped copy); a folder, file://, http(s):// or s3:// URL of: the four files "
                        "under MNIST's names (.gz or not), class folders (train/<class>/*, test/<class>/* or <class>/*), "
                        "images with a labels.csv or labels.jsonl; or an .npz with x_train, y_train, x_test, y_test")
    parser.add_argument("--sha256", metavar="FILE", help="pin the source to the digests in FILE (sha256sum format: "
                        "the IDX payloads, or the source's files); a source's own SHA256SUMS is always checked")
    parser.add_argument("--data-dir", help="root of raw and processed data (env MNIST_PIPELINE_DATA_DIR)")
    parser.add_argument("--artifacts-dir", help="root of reports, models and the cache (env MNIST_PIPELINE_ARTIFACTS_DIR)")
    parser.add_argument("--locks", metavar="redis://HOST:PORT/DB", help=LOCKS_HELP)
    dataset = parser.add_argument_group("dataset")
    _add_fields(dataset, DatasetConfig, "dataset_", flags={"name": "--dataset-name"})
    for flag, field in (("--test-fraction", DownloadConfig.model_fields["test_fraction"]),
                        ("--max-leakage", ValidateConfig.model_fields["max_leakage"])):
        dataset.add_argument(flag, type=float, metavar="F", help=f"{field.description} (default: {field.default})")
    dataset.add_argument("--batches", metavar="DIR", help=BatchesConfig.model_fields["root"].description)
    dataset.add_argument("--accept", action="append", default=[], metavar="BATCH",
                         help="take this batch although a check quarantined it (repeatable; recorded with the batch)")
    training = parser.add_argument_group("training (defaults: the chosen model's; mlp is the reference network)")
    _add_fields(training, TrainConfig, "")


def add_store_flags(parser: argparse.ArgumentParser, json_help: str) -> None:
    """Add the flags of the commands that work on the artifacts store alone (history, diff, predict)."""
    parser.add_argument("--artifacts-dir", help="root of models, the registry and the cache (env MNIST_PIPELINE_ARTIFACTS_DIR)")
    parser.add_argument("--locks", metavar="redis://HOST:PORT/DB", help=LOCKS_HELP)
    parser.add_argument("--json", action="store_true", help=json_help)


def _add_fields(group: argparse._ArgumentGroup, model: type[BaseModel], prefix: str, flags: dict[str, str] | None = None) -> None:
    """Add one flag per field of a config model (dest: `prefix` + name): its description, default and type."""
    for name, field in model.model_fields.items():
        flag = (flags or {}).get(name, "--" + name.replace("_", "-"))
        kind = field.annotation
        if isinstance(kind, UnionType):  # `int | None`: the flag takes an int
            kind = next(a for a in get_args(kind) if a is not type(None))
        default = field.default
        if default is None and name in MODEL_DEFAULTS_BY_KNOB:
            default = ", ".join(f"{m} {v}" for m, v in MODEL_DEFAULTS_BY_KNOB[name].items())
        help_text = field.description if default is None else f"{field.description} (default: {default})"
        dest = prefix + name
        if kind is bool:
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, help=help_text)
        elif get_origin(kind) is Literal:
            group.add_argument(flag, dest=dest, choices=get_args(kind), help=help_text)
        elif get_origin(kind) is list:
            group.add_argument(flag, dest=dest, metavar="A,B,...", help=help_text)
        else:
            group.add_argument(flag, dest=dest, type=kind, metavar=name.upper(), help=help_text)


def store_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Return the config fields that the store flags set: the artifacts root (models, registry, cache) and the locks."""
    overrides: dict[str, Any] = {"locks": args.locks} if args.locks else {}
    # Relative to where the command was typed, made absolute now (served runs start later, possibly elsewhere).
    if args.artifacts_dir:
        overrides["artifacts_dir"] = str(as_root(args.artifacts_dir))
    return overrides


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Return the config fields that the config flags set."""
    overrides = store_overrides(args)
    if args.data_dir:
        overrides["data_dir"] = str(as_root(args.data_dir))  # absolute now, as the artifacts root
    download = {"source": args.source} if args.source else {}
    if args.sha256:
        download["sha256"] = read_sums(Path(args.sha256).expanduser().absolute())
    if args.test_fraction is not None:
        download["test_fraction"] = args.test_fraction
    if download:
        overrides["download"] = download
    if args.max_leakage is not None:
        overrides["validation"] = {"max_leakage": args.max_leakage}
    batches = {"root": str(as_root(args.batches))} if args.batches else {}
    if args.accept:
        batches["accept"] = args.accept
    if batches:
        overrides["batches"] = batches
    for section, model, prefix in (("dataset", DatasetConfig, "dataset_"), ("train", TrainConfig, "")):  # as in add_config_flags
        values = {name: getattr(args, prefix + name) for name in model.model_fields if getattr(args, prefix + name) is not None}
        if values:
            overrides[section] = values
    return overrides


def pipeline_config(overrides: dict[str, Any]) -> PipelineConfig:
    """Return the pipeline config with these overrides; invalid values raise a PipelineError naming them."""
    try:
        return PipelineConfig(**overrides)
    except ValidationError as exc:
        # Bad values are bad input, as a bad source is: exit 1 (2 is left to argparse for malformed command lines).
        raise PipelineError(f"invalid configuration: {validation_problems(exc)}") from None


def flow_setup(overrides: dict[str, Any]) -> tuple[server.LocalServer | None, PipelineConfig]:
    """Return the local server to run flows against (none with PREFECT_API_URL or the switch off) and the checked config."""
    # The server first: one being started comes up while the command checks its config and imports its flow.
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url or not server.enabled():
        return None, pipeline_config(overrides)
    local, started = server.ensure(Path(settings.home))
    if started:
        print(f"mnist-pipeline: starting a local Prefect server for {settings.home} at {local.url}; later commands "
              "reuse it (`mnist-pipeline server stop` stops it)", file=sys.stderr)
    return local, pipeline_config(overrides)


def _without_traceback(record: logging.LogRecord) -> bool:
    """Log expected pipeline errors (and a full disk) as one line, with their message; keep tracebacks for real bugs."""
    error = record.exc_info[1] if record.exc_info else None
    if isinstance(error, PipelineError) or getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        if str(error) not in record.getMessage():  # e.g. Prefect's "An error was encountered while committing ..."
            record.msg, record.args = f"{record.getMessage()}: {error}", ()
        record.exc_info = record.exc_text = None
    return True


@contextmanager
def prefect_api(local: server.LocalServer | None) -> Iterator[None]:
    """Run the block against the local server once it answers (else PREFECT_API_URL or a temporary server)."""
    # Importing Prefect configures its logging: the filters below must come after.
    from prefect import settings

    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_without_traceback)
    if local is not None:
        server.wait_until_ready(local)
    api = {} if local is None else {settings.PREFECT_API_URL: local.api_url, settings.PREFECT_UI_URL: local.url}
    # No heartbeat events unless configured: they serve zombie detection of deployment runs, and a run in the
    # foreground waits up to 1 s at its end for Prefect's heartbeat thread to stop.
    with settings.temporary_settings(updates=api, set_defaults={settings.PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        if local is None and settings.PREFECT_API_URL.value():
            check_api()
        yield


def check_api() -> None:
    """Fail with one line unless the Prefect API of PREFECT_API_URL answers and takes this client's auth string."""
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    api = get_current_settings().api
    try:
        with get_client(sync_client=True) as client:
            client.raise_for_api_version_mismatch_once()  # Prefect's own first request (remembered: not made twice)
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code != 401:
            raise
        found = "one it refuses" if api.auth_string else "none"
        raise PipelineError(f"Prefect API {api.url}: expected its server's auth string (PREFECT_SERVER_API_AUTH_STRING) "
                            f"in PREFECT_API_AUTH_STRING, found {found} (401 Unauthorized)") from None
    except RuntimeError as exc:
        if not isinstance(exc.__cause__, httpx.HTTPError):
            raise
        if "CERTIFICATE_VERIFY_FAILED" in str(exc.__cause__):
            raise PipelineError(f"Prefect API {api.url}: expected a certificate that this client trusts (signed by "
                                "the system's CAs or the CA in PREFECT_API_SSL_CERT_FILE), found one it cannot verify "
                                f"({exc.__cause__})") from None
        raise PipelineError(f"Prefect API {api.url}: expected a Prefect server answering there, found none "
                            f"({exc.__cause__})") from None


def run_flow(local: server.LocalServer | None, args: argparse.Namespace, summarize: Callable[[dict[str, Any]], str],
             flow: Any, config: PipelineConfig, **parameters: Any) -> int:
    """Run a flow; print its summary (JSON with --json) and its page in the local server's UI."""
    from prefect.events.worker import EventsWorker

    config.check_services()  # a lock server or a bucket that does not answer: before any flow run (the flows check too)
    with prefect_api(local):
        state = flow(config=config, **parameters, return_state=True)
        # Prefect stops its event worker at interpreter exit and warns on stderr ("Still processing items") if the
        # run's last events (its final states) are still queued then: wait for them here, a few milliseconds.
        EventsWorker.instance().wait_until_empty()
    if not state.is_completed():
        error = explained(state.result(raise_on_failure=False))
        raise error if isinstance(error, BaseException) else RuntimeError(f"flow run ended {state.name}")
    summary = state.result()
    print(json.dumps(summary, indent=2) if args.json else summarize(summary), flush=True)
    if local is not None:
        print(f"Prefect UI: {local.url}/runs/flow-run/{summary['run_id']} (the local server; "
              "`mnist-pipeline server stop` stops it)", file=sys.stderr)
    return 0


def _print_tables(tables: list[Any]) -> None:
    from rich.console import Console

    # Piped without COLUMNS: wide enough to keep rows whole, for files and greps.
    console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 200)
    for table in tables:
        console.print(table)


def _add_run(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser("run", help="run the pipeline (cached stages are skipped)", description="Run the pipeline.")
    which = run.add_mutually_exclusive_group()
    which.add_argument("--until", choices=STAGES, default=STAGES[-1], metavar="STAGE",
                       help="stop after STAGE (default: %(default)s)")
    which.add_argument("--only", choices=STAGES, metavar="STAGE",
                       help="run just STAGE, on the existing artifacts of the stages before it")
    run.add_argument("--rerun", choices=STAGES, action="append", default=[], metavar="STAGE",
                     help="run STAGE even if cached (repeatable); one of: " + ", ".join(STAGES))
    run.add_argument("--no-cache", action="store_true", help="run every stage, as if each were given to --rerun")
    run.add_argument("--json", action="store_true", help="print the run summary as one JSON object on stdout")
    add_config_flags(run)
    run.set_defaults(handler=run_command)


def run_command(args: argparse.Namespace) -> int:
    """Run the pipeline; print its summary."""
    local, config = flow_setup(config_overrides(args))
    from flows.pipeline import mnist_pipeline

    rerun = list(STAGES) if args.no_cache else args.rerun
    return run_flow(local, args, human_summary, mnist_pipeline, config=config, until=args.until, rerun=rerun, only=args.only)


def batch_lines(summary: dict[str, Any]) -> list[str]:
    """Return a line per checked batch (its verdict and why) and the data version, if the run had a batches root."""
    lines = []
    for name, batch in summary.get("batches", {}).items():
        why = f": {'; '.join(batch['reasons'])}" if batch["reasons"] else ""
        lines.append(f"batch {name} ({batch['images']} images, {batch['state']}): {batch['verdict']}{why}")
    if "data_version" in summary:
        lines.append(f"data version {version_label(summary['data_version'])} (the base and "
                     f"{len(summary['data_version']['batches'])} accepted batches)")
    return lines


def human_summary(summary: dict[str, Any]) -> str:
    """Return a few lines for people: each stage's state, the headline metrics, and the report's path last."""
    lines = []
    for stage, info in summary["stages"].items():
        lines.append(f"{stage:<11} {info['state']:<9} {info['artifacts'][0].rpartition('/')[0]}")
        if stage == "preprocess":  # the batches are checked after it
            lines += batch_lines(summary)
    if "metrics" in summary:
        m = summary["metrics"]
        lines.append(f"test accuracy {m['test_accuracy']:.4f}, test loss {m['test_loss']:.4f}")
        lines.append("first 20 predictions: " + " ".join(map(str, m["first_20_predictions"])))
    if "promotion" in summary:
        lines.append(decision(summary["promotion"]))
    if "report" in summary:
        lines.append(f"report: {summary['report']}")
    return "\n".join(lines)


def decision(promotion: dict[str, Any]) -> str:
    """Return the promotion decision of a run or sweep summary for people: promoted or not, and why."""
    of = f" (dataset {promotion['dataset']})" if promotion.get("dataset") else ""
    return f"{'promoted to champion' if promotion['promoted'] else 'not promoted'}{of}: {promotion['reason']}"


def _add_status(commands: argparse._SubParsersAction) -> None:
    status = commands.add_parser(
        "status", help="say which stages are up to date for a configuration, and why the others are not (runs nothing)",
        description="For the configuration given (the flags of `run`), one line per stage: up to date (a cached result "
        "whose files are intact), stale (with why: an input, a parameter, the code, or a damaged file) or missing. "
        "Starts no Prefect server and imports neither Prefect nor TensorFlow. Exit 0 when every stage is up to date, "
        "1 otherwise.")
    status.add_argument("--until", choices=STAGES, default=STAGES[-1], metavar="STAGE",
                        help="only the stages up to STAGE (default: %(default)s)")
    status.add_argument("--json", action="store_true", help="print one JSON object: up_to_date, and per stage its "
                        "state, why, key and artifacts")
    add_config_flags(status)
    status.set_defaults(handler=status_command)


def status_command(args: argparse.Namespace) -> int:
    """Print the status of each stage; exit 0 if all are up to date, else 1."""
    from flows.status import UP_TO_DATE, pipeline_status, status_json, status_summary

    rows = pipeline_status(pipeline_config(config_overrides(args)), until=args.until)
    print(json.dumps(status_json(rows), indent=2) if args.json else status_summary(rows), flush=True)
    return 0 if all(row.state == UP_TO_DATE for row in rows) else 1


def _add_history(commands: argparse._SubParsersAction) -> None:
    history = commands.add_parser(
        "history", help="list the models the registry knows: scores, settings, promoted or not and why (runs nothing)",
        description="Every model the promotion registry has a decision on, in the order of their latest decisions: "
        "digest, date of its latest decision, the settings that differ from its model's defaults, test accuracy and "
        "loss, the decision; the champion marked with *.")
    add_store_flags(history, "print one JSON list: per model its digest, champion, date, data version, settings "
                    "changed, scores and decision")
    add_dataset_flag(history)
    history.set_defaults(handler=history_command)


def add_dataset_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", metavar="KEY", help="the dataset whose models and champion are meant, by its key "
                        "in the registry (default: the configured dataset's; `history` names it)")


def chosen_dataset(args: argparse.Namespace, config: PipelineConfig) -> str:
    """Return the key of the dataset a command means: --dataset, else the configured dataset's."""
    from flows.stages import configured_dataset

    return args.dataset or configured_dataset(config).key()


def history_command(args: argparse.Namespace) -> int:
    """Print the models of the registry as a table (a JSON list with --json)."""
    from flows.history import history, history_table
    from tasks.registry import read_history

    config = pipeline_config(store_overrides(args))
    dataset = chosen_dataset(args, config)
    rows = history(config, dataset)
    if args.json:
        print(json.dumps(rows, indent=2), flush=True)
    elif rows:
        _print_tables([history_table(rows, dataset)])
    else:
        others = sorted({d.dataset for d in read_history(config.registry_dir)})
        print(f"no model of dataset {dataset} in the registry yet ({config.registry_dir}): `mnist-pipeline run` trains "
              "and judges one" + (f"; other datasets there: {', '.join(others)} (--dataset KEY)" if others else ""))
    return 0


def _add_diff(commands: argparse._SubParsersAction) -> None:
    diff = commands.add_parser(
        "diff", help="compare two models: settings and metrics side by side, with the deltas (runs nothing)",
        description="Compare two models (digests, unique prefixes of at least 4 hex digits, or champion): the training "
        "settings that differ, then test and train accuracy and loss and each class's recall, with B - A.")
    diff.add_argument("a", metavar="A", help="a model: champion, a digest or a unique prefix")
    diff.add_argument("b", metavar="B", help="the other model")
    add_store_flags(diff, "print one JSON object: dataset, a, b, params (name, a, b), metrics (name, a, b, delta)")
    add_dataset_flag(diff)
    diff.set_defaults(handler=diff_command)


def diff_command(args: argparse.Namespace) -> int:
    """Print the settings and metrics of two models side by side (a JSON object with --json)."""
    from flows.history import diff, diff_tables

    config = pipeline_config(store_overrides(args))
    result = diff(config, args.a, args.b, chosen_dataset(args, config))
    if args.json:
        print(json.dumps(result, indent=2), flush=True)
    else:
        _print_tables(diff_tables(result))
    return 0


def _add_gc(commands: argparse._SubParsersAction) -> None:
    collect = commands.add_parser(
        "gc", help="list (and with --yes remove) the artifact folders and cache records a configuration no longer uses",
        description="For the configuration given (the flags of `run`), list the published artifact folders and cache "
        "records that neither its stages nor the promotion registry use, with their sizes; --yes removes them. Kept: "
        "the configuration's results (a run with it stays all cached), the champion and every model of the registry, "
        "sweep reports, the shipped snapshot; nothing at all while a stage lock is held (a run in progress).")
    collect.add_argument("--yes", action="store_true", help="remove what is listed (default: only list it)")
    collect.add_argument("--json", action="store_true", help="print one JSON object: removed, folders (path: bytes), "
                         "bytes, records, kept_folders, kept_records, locks_held")
    add_config_flags(collect)
    collect.set_defaults(handler=gc_command)


def gc_command(args: argparse.Namespace) -> int:
    """List what gc would remove; with --yes remove it. Exit 1 when a run in progress holds it back."""
    from flows import gc as store

    config = pipeline_config(config_overrides(args))
    with store.excluding_runs(config) if args.yes else nullcontext():  # a listing removes nothing: no need
        planned = store.plan(config)
        removing = args.yes and not planned.held
        if removing:
            store.collect(config, planned)
    print(json.dumps(store.plan_json(planned, removing), indent=2) if args.json else store.summary(planned, removing),
          flush=True)
    return 1 if planned.held else 0


def _add_serve(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve", help="serve the flow on a retraining schedule from this process (needs a Prefect server)",
        description="Create a scheduled deployment of the flow and run its flow runs in this process until stopped. "
        "An alternative to prefect.yaml + a work pool + a worker for one-process setups.")
    # No defaults here: serve_command reads them from prefect.yaml, which the other commands need not read.
    serve.add_argument("--cron", help="cron schedule (default: the weekly-retrain deployment's, in prefect.yaml)")
    serve.add_argument("--timezone", help="IANA timezone of the schedule (default: the weekly-retrain deployment's)")
    serve.add_argument("--name", default="served-retrain", help="deployment name (default: %(default)s)")
    add_config_flags(serve)
    serve.set_defaults(handler=serve_command)


def serve_command(args: argparse.Namespace) -> int:
    """Serve the flow on a cron schedule until interrupted; the config overrides become the runs' parameters."""
    overrides = config_overrides(args)
    if "locks" in overrides:  # a password is no parameter (the server stores those): the served runs inherit it here
        os.environ["MNIST_PIPELINE_LOCKS"] = overrides.pop("locks")
    local, config = flow_setup(overrides)
    config.check_services()  # as run_flow does
    schedule = {"cron": args.cron, "timezone": args.timezone}
    if None in schedule.values():  # only then is prefect.yaml read
        import yaml

        document = yaml.safe_load((PROJECT_ROOT / "prefect.yaml").read_text())
        weekly = next(d for d in document["deployments"] if d["name"] == "weekly-retrain")["schedules"][0]
        schedule = {name: weekly[name] if value is None else value for name, value in schedule.items()}
    from prefect.schedules import Cron
    from prefect.settings import get_current_settings

    from flows.pipeline import mnist_pipeline

    with prefect_api(local):
        if not get_current_settings().api.url:
            print("mnist-pipeline: error: serve needs a Prefect server: start one (`prefect server start`) and set "
                  "PREFECT_API_URL (for example `prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api`)",
                  file=sys.stderr)
            return 2
        mnist_pipeline.serve(name=args.name, schedule=Cron(schedule["cron"], timezone=schedule["timezone"]),
                             parameters={"config": overrides} if overrides else {})
    return 0


def _add_predict(commands: argparse._SubParsersAction) -> None:
    predict = commands.add_parser(
        "predict", help="score images with the champion (or another model) and write one row per image",
        description="Score image files (PNG, JPEG, ... any size, grayscale or colour), folders of them, IDX image "
        "files (.gz or not) or parquet files in the pipeline's layout. Images are brought to the model's input: "
        "grayscale, light on dark (dark-on-light images are detected and inverted), padded to a square, 28x28, "
        "scaled to [0, 1]. Results are cached by content: the same inputs scored by the same model are not scored "
        "again. Nothing in the registry or the existing artifacts changes.")
    predict.add_argument("inputs", nargs="+", metavar="INPUT", help="an image, IDX or parquet file, or a folder of them")
    predict.add_argument("--model", default="champion", help="champion (the registry's, default), a model digest "
                         "or unique prefix of one, or a path to a model.keras file")
    predict.add_argument("--output", metavar="FILE", help="also write the predictions to FILE (CSV if it ends in "
                         ".csv, else parquet); its folder must exist")
    predict.add_argument("--invert", choices=("auto", "yes", "no"), default="auto", help="invert image files to "
                         "light on dark: auto detects dark-on-light ones by their border (default: %(default)s); IDX "
                         "and parquet inputs are taken as they are unless yes")
    predict.add_argument("--class-names", metavar="A,B,...", help="names of the model's classes in label order "
                         "(default: those recorded with the model, else the labels)")
    add_store_flags(predict, "print the summary as one JSON object on stdout")
    add_dataset_flag(predict)
    predict.set_defaults(handler=predict_command)


def predict_command(args: argparse.Namespace) -> int:
    """Score the inputs with the mnist-predict flow; print how many, by which model, the counts and where."""
    local, config = flow_setup(store_overrides(args))
    # Checked as the config checks them (non-empty, distinct); how many the model needs is known once it is loaded.
    try:
        names = args.class_names and DatasetConfig(class_names=args.class_names).class_names
    except ValidationError as exc:
        raise PipelineError(f"--class-names: {validation_problems(exc)}") from None
    from flows.predict import mnist_predict

    inputs = [str(Path(i).expanduser().absolute()) for i in args.inputs]
    return run_flow(local, args, predict_summary, mnist_predict, inputs=inputs, model=args.model, output=args.output,
                    invert=args.invert, class_names=names or None, config=config,
                    dataset=chosen_dataset(args, config) if args.model == "champion" else None)


def predict_summary(summary: dict[str, Any]) -> str:
    """Return the lines for people after `predict`: how many images, by which model, the counts, where."""
    counts = ", ".join(f"{name}: {n}" for name, n in summary["counts"].items())
    cached = " (cached)" if all(s == "cached" for s in summary["stages"].values()) else ""
    champion = f" (champion of {summary['dataset']})" if summary.get("dataset") else ""
    return (f"{summary['images']} images scored by model {summary['model'][:16]}{champion}{cached}\n"
            f"predicted classes: {counts}\npredictions: {summary['output']}")


def _add_sweep(commands: argparse._SubParsersAction) -> None:
    sweep = commands.add_parser(
        "sweep", help="train and evaluate many configurations on Dask, promote the best",
        description="Run the data stages once, then one train + evaluate stage per trial on Dask (a LocalCluster "
        "started for the sweep, or --dask-address), each cached as in `run`; the best trial (highest test accuracy, "
        "ties by loss) goes through the promotion gate. Flags not swept set every trial, as in `run`.")
    sweep.add_argument("--grid", action="append", default=[], metavar="NAME=V1,V2,...",
                       help="try every value of NAME, a training setting (repeatable: every combination)")
    sweep.add_argument("--space", metavar="FILE", help="YAML or JSON: grid: {NAME: [values]}, samples: N, random: "
                       "{NAME: [values] or {low, high, log}}, seed: S (--grid flags add to its grid)")
    sweep.add_argument("--dask-address", metavar="tcp://HOST:PORT", help="a running Dask scheduler (env "
                       "MNIST_PIPELINE_SWEEP__DASK_ADDRESS; default: a LocalCluster, one worker per core)")
    sweep.add_argument("--dask-workers", type=int, metavar="N", help="workers of the LocalCluster (default: one per core)")
    sweep.add_argument("--json", action="store_true", help="print the sweep summary as one JSON object on stdout")
    add_config_flags(sweep)
    sweep.set_defaults(handler=sweep_command)


def sweep_command(args: argparse.Namespace) -> int:
    """Run the sweep; print its trials, the best one, the decision and the report."""
    overrides = config_overrides(args)
    if args.dask_address or args.dask_workers:
        overrides["sweep"] = {name: getattr(args, name) for name in ("dask_address", "dask_workers") if getattr(args, name)}
    local, config = flow_setup(overrides)
    space = sweep_space(args, config)
    from flows.sweep import check_scheduler, mnist_sweep

    if config.sweep.dask_address:  # as the flow does, but before any flow run (as run_flow checks the services)
        check_scheduler(config.sweep.dask_address, config.sweep.dask_timeout_s)
    return run_flow(local, args, sweep_summary, mnist_sweep, space=space, config=config)


def sweep_space(args: argparse.Namespace, config: PipelineConfig) -> dict[str, Any]:
    """Return the sweep space of the command line (--space and --grid), checked trial by trial against the config."""
    from tasks import sweep

    document = sweep.load_space(Path(args.space)) if args.space else {}
    grid = {**document.get("grid", {}), **sweep.parse_grid(args.grid)}
    document = {**document, "grid": grid} if grid else document
    where = args.space or "--grid"
    sweep.expand(sweep.build_space(document, where), config.train.model_dump(exclude_none=True, exclude_unset=True), where)
    return document


def sweep_summary(summary: dict[str, Any]) -> str:
    """Return the trials as a small table for people, then the best trial, the decision and the report."""
    from tasks.sweep import PARAMETERS

    rows = summary["trials"]
    columns = [name for name in PARAMETERS if name in rows[0]]
    lines = [*batch_lines(summary),
             "trial " + " ".join(f"{name:>13}" for name in columns) + "  state    test acc  test loss  fit (s)  model"]
    for row in rows:
        scores = (f"{row['test_accuracy']:.4f}    {row['test_loss']:.4f}     {row.get('fit_seconds', 0):6.1f}"
                  if row["state"] != "failed" else f"failed: {row['error']}")
        lines.append(f"{row['trial']:>5} " + " ".join(f"{str(row[name]):>13}" for name in columns)
                     + f"  {row['state']:<8} {scores}  {row.get('model_digest', '')[:16]}")
    lines.append(f"best: trial {summary['best']['trial']}; {decision(summary['promotion'])}")
    lines.append(f"report: {summary['report']}")
    return "\n".join(lines)


def _add_add_batch(commands: argparse._SubParsersAction) -> None:
    add = commands.add_parser(
        "add-batch", help="copy a labelled batch into the batches root (files first, the _SUCCESS marker last)",
        description="Check that SRC is a dataset (class folders, a manifest, an .npz or IDX files), copy it into the "
        "batches root as a new batch, write its _SUCCESS marker last, and, when a Prefect API is configured "
        f"(PREFECT_API_URL), emit the event {BATCH_EVENT} that the event-driven deployment retrains on.")
    add.add_argument("source", metavar="SRC", help="a folder holding the batch")
    add.add_argument("--name", help="the batch's name (default: today's date, UTC, YYYY-MM-DD); batches are taken in "
                     "name order")
    add.add_argument("--batches", metavar="DIR", help="the batches root (default: the config's, env "
                     "MNIST_PIPELINE_BATCHES__ROOT)")
    add.set_defaults(handler=add_batch_command)


def add_batch_command(args: argparse.Namespace) -> int:
    """Copy a batch into the batches root; emit the batch-landed event when a Prefect API is configured."""
    from datetime import datetime, timezone

    from tasks.batches import add_batch

    config = pipeline_config({"batches": {"root": str(as_root(args.batches))}} if args.batches else {})
    if not config.batches.root:
        raise PipelineError("add-batch: expected a batches root (--batches DIR or MNIST_PIPELINE_BATCHES__ROOT), "
                            "found none")
    name = args.name or datetime.now(timezone.utc).strftime("%Y-%m-%d")
    root = config.batches.root.rstrip("/")
    images = add_batch(Path(args.source), root, name)
    print(f"added batch {name} ({images} images) to {root}")
    if os.environ.get("PREFECT_API_URL"):
        from prefect.events import emit_event

        emit_event(event=BATCH_EVENT, resource={"prefect.resource.id": f"mnist-pipeline.batch.{name}",
                                                "mnist-pipeline.batches-root": root, "mnist-pipeline.images": str(images)})
        print(f"emitted {BATCH_EVENT} for batch {name}")
    return 0


def _add_server(commands: argparse._SubParsersAction) -> None:
    local = commands.add_parser(
        "server", help="show or stop the local Prefect server (started by commands run without PREFECT_API_URL)",
        description="Commands run without PREFECT_API_URL start a local Prefect server on first use (UI included) and "
        f"reuse it; one per PREFECT_HOME. {server.SWITCH}=false makes each command start a temporary one instead.")
    local.add_argument("action", choices=("status", "stop"), help="status: where it runs (exit 1 if none); stop: stop it")
    local.set_defaults(handler=server_command)


def server_command(args: argparse.Namespace) -> int:
    """Show or stop the local Prefect server of this PREFECT_HOME; return the exit code."""
    from prefect.settings import get_current_settings

    home = Path(get_current_settings().home)
    if args.action == "status":
        local = server.find(home)
        if local is None:
            print(f"no local Prefect server runs for {home}")
            return 1
        health = "answering" if local.healthy() else "starting (not answering yet)"
        print(f"local Prefect server for {home}: {local.url} (pid {local.pid}), {health}; log {home / server.LOG}")
        return 0
    stopped = server.stop(home)
    print(f"stopped the local Prefect server at {stopped.url} (pid {stopped.pid})" if stopped
          else f"no local Prefect server runs for {home}")
    return 0


def run() -> None:
    """Console-script entry point."""
    # At exit Python's cyclic garbage collector walks every object of Prefect, pydantic and pandas (and TensorFlow),
    # a noticeable part of a cached run, to free memory the OS takes back anyway. Registered first, this runs after
    # Prefect has sent its last logs and events; freezing the objects skips that walk.
    atexit.register(gc.freeze)
    sys.exit(main())


if __name__ == "__main__":
    run()

"""Every file and folder name of the two roots (data and artifacts), and of this machine's run-time folders.

Readers import names from here, never through a stage module: a stage's code version is the import closure of its
logic, so where a name lives must not decide what reruns. This module imports nothing.
"""

# Inside every published folder: the names, sizes and SHA-256 of its files, written with them (last on object storage).
MANIFEST = ".manifest.json"

# The data root: one folder per published artifact, named by the first 16 hex digits of its digest.
RAW_DIR = "raw"  # download: the four IDX files, gzipped (and SOURCES_FILE for a source of image files)
PROCESSED_DIR = "processed"  # preprocess: SPLIT_FILES
BATCHES_DIR = "batches"  # a checked batch: SPLIT_FILES["train"], HOLDOUT_FILE, DIGESTS_FILE, BATCH_FILE
SNAPSHOT = ("snapshot", "mnist")  # the verified copy of MNIST shipped with the project, under the checkout's data/

# The artifacts root.
VALIDATION_DIR = "validation"  # validate: VALIDATION_FILE, DIGEST_FILES
MODELS_DIR = "models"  # train: MODEL_FILE, HISTORY_FILE, CONFIG_FILE
EVALUATION_DIR = "evaluation"  # evaluate: METRICS_FILE, PREDICTIONS_FILE
REPORTS_DIR = "reports"  # report: REPORT_MD, REPORT_HTML and the FIGURES
PREDICT_INPUTS_DIR = "predict-inputs"  # predict: INPUTS_FILE, COUNTS_FILE
PREDICT_SCORES_DIR = "predict-scores"  # predict: PROBABILITIES_FILE
PREDICTIONS_DIR = "predictions"  # predict: PREDICTIONS_FILE
SWEEPS_DIR = "sweeps"  # sweep: SWEEP_MD, SWEEP_HTML, SWEEP_PNG
TRAIN_STATE_DIR = "train-state"  # an interrupted training's last finished epoch, one folder per training
QUARANTINE_DIR = "quarantine"  # `<batch name>.json`: the BATCH_FILE of each batch quarantined by the last run
REGISTRY_DIR = "registry"  # CHAMPIONS_DIR, DECISIONS_FILE, REGISTRY_LOCK (and CHAMPION_FILE of earlier versions)
CACHE_DIR = "cache"  # Prefect's result records, by cache key
KEYS_DIR = "keys"  # under CACHE_DIR: what each recorded key covers, `<key>.json`

# Files of the artifacts.
SOURCES_FILE = "sources.json"
SUCCESS_MARKER = "_SUCCESS"  # written last into a complete batch
HOLDOUT_FILE = "holdout.parquet"
DIGESTS_FILE = "digests.bin"  # 16 bytes per image: the BLAKE2 digest of its pixels
BATCH_FILE = "batch.json"
VALIDATION_FILE = "validation.json"
DIGEST_FILES = {"train": "train-digests.bin", "test": "test-digests.bin"}  # as DIGESTS_FILE, per split
SPLIT_FILES = {"train": "train.parquet", "test": "test.parquet"}
MODEL_FILE = "model.keras"
HISTORY_FILE = "history.json"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.parquet"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
FIRST20_PNG = "first20.png"
CURVES_PNG = "training_curves.png"
CONFUSION_PNG = "confusion_matrix.png"
MISCLASSIFIED_PNG = "misclassified.png"
INPUTS_FILE = "pixels.parquet"
COUNTS_FILE = "counts.json"
PROBABILITIES_FILE = "probabilities.parquet"
SWEEP_MD = "sweep.md"
SWEEP_HTML = "sweep.html"
SWEEP_PNG = "accuracy.png"
TRAIN_STATE_FILE = "state.json"
CHAMPIONS_DIR = "champions"  # `<dataset key>.json`: each dataset's champion
CHAMPION_FILE = "champion.json"  # the one champion of a registry written before datasets had their own
DECISIONS_FILE = "history.jsonl"
REGISTRY_LOCK = ".lock"

# This machine's run-time state, in the system temp folder: never artifacts, so a failed run leaves the roots as
# they were.
STAGE_SCRATCH_DIR = "mnist-pipeline-stages"  # a stage's local copies of inputs on object storage
LOCKS_DIR = "mnist-pipeline-locks"  # flock stage locks, one folder per cache

"""Where every run and model artifact lives, relative to the store root.

Both runners (local and Kubeflow) write here, and the bot only reads from here, so
the bot never depends on which runner ran a pipeline.
"""
STEPS = ("ingest", "validate", "train", "embed", "index", "evaluate", "deploy")


def run_prefix(run_id: str) -> str:
    return f"runs/{run_id}/"


def step_key(run_id: str, step: str) -> str:
    """JSON: {step, state: running|done|failed|skipped, started_at, finished_at, seconds,
    summary: {...}, error}. Overwritten while the step runs (train writes epoch progress)."""
    return f"runs/{run_id}/steps/{step}.json"


def report_key(run_id: str) -> str:
    return f"runs/{run_id}/report.json"


def confusion_png_key(run_id: str) -> str:
    return f"runs/{run_id}/confusion.png"


def confusion_csv_key(run_id: str) -> str:
    return f"runs/{run_id}/confusion.csv"


def data_card_key(run_id: str) -> str:
    return f"runs/{run_id}/data_card.json"


def candidate_prefix(run_id: str) -> str:
    """The run's model package, kept whether deployed or held, so 'Promote anyway' works."""
    return f"runs/{run_id}/candidate/"


def model_prefix(model: str) -> str:
    return f"models/{model}/"


def version_prefix(model: str, version: int) -> str:
    return f"models/{model}/v{version}/"


def alias_key(model: str, alias: str = "production") -> str:
    """JSON: {version, updated_at, history: [{version, action, by, at, run_id}]}.
    One PUT replaces it whole, so moving the alias is atomic."""
    return f"models/{model}/{alias}.json"

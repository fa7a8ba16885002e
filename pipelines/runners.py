"""What every runner shares: the Runner protocol and closing a run's books.

    runner = ctbot.wiring.build_runner(settings, store)
    external_id, external_url = runner.submit(run_id, data_uris, params, eval_uri)
    runner.poll(run_id, external_id)   # "running" | "succeeded" | "failed" | "canceled"
    runner.cancel(run_id, external_id)

pipelines.local_runner starts ``python -m ctbot.cli pipeline run --runner local`` as a
detached process (pipelines.local_run inside it), so the bot stays small and a run
outlives a bot restart. pipelines.kfp_runner sends the compiled pipeline to a Kubeflow
Pipelines cluster. Either way the results land in the store (steps.results). No torch,
and kfp only inside the functions that need it.
"""
from __future__ import annotations

from typing import Protocol

from pipelines.report import CANCELED, finalize_run
from steps.results import read_report

RUN_STATES = ("running", "succeeded", "failed", "canceled")
PIPELINE_DESCRIPTION = "ctbot: MNIST ArcFace + faiss continuous training (uploaded by ctbot)"


class Runner(Protocol):
    def submit(self, run_id: str, data_uris: list[str], params: dict, eval_uri: str, *,
               sweep: list | None = None, requested_by: str = "") -> tuple[str, str]: ...

    def poll(self, run_id: str, external_id: str) -> str: ...

    def cancel(self, run_id: str, external_id: str) -> None: ...



def status_of(report: dict) -> str:
    status = report.get("status")
    return status if status in ("succeeded", "canceled") else "failed"


def write_canceled_report(store, run_id: str, *, model: str, by: str = "") -> dict:
    """Close a canceled run's books, unless it already finished on its own."""
    existing = read_report(store, run_id)
    if existing is not None:
        return existing
    why = f"canceled by {by}" if by else "canceled"
    return finalize_run(store, run_id, model=model, pipeline_state=CANCELED, pipeline_error=why)

"""The Slack Web API client as ctbot uses it: 429s are waited out, not failed."""
from __future__ import annotations

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_handlers import RateLimitErrorRetryHandler

from core import metrics


class _CountedRateLimitRetries(RateLimitErrorRetryHandler):
    """Counts each 429 it waits out (ctbot_slack_api_rate_limited_total)."""

    def prepare_for_next_attempt(self, *, state, request, response=None, error=None):
        metrics.slack_call(request.url.rsplit("/", 1)[-1], status=429)
        super().prepare_for_next_attempt(state=state, request=request, response=response, error=error)


class CountingWebClient(WebClient):
    """A WebClient that counts its calls and failures per method for /metrics."""

    def api_call(self, api_method: str, **kwargs):
        try:
            resp = super().api_call(api_method, **kwargs)
        except SlackApiError as e:
            metrics.slack_call(api_method, status=e.response.status_code, error=str(e.response.get("error") or "error"))
            raise
        except Exception as e:
            metrics.slack_call(api_method, error=type(e).__name__)
            raise
        metrics.slack_call(api_method)
        return resp


def with_rate_limit_retries(client: WebClient, max_retry_count: int = 3) -> WebClient:
    """Make ``client`` wait out HTTP 429 (Retry-After) instead of failing; idempotent."""
    if not any(isinstance(h, RateLimitErrorRetryHandler) for h in client.retry_handlers):
        client.retry_handlers.append(_CountedRateLimitRetries(max_retry_count=max_retry_count))
    return client


def slack_client(token: str, base_url: str = "") -> WebClient:
    kwargs = {"base_url": base_url} if base_url else {}
    return with_rate_limit_retries(CountingWebClient(token=token or None, **kwargs))


def group_members(client: WebClient):
    """members_of(group_id) for core.access: Slack's usergroups.users.list."""
    def members_of(group: str) -> list[str]:
        try:
            return list(client.usergroups_users_list(usergroup=group).get("users") or [])
        except SlackApiError as e:   # core.access words it for people: say what Slack said
            raise LookupError(f"usergroups.users.list answered {_slack_error(e)}") from None
    return members_of


def _slack_error(e: SlackApiError) -> str:
    status = getattr(e.response, "status_code", None)
    error = e.response.get("error") if hasattr(e.response, "get") else None
    return f"`{error}`" if error else f"HTTP {status}"

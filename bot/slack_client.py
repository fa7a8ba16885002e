"""The Slack Web API client as ctbot uses it: 429s are waited out, not failed."""
from __future__ import annotations

from slack_sdk import WebClient
from slack_sdk.http_retry.builtin_handlers import RateLimitErrorRetryHandler


def with_rate_limit_retries(client: WebClient, max_retry_count: int = 3) -> WebClient:
    """Make ``client`` wait out HTTP 429 (Retry-After) instead of failing; idempotent."""
    if not any(isinstance(h, RateLimitErrorRetryHandler) for h in client.retry_handlers):
        client.retry_handlers.append(RateLimitErrorRetryHandler(max_retry_count=max_retry_count))
    return client


def slack_client(token: str, base_url: str = "") -> WebClient:
    kwargs = {"base_url": base_url} if base_url else {}
    return with_rate_limit_retries(WebClient(token=token or None, **kwargs))

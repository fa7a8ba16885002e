"""The audit trail outlives Redis's 10k cap: two real `ctbot serve` replicas archive the
stream to the store (both running the archiver, one SIGKILLed mid-way, S3 failing now
and then), every entry lands in the archive exactly once, and `ctbot audit --since …
--user … --action … --outcome … --format json` finds a refusal the stream no longer holds."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from core.audit import AuditArchive
from core.state import AUDIT_MAXLEN
from tests.helpers import wait_until as wait
from tests.reliability.conftest import ROOT

pytestmark = pytest.mark.timeout(900)

MALLORY = "U0MALLORY"      # on no access list


def archived_ids(world) -> list[str]:
    return [e["id"] for e in AuditArchive(world.state(), world.store).archived_all()]


def test_audit_entries_outlive_the_redis_cap_and_ctbot_audit_finds_them(world, ledger):
    mark = ledger.mark()
    state = world.state()
    fast = {"CT_AUDIT__ARCHIVE_SECONDS": "1"}
    a, b = world.bot(**fast), world.bot(**fast)

    # A refused deploy, recorded by the bot as it records every refusal.
    status, ack, *_ = a.slash("deploy r-20261201-0900-aaaa", user=MALLORY)
    assert status == 200
    refusal = wait(lambda: next((e for e in state.read_audit(20) if e.get("who") == MALLORY), None), 60,
                   "the refusal in the audit")
    assert refusal.get("outcome") == "refused" and refusal.get("requested") == "deploy", refusal

    # Then more than the stream's cap, in chunks, while both replicas archive.
    added, chunk = [refusal["id"]], 1500
    for i in range((AUDIT_MAXLEN + 2 * chunk) // chunk):
        pipe = state.r.pipeline()
        for j in range(chunk):
            pipe.xadd(state.k("audit"), {"action": "schedule_paused", "who": "U0FILLER1", "at": "2026-01-01",
                                         "n": str(i * chunk + j)}, maxlen=AUDIT_MAXLEN, approximate=True)
        added += pipe.execute()
        if i == 1:
            a.kill()
            ledger.fault("SIGKILL of an archiving replica")
            world.proxy.fail_next(3, status=503)
            ledger.fault("S3 503 x3 while archiving")
        wait(lambda last=added[-1]: AuditArchive(state, world.store).cursor() == last, 300,
             f"the archive to catch up with chunk {i + 1}")
    assert state.r.xrange(state.k("audit"), min=refusal["id"], max=refusal["id"]) == []   # gone from Redis
    ledger.fault(f"{len(added)} entries through a stream capped at {AUDIT_MAXLEN}")

    ids = archived_ids(world)
    added_set = set(added)
    ledger.lost += len(added_set - set(ids))
    ledger.duplicated += len(ids) - len(set(ids))
    assert len(ids) == len(set(ids)) and added_set <= set(ids)

    # ctbot audit reads the store for what Redis no longer holds.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CT_", "SLACK_"))}
    env.update({"REDIS_URL": world.redis.url, "CT_STORE": f"s3://{world.bucket}/", "S3_ENDPOINT_URL": world.s3_url})
    out = subprocess.run([sys.executable, "-m", "ctbot.cli", "audit", "--since", "7d", "--user", MALLORY,
                          "--action", "deploy", "--outcome", "refused", "--format", "json"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [e["id"] for e in lines] == [refusal["id"]]
    assert lines[0]["who"] == MALLORY and lines[0]["outcome"] == "refused"

    bad = subprocess.run([sys.executable, "-m", "ctbot.cli", "audit", "--since", "last tuesday"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    ledger.bad_inputs += 1
    assert bad.returncode == 2 and "--since 'last tuesday'" in bad.stderr
    b.kill()
    ledger.survived_since(mark)

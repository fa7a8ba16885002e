"""One validated configuration: defaults < YAML file < environment < keywords, typed and
range-checked, unknown names refused with a suggestion, secrets never shown."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import SecretStr

from core.config import ConfigError, Section, Settings, load_settings, masked, reveal
from ctbot import config_cmd
from ctbot.cli import command_of, main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "ctbot.example.yaml"

# The defaults before settings moved to pydantic: changing one is a visible decision.
DEFAULTS = {
    "slack_bot_token": "", "slack_signing_secret": "", "slack_app_token": "", "slack_api_url": "",
    "slack_channel": "#ct", "slash_command": "/ct", "http_host": "127.0.0.1", "http_port": 3000,
    "slack_min_update_seconds": 3.0, "redis_url": "", "store": "./.ctbot/store", "data_prefix": "data/",
    "eval_uri": "", "model_name": "mnist-arcface", "keep_versions": 5, "runner": "local", "kfp_host": "",
    "kfp_experiment": "ctbot", "resources": "", "run_workdir": "./.ctbot/runs", "deploy_floor": 0.97,
    "deploy_tolerance": 0.002, "timezone": "UTC", "retrain_day": "tue", "retrain_time": "09:00",
    "data_watch_minutes": 10.0, "data_sweep_minutes": 60.0, "run_watch_seconds": 5.0,
    "new_data_threshold": 1, "auto_retrain": False, "misfire_grace_seconds": 21600,
    "kfp_namespace": "", "kfp_ui_url": "", "kfp_token": "", "kfp_token_path": "", "kfp_timeout_seconds": 30.0,
    "kfp_retries": 4, "image": "", "log_format": "text",
    # added with the Slack outbox and crash recovery (issue 9)
    "schedule.catch_up": True, "schedule.retry_window_minutes": 360.0, "schedule.retry_first_seconds": 30.0,
    "schedule.retry_max_seconds": 900.0, "outbox_drain_seconds": 2.0, "command_resume_seconds": 10.0,
    "command_stale_seconds": 300.0, "finish_retry_seconds": 30.0,
    # the model server's section (issue 10)
    "serving.url": "", "serving.host": "127.0.0.1", "serving.port": 8080, "serving.poll_seconds": 2.0,
    "serving.max_body_bytes": 8 << 20, "serving.max_batch": 256, "serving.threads": 1,
    "serving.search": "ivf",
    # the model server's processes and limits (issue 19)
    "serving.workers": 0, "serving.infer_threads": 2, "serving.batch_wait_ms": 0.0,
    "serving.max_batch_images": 64, "serving.probe_port": 8081,
    "serving.max_header_bytes": 16384, "serving.max_headers": 100, "serving.max_connections": 1000,
    "serving.keepalive_seconds": 5.0, "serving.request_seconds": 30.0, "serving.graceful_seconds": 25.0,
    # who may act (issue 8): secure by default for deploy, rollback and approve
    "access.train": ["*"], "access.deploy": [], "access.rollback": [], "access.cancel": ["*"],
    "access.schedule": ["*"], "access.approve": [], "access.channels": [], "access.team_id": "",
    "deploy.require_approval": False, "deploy.allow_self_approval": False, "deploy.approval_timeout_hours": 72.0,
    # the outbox gives up only after a day (issue 18)
    "outbox.give_up_hours": 24.0, "outbox.max_backoff_seconds": 300.0, "outbox.time_scale": 1.0,
    "audit.archive_seconds": 60.0,
    # the bot's front door and the ack path's Redis timeout (issue 19)
    "redis_ack_timeout_seconds": 0.3, "redis_timeout_seconds": 5.0,
    "http.probe_port": 3001, "http.max_header_bytes": 16 << 10, "http.max_headers": 100,
    "http.max_body_bytes": 1 << 20, "http.max_connections": 1000, "http.request_seconds": 10.0,
    "http.keepalive_seconds": 5.0, "http.ack_threads": 4, "http.shutdown_seconds": 20.0,
    # continuous-training modes (issue 21)
    "schedule.mode": "full", "ct.on_new_data": "alert", "ct.refresh.max_in_a_row": 5,
    # the App Home tab republished after changes (issue 22)
    "home_refresh_seconds": 10.0, "sweep.max_trials": 8,
}


def write(tmp_path, text: str, name="ct.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def problems(**kw) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_settings(**kw)
    return e.value.problems


def plain(settings) -> dict:
    return {k: reveal(v) if isinstance(v, SecretStr) else v for k, v in settings.leaves()}


# ------------------------------------------------------------------------ defaults


def test_defaults_unchanged():
    assert plain(Settings()) == DEFAULTS
    assert plain(load_settings(env={})) == DEFAULTS


def test_example_file_lists_every_key_at_its_default_with_a_comment():
    data = yaml.safe_load(EXAMPLE.read_text())
    assert sorted(data) == sorted(Settings.model_fields)
    assert plain(load_settings(EXAMPLE, env={})) == DEFAULTS
    for line in EXAMPLE.read_text().splitlines():
        if line and not line.startswith("#"):
            assert "  # " in line, f"undocumented: {line}"


def test_keyword_construction_is_exactly_its_arguments(monkeypatch):
    monkeypatch.setenv("CT_HTTP_PORT", "4000")
    monkeypatch.setenv("CT_NOT_A_SETTING", "x")
    s = Settings(slack_bot_token="xoxb-test", store="/tmp/s", redis_url="redis://r", deploy_floor=0.5)
    assert (s.http_port, s.store, s.deploy_floor, reveal(s.slack_bot_token)) == (3000, "/tmp/s", 0.5, "xoxb-test")


# ------------------------------------------------------------------------ sources


def test_environment_beats_file_and_keywords_beat_both(tmp_path):
    f = write(tmp_path, 'http_port: 4000\nslack_channel: "#from-file"\nauto_retrain: true\n')
    s = load_settings(f, env={"CT_HTTP_PORT": "5000", "CT_AUTO_RETRAIN": "off"}, store="/kw")
    assert (s.http_port, s.slack_channel, s.auto_retrain, s.store, s.keep_versions) == (
        5000, "#from-file", False, "/kw", 5)
    assert s.origin("http_port") == "env CT_HTTP_PORT"
    assert s.origin("slack_channel") == f"file {f}"
    assert s.origin("store") == "argument"
    assert s.origin("keep_versions") == "default"


def test_ct_config_names_the_file_and_an_explicit_one_wins(tmp_path):
    a, b = write(tmp_path, "http_port: 1111\n", "a.yaml"), write(tmp_path, "http_port: 2222\n", "b.yaml")
    assert load_settings(env={"CT_CONFIG": str(a)}).http_port == 1111
    assert Settings.from_env({"CT_CONFIG": str(a)}).http_port == 1111
    assert load_settings(b, env={"CT_CONFIG": str(a)}).http_port == 2222


SAMPLES = {"http_port": "8080", "deploy_floor": "0.5", "auto_retrain": "true", "runner": "kfp",
           "retrain_day": "mon,thu", "retrain_time": "06:30", "timezone": "Asia/Seoul", "keep_versions": "3",
           "slack_min_update_seconds": "1.5", "data_watch_minutes": "2", "data_sweep_minutes": "30",
           "run_watch_seconds": "1", "new_data_threshold": "4", "misfire_grace_seconds": "60",
           "deploy_tolerance": "0.01", "slack_channel": "#x", "slash_command": "/x",
           "kfp_timeout_seconds": "5", "kfp_retries": "1", "log_format": "json",
           "outbox_drain_seconds": "5", "command_resume_seconds": "3", "command_stale_seconds": "60",
           "finish_retry_seconds": "10", "redis_ack_timeout_seconds": "0.5", "redis_timeout_seconds": "2",
           "home_refresh_seconds": "30"}
SECTIONS = [f for f, info in Settings.model_fields.items() if isinstance(info.annotation, type)
            and issubclass(info.annotation, Section)]


def test_a_section_key_has_its_ct_variable():
    assert Settings.from_env({"CT_SCHEDULE__CATCH_UP": "false"}).schedule.catch_up is False


SECTION_SAMPLES = {"serving.url": "http://model:8080", "serving.host": "0.0.0.0", "serving.port": "9090",
                   "serving.poll_seconds": "0.5", "serving.max_body_bytes": "2048", "serving.max_batch": "8",
                   "serving.threads": "0", "serving.search": "exact"}


@pytest.mark.parametrize("key", sorted(SECTION_SAMPLES))
def test_every_serving_key_has_its_ct_variable(key):
    var = "CT_" + key.upper().replace(".", "__")
    s = Settings.from_env({var: SECTION_SAMPLES[key]})
    assert plain(s)[key] != DEFAULTS[key] and str(plain(s)[key]) == SECTION_SAMPLES[key]
    assert s.origin(key) == f"env {var}"


@pytest.mark.parametrize("raw", ["U0ADMIN,S0MLOPS", '["U0ADMIN", "S0MLOPS"]'])
def test_access_lists_from_the_environment(raw):
    s = Settings.from_env({"CT_ACCESS__DEPLOY": raw, "CT_DEPLOY__REQUIRE_APPROVAL": "true"})
    assert s.access.deploy == ["U0ADMIN", "S0MLOPS"] and s.deploy.require_approval is True


def test_access_lists_refuse_what_is_not_a_slack_id():
    [p] = problems(env={"CT_ACCESS__ROLLBACK": "bob"})
    assert p.startswith("access.rollback: ") and "U…/W… for users, S… for user groups" in p


@pytest.mark.parametrize("var, raw", [("SERVING__PORT", "70000"), ("SERVING__POLL_SECONDS", "0"),
                                      ("SERVING__MAX_BATCH", "0"), ("SERVING__THREADS", "-1")])
def test_serving_values_out_of_range_are_refused(var, raw):
    [p] = problems(env={f"CT_{var}": raw})
    assert p.startswith(var.lower().replace("__", ".") + ": ") and p.endswith(f"(from env CT_{var})")


@pytest.mark.parametrize("field", [f for f in Settings.model_fields if f not in SECTIONS])
def test_every_field_has_its_ct_variable(field):
    raw = SAMPLES.get(field, "value-" + field)
    got = plain(Settings.from_env({f"CT_{field.upper()}": raw}))[field]
    assert got == plain(Settings(**{field: raw}))[field] != DEFAULTS[field]
    assert Settings.from_env({f"CT_{field.upper()}": raw}).origin(field) == f"env CT_{field.upper()}"


def test_plain_names_kept_and_win_over_their_ct_twin():
    s = Settings.from_env({"SLACK_BOT_TOKEN": "xoxb-plain", "CT_SLACK_BOT_TOKEN": "xoxb-ct",
                           "SLACK_SIGNING_SECRET": "sig", "SLACK_APP_TOKEN": "xapp-1",
                           "REDIS_URL": "redis://h:6379/0", "SLACK_API_URL": "http://127.0.0.1:9/api/"})
    assert reveal(s.slack_bot_token) == "xoxb-plain" and s.origin("slack_bot_token") == "env SLACK_BOT_TOKEN"
    assert (reveal(s.slack_signing_secret), reveal(s.slack_app_token)) == ("sig", "xapp-1")
    assert (s.redis_url, s.slack_api_url) == ("redis://h:6379/0", "http://127.0.0.1:9/api/")


def test_other_tools_variables_and_empty_ones_are_let_by():
    s = Settings.from_env({"CT_IMAGE": "img", "S3_ENDPOINT_URL": "http://s3", "AWS_ACCESS_KEY_ID": "k",
                           "CT_HTTP_PORT": "", "PATH": "/bin"})
    assert s.http_port == 3000


def test_settings_survive_pickling_for_the_job_workers(tmp_path):
    s = load_settings(write(tmp_path, "http_port: 4000\n"), env={"SLACK_BOT_TOKEN": "xoxb-1"})
    back = pickle.loads(pickle.dumps(s))
    assert (back.http_port, reveal(back.slack_bot_token), back.origin("http_port")) == (
        4000, "xoxb-1", s.origin("http_port"))


# ------------------------------------------------------------------------ nested sections


class Access(Section):
    admins: list[str] = []
    channel_only: bool = False


class WithAccess(Settings):
    access: Access = Access()


def test_nested_section_from_file_and_double_underscore_env(tmp_path):
    f = write(tmp_path, "access:\n  admins: [U1]\n  channel_only: true\n")
    s = WithAccess.load(f, env={"CT_ACCESS__ADMINS": "U2, U3"})
    assert s.access.admins == ["U2", "U3"] and s.access.channel_only is True
    assert s.origin("access.admins") == "env CT_ACCESS__ADMINS"
    assert s.origin("access.channel_only") == f"file {f}"
    assert WithAccess.load(env={"CT_ACCESS__ADMINS": '["U4"]'}).access.admins == ["U4"]
    assert ("access.admins", ["U2", "U3"]) in list(s.leaves())


def test_nested_unknown_keys_name_the_nearest(tmp_path):
    with pytest.raises(ConfigError) as e:
        WithAccess.load(write(tmp_path, "access:\n  admin: [U1]\n"), env={"CT_ACCESS__CHANNEL_ONY": "1"})
    assert any("access.admin: unknown key" in p and "did you mean admins?" in p for p in e.value.problems)
    assert any("CT_ACCESS__CHANNEL_ONY" in p and "did you mean CT_ACCESS__CHANNEL_ONLY?" in p
               for p in e.value.problems)


# ------------------------------------------------------------------------ errors


def test_unknown_file_key_names_the_nearest(tmp_path):
    [p] = problems(config_file=write(tmp_path, "retrain_dya: tue\n"), env={})
    assert "retrain_dya" in p and "did you mean retrain_day?" in p


def test_unknown_ct_variable_names_the_nearest():
    [p] = problems(env={"CT_HTTP_PROT": "8080"})
    assert p == "unknown environment variable CT_HTTP_PROT; did you mean CT_HTTP_PORT?"


def test_unknown_keyword_names_the_nearest():
    [p] = problems(env={}, deploy_flor=0.5)
    assert "did you mean deploy_floor?" in p


def test_a_misspelt_key_a_wrong_type_and_a_bad_range_are_all_named(tmp_path):
    f = write(tmp_path, "slack_chanel: '#x'\nhttp_port: lots\ndeploy_floor: 1.5\n")
    found = problems(config_file=f, env={})
    assert len(found) == 3
    assert any(p.startswith("slack_chanel: unknown key") and "did you mean slack_channel?" in p for p in found)
    assert any(p.startswith("http_port: Input should be a valid integer") and "'lots'" in p for p in found)
    assert any(p.startswith("deploy_floor: Input should be less than or equal to 1") for p in found)
    assert all(f"file {f}" in p for p in found)


@pytest.mark.parametrize("var, raw", [
    ("HTTP_PORT", "70000"), ("HTTP_PORT", "-1"), ("DEPLOY_FLOOR", "1.01"), ("DEPLOY_TOLERANCE", "-0.1"),
    ("DATA_WATCH_MINUTES", "0"), ("DATA_SWEEP_MINUTES", "-5"), ("RUN_WATCH_SECONDS", "0"), ("RUNNER", "k8s"),
    ("RETRAIN_DAY", "2"), ("RETRAIN_DAY", "tues"), ("RETRAIN_TIME", "24:00"), ("RETRAIN_TIME", "9am"),
    ("TIMEZONE", "Mars/Olympus"), ("AUTO_RETRAIN", "sometimes"), ("KEEP_VERSIONS", "0"), ("SLASH_COMMAND", "ct"),
])
def test_out_of_range_values_are_refused_with_their_source(var, raw):
    [p] = problems(env={f"CT_{var}": raw})
    assert p.startswith(f"{var.lower()}: ") and p.endswith(f"(from env CT_{var})")


def test_day_names_are_normalised():
    assert Settings(retrain_day="Mon-Fri").retrain_day == "mon-fri"


def test_yaml_pitfalls_get_a_hint(tmp_path):
    found = problems(config_file=write(tmp_path, "retrain_time: 9:30\nslack_channel: #ct\n"), env={})
    assert any('quote it, e.g. "09:30"' in p for p in found)
    assert any(p.startswith("slack_channel: empty value") for p in found)


@pytest.mark.parametrize("text, expect", [("- a\n- b\n", "expected a mapping"), ("a: [1\n", "not valid YAML")])
def test_a_file_that_is_not_a_settings_mapping(tmp_path, text, expect):
    [p] = problems(config_file=write(tmp_path, text), env={})
    assert expect in p


def test_a_missing_file_is_a_config_error(tmp_path):
    [p] = problems(config_file=tmp_path / "nope.yaml", env={})
    assert p.endswith("nope.yaml: not found")


# ------------------------------------------------------------------------ secrets


def test_secrets_are_masked_in_repr_show_and_errors(tmp_path, monkeypatch, capsys):
    s = Settings.from_env({"SLACK_BOT_TOKEN": "xoxb-very-secret", "SLACK_SIGNING_SECRET": "sig-secret"})
    assert "xoxb-very-secret" not in repr(s) and "sig-secret" not in str(s)
    assert masked("slack_bot_token", s.slack_bot_token) == "***"
    assert masked("slack_app_token", s.slack_app_token) == ""

    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-very-secret")
    assert main(["config", "show"]) == 0
    out = capsys.readouterr().out
    assert "xoxb-very-secret" not in out
    assert 'slack_bot_token: "***"' in out and "# env SLACK_BOT_TOKEN" in out

    # A secret of the wrong type is named, its value not echoed.
    [p] = problems(config_file=write(tmp_path, "slack_signing_secret: 123456789\n"), env={})
    assert p.startswith("slack_signing_secret:") and "123456789" not in p


def test_show_gives_each_value_and_its_source(tmp_path, monkeypatch, capsys):
    for k in [k for k in os.environ if k.startswith("CT_")]:
        monkeypatch.delenv(k)
    f = write(tmp_path, "keep_versions: 9\n")
    monkeypatch.setenv("CT_RUNNER", "kfp")
    assert main(["--config", str(f), "config", "show"]) == 0
    lines = {line.split(":")[0]: line for line in capsys.readouterr().out.splitlines()}
    assert lines["keep_versions"].split("#")[1].strip() == f"file {f}"
    assert lines["runner"].replace(" ", "") == 'runner:"kfp"#envCT_RUNNER'
    assert lines["http_port"].endswith("# default")
    nested = config_cmd.render(WithAccess.load(env={"CT_ACCESS__ADMINS": "U1"}))
    assert "access:" in nested and any(line.startswith('  admins: ["U1"]') for line in nested)


# ------------------------------------------------------------------------ the command line


def test_command_found_past_the_config_option():
    assert command_of(["--config", "serve.yaml", "serve", "--port", "1"]) == "serve"
    assert command_of(["--config=x.yaml", "config", "show"]) == "config"


def ctbot(*args, env=None):
    full = {k: v for k, v in os.environ.items() if not k.startswith("CT_")}
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "ctbot.cli", *args], capture_output=True, text=True,
                          env=full, cwd=ROOT, timeout=120)


def test_cli_config_check_ok_and_every_problem(tmp_path):
    ok = ctbot("config", "check", str(EXAMPLE))
    assert (ok.returncode, ok.stdout.strip()) == (0, f"{EXAMPLE}: ok")
    bad = write(tmp_path, "htp_port: 1\nhttp_port: abc\nkeep_versions: 0\n")
    r = ctbot("config", "check", str(bad))
    assert r.returncode == 2
    for name in ("htp_port", "http_port", "keep_versions"):
        assert f"  {name}: " in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args, env", [
    (["serve"], {"CT_HTTP_PORT": "abc"}),
    (["scheduler"], {"CT_RETRAIN_DAY": "2"}),
    (["pipeline", "run"], {"CT_DEPLOY_FLOR": "0.5"}),
    (["--config", "/nonexistent/ct.yaml", "serve"], {}),
])
def test_bad_config_stops_a_command_with_one_line(args, env):
    r = ctbot(*args, env=env)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    [line] = r.stderr.strip().splitlines()
    assert line.startswith("ctbot: config error: ")
    if env.get("CT_HTTP_PORT"):
        assert line.endswith("got 'abc' (from env CT_HTTP_PORT)")


@pytest.mark.parametrize("var, raw", [("CT_ACCESS", "{bad"), ("CT_ACCESS__DEPLOY", "[bad")])
def test_bad_json_from_the_environment_names_the_variable(var, raw):
    [p] = problems(env={var: raw})
    assert p.startswith("access: not valid JSON in " + var)

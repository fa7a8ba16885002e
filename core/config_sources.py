"""Where settings come from: pydantic-settings' own YAML and environment sources, plus
the thin layer they lack.

The library reads the file (``YamlConfigSettingsSource``) and the environment
(``EnvSettingsSource``: the CT_ prefix, ``__`` for nested sections, JSON for lists and
sections, an empty variable as unset). Added here, because the library has no hook for
them:

- unknown keys and unknown CT_ variables are errors naming the nearest valid one (the
  library ignores unknown variables, and pydantic's "extra inputs" error names no
  alternative);
- a missing file is an error (the library skips it silently) and a YAML document that is
  not a mapping is refused (the library would ``dict.update`` with it);
- a list may be given as a comma list (``CT_ACCESS__DEPLOY=U1,S2``) as well as JSON;
- Slack's and Redis's usual names (SLACK_BOT_TOKEN, REDIS_URL…) win over their CT_ twin;
- the origin of every value (default, file, env NAME, argument) for ``ctbot config show``
  and for error messages; the library keeps none;
- every problem of a file and the environment at once, not the first.
"""
from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, get_origin

import yaml
from pydantic import BaseModel
from pydantic_settings import EnvSettingsSource, SettingsError, YamlConfigSettingsSource
from pydantic_settings.sources.utils import parse_env_vars

ENV_PREFIX = "CT_"
NESTED_DELIMITER = "__"
SECRET_FIELDS = {"slack_bot_token", "slack_signing_secret", "slack_app_token", "kfp_token"}
# Names older than the CT_ prefix (Slack's and Redis's usual ones); they win over CT_<FIELD>.
PLAIN_ENV = {"SLACK_BOT_TOKEN": "slack_bot_token", "SLACK_SIGNING_SECRET": "slack_signing_secret",
             "SLACK_APP_TOKEN": "slack_app_token", "REDIS_URL": "redis_url", "SLACK_API_URL": "slack_api_url"}
# CT_ names that are not settings but are read elsewhere; the unknown-name check lets them by.
OTHER_CT_ENV = {
    "CT_CONFIG": "the config file",
    "CT_VENV": "dev.sh's virtualenv",
    "CT_UPDATE_FIXTURES": "regenerates test fixtures",
    "CT_CRASH_AT": "the fault-injection suite's crash points (steps/crashpoints.py)",
    "CT_PAUSE_AT": "the fault-injection suite's pause points (steps/crashpoints.py)",
}

class ConfigError(Exception):
    """Bad configuration; ``problems`` holds one line per problem, all of them at once."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))



def read_sources(cls: type[BaseModel], config_file, env: Mapping[str, str] | None,
                 overrides: dict) -> tuple[dict, dict[str, str], list[str]]:
    """Defaults < ``config_file`` (or $CT_CONFIG) < ``env`` (default os.environ) <
    ``overrides``: (the merged values, each dotted key's origin, every problem found)."""
    env = os.environ if env is None else env
    config_file = config_file or env.get("CT_CONFIG") or None
    problems: list[str] = []
    origins: dict[str, str] = {}
    file_values = _read_file(cls, Path(config_file), origins, problems) if config_file else {}
    env_values = _read_env(cls, env, origins, problems)
    for key in overrides:
        if key not in cls.model_fields:
            problems.append(f"{key}: unknown setting{_did_you_mean(key, cls.model_fields)}")
        else:
            origins[key] = "argument"
    overrides = {k: v for k, v in overrides.items() if k in cls.model_fields}
    return _merge(_merge(file_values, env_values), overrides), origins, problems


def _section(annotation) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def leaves(model: BaseModel, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            yield from leaves(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", value


def _did_you_mean(name: str, valid, fmt=str) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f"; did you mean {fmt(close[0])}?" if close else ""


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class _YamlSource(YamlConfigSettingsSource):
    """pydantic-settings' YAML source. A document that is not a mapping is refused here:
    the library would update a dict with it (a list of two-letter strings becomes keys)."""

    def _read_file(self, file_path):
        data = super()._read_file(file_path)
        if not isinstance(data, dict):
            raise _NotAMapping(type(data).__name__)
        return data


class _NotAMapping(Exception):
    pass


def _read_file(cls: type[BaseModel], path: Path, origins: dict, problems: list) -> dict:
    where = f"file {path}"
    try:
        path.open().close()   # the library skips a missing file silently; here it is an error
        data = _YamlSource(cls, yaml_file=path).yaml_data
    except FileNotFoundError:
        problems.append(f"config file {path}: not found")
        return {}
    except OSError as e:
        problems.append(f"config file {path}: {e.strerror or e}")
        return {}
    except yaml.YAMLError as e:
        problems.append(f"config file {path}: not valid YAML: {' '.join(str(e).split())}")
        return {}
    except _NotAMapping as e:
        problems.append(f"config file {path}: expected a mapping of settings, got a {e}")
        return {}
    return _check_keys(cls, data, "", where, origins, problems)


def _check_keys(cls: type[BaseModel], data: dict, prefix: str, where: str, origins: dict, problems: list) -> dict:
    """``data`` without its unknown keys (each one reported), origins recorded."""
    out = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        field = cls.model_fields.get(key) if isinstance(key, str) else None
        if field is None:
            problems.append(f"{dotted}: unknown key in {where}{_did_you_mean(str(key), cls.model_fields)}")
            continue
        section = _section(field.annotation)
        if section is not None and value is None:
            continue  # "access:" with every key commented out: the section's defaults
        if value is None:
            problems.append(f"{dotted}: empty value in {where} (a YAML value starting with # is a comment: "
                            "quote it)")
            continue
        origins[dotted] = where
        out[key] = (_check_keys(section, value, f"{dotted}.", where, origins, problems)
                    if section is not None and isinstance(value, dict) else value)
    return out


def _env_names(cls: type[BaseModel], prefix: str = ENV_PREFIX) -> dict[str, tuple[str, ...]]:
    """CT_ name -> field path, for every field and section."""
    names = {}
    for name, field in cls.model_fields.items():
        env_name = f"{prefix}{name.upper()}"
        names[env_name] = (name,)
        if (section := _section(field.annotation)) is not None:
            for sub, path in _env_names(section, env_name + NESTED_DELIMITER).items():
                names[sub] = (name, *path)
    return names


class _EnvSource(EnvSettingsSource):
    """pydantic-settings' environment source (CT_ prefix, ``__`` for nesting, JSON for
    lists and sections, an empty variable is unset), over a given mapping instead of
    os.environ, and taking a list as a comma list too (CT_ACCESS__DEPLOY=U1,S2)."""

    def __init__(self, settings_cls, env: Mapping[str, str]):
        self._given = env
        super().__init__(settings_cls, case_sensitive=False, env_prefix=ENV_PREFIX,
                         env_nested_delimiter=NESTED_DELIMITER, env_ignore_empty=True)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self._given, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)

    def decode_complex_value(self, field_name: str, field, value: Any) -> Any:
        annotation = getattr(field, "annotation", None)
        is_list = get_origin(annotation) in (list, set, tuple, frozenset) or annotation in (list, set, tuple)
        if is_list and isinstance(value, str) and not value.lstrip().startswith("["):
            return [t.strip() for t in value.split(",") if t.strip()]
        return super().decode_complex_value(field_name, field, value)


def _read_env(cls: type[BaseModel], env: Mapping[str, str], origins: dict, problems: list) -> dict:
    """The environment's settings, read by pydantic-settings. What it lacks is added here:
    unknown CT_ names are errors naming the nearest, Slack's and Redis's plain names
    (PLAIN_ENV) win over their CT_ twin, and each value's origin is recorded."""
    names = _env_names(cls)
    known: dict[str, str] = {}   # CT_ name given to the library -> the variable it came from
    for name in sorted(k for k in env if k.startswith(ENV_PREFIX)):
        if name in names:
            known[name] = name
        elif name not in OTHER_CT_ENV:
            problems.append(f"unknown environment variable {name}{_did_you_mean(name, [*names, *OTHER_CT_ENV])}")
    for plain, field in PLAIN_ENV.items():
        if plain in env and field in cls.model_fields and env[plain] != "":
            known[f"{ENV_PREFIX}{field.upper()}"] = plain
    try:
        values = _EnvSource(cls, {ct: env[src] for ct, src in known.items() if env[src] != ""})()
    except SettingsError as e:   # names only the field: say which variable and why
        field = m[1] if (m := re.search(r'field "([^"]+)"', str(e))) else "settings"
        given = sorted(src for ct, src in known.items() if ct.startswith(f"{ENV_PREFIX}{field.upper()}"))
        problems.append(f"{field}: not valid JSON in {', '.join(given) or 'the environment'}: {e.__cause__ or e} "
                        "(a section is JSON; a list is JSON or a comma list)")
        return {}
    for path in _value_paths(cls, values):
        for i in range(len(path), 0, -1):   # the most specific variable that was given
            ct = ENV_PREFIX + NESTED_DELIMITER.join(path[:i]).upper()
            if ct in known:
                origins[".".join(path)] = f"env {known[ct]}"
                break
    return values


def _value_paths(cls: type[BaseModel], values: dict, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for key, value in values.items():
        section = _section(cls.model_fields[key].annotation) if key in cls.model_fields else None
        if section is not None and isinstance(value, dict):
            yield (*prefix, key)
            yield from _value_paths(section, value, (*prefix, key))
        else:
            yield (*prefix, key)


def describe(err: dict, origins: dict) -> str:
    loc = [str(p) for p in err.get("loc", ())]
    key = ".".join(loc) or "settings"
    msg = err.get("msg", "invalid").removeprefix("Value error, ")
    got = ""
    if "input" in err and not (loc and loc[0] in SECRET_FIELDS) and err.get("type") != "extra_forbidden":
        shown = repr(err["input"])
        got = f", got {shown if len(shown) <= 60 else shown[:57] + '...'}"
    source = next((origins[".".join(loc[:i])] for i in range(len(loc), 0, -1) if ".".join(loc[:i]) in origins),
                  "default")
    return f"{key}: {msg}{got} (from {source})"

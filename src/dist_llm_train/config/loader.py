"""Load a :class:`RunConfig` from presets, YAML files and ``--set key=value`` overrides.

Precedence: defaults < preset/YAML file < ``--set`` overrides (applied in order). Every error is a
:class:`~dist_llm_train.errors.ConfigError` whose message names the field, the value and what is allowed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from dist_llm_train.config.schema import RunConfig
from dist_llm_train.errors import ConfigError

# Presets live in the repository's ``configs/`` (the checkout an editable install points at); a
# ``configs/`` in the working directory is searched too, so a user's own preset folder works alike.
PRESET_DIRS = (Path(__file__).resolve().parents[3] / "configs", Path("configs"))


def _preset_files() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for directory in PRESET_DIRS:
        if directory.is_dir():
            for path in sorted(directory.glob("*.yaml")):
                found.setdefault(path.stem, path)
    return found


def available_presets() -> list[str]:
    """Names of the YAML presets in ``configs/`` (usable as ``--config NAME``)."""
    return sorted(_preset_files())


def _resolve_config_path(config: str) -> Path:
    path = Path(config)
    if path.is_file():
        return path
    preset = _preset_files().get(config)
    if preset is not None:
        return preset
    known = ", ".join(available_presets()) or "none"
    raise ConfigError(f"config '{config}' is neither a file nor a preset (presets: {known})")


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping; an empty file is an empty mapping."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}: fix the syntax") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``training.lr=3e-4`` -> (["training", "lr"], 3e-4). The value is parsed as YAML (so lists work)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' must look like section.field=value (e.g. training.lr=3e-4)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value '{raw}' is not valid YAML") from exc
    return [part.strip() for part in key.strip().split(".")], value


def apply_override(tree: dict[str, Any], path: list[str], value: Any) -> None:
    """Set ``tree[path[0]][path[1]]... = value``, creating intermediate mappings."""
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: '{part}' is a value, not a section")
        node = child
    node[path[-1]] = value


def _format_validation_error(exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "config"
        if err["type"] == "extra_forbidden":
            problems.append(f"unknown key '{field}' (check the spelling; see `dist-llm-train config show`)")
            continue
        value = err.get("input")
        msg = err["msg"].removeprefix("Value error, ")
        if isinstance(value, dict):
            # a section-level rule (e.g. min_lr <= lr): its message already names the fields
            problems.append(msg)
        else:
            problems.append(f"{field}={value!r}: {msg}")
    return "invalid config: " + "; ".join(problems)


def build_config(data: Mapping[str, Any]) -> RunConfig:
    """Validate a plain mapping into a :class:`RunConfig`."""
    try:
        return RunConfig.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from exc


def load_config(config: str | Path | None = None, overrides: Iterable[str] = ()) -> RunConfig:
    """Defaults, then the YAML file or preset ``config``, then each ``key=value`` override in order."""
    data: dict[str, Any] = read_yaml(_resolve_config_path(str(config))) if config is not None else {}
    for text in overrides:
        path, value = parse_override(text)
        apply_override(data, path, value)
    return build_config(data)


def config_to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)

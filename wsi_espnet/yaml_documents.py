"""YAML documents checked against a JSON Schema, with errors that name the key path and its line.

Cohort manifests and batch pipelines are read here: the YAML is parsed once into nodes (which know
their lines) and into JSON's data model, validated with JSON Schema 2020-12, and a failure becomes
one :class:`~wsi_espnet.errors.InputError` such as ``pipeline 'p.yaml' line 12, segmentation.tile_sise:
unknown key``. Paths in documents may use ``${VAR}`` or ``${VAR:-default}`` (:func:`expand_env`).
"""

from __future__ import annotations

import json
import os
import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from wsi_espnet.errors import InputError

__all__ = ["ENV_PATTERN", "expand_env", "load_schema", "read_checked_yaml", "resolve_path"]

ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(text: str, *, where: str) -> str:
    """Replace ``${VAR}`` and ``${VAR:-default}``; an unset variable without default is an error."""

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = os.environ.get(name)
        if value:
            return value
        if default is not None:
            return default
        raise InputError(f"{where} uses ${{{name}}} but {name} is not set; set it (export {name}=...) and retry.")

    return ENV_PATTERN.sub(substitute, text)


def resolve_path(base: Path, text: str, *, where: str) -> Path:
    """``text`` with variables expanded, relative to ``base``; a path that starts with a set variable
    whose value is relative is taken relative to the working directory (as the user typed it)."""
    leading = ENV_PATTERN.match(text)
    if leading and os.environ.get(leading.group(1)) and not Path(os.environ[leading.group(1)]).is_absolute():
        base = Path.cwd()
    expanded = Path(expand_env(text, where=where)).expanduser()
    return (expanded if expanded.is_absolute() else base / expanded).resolve()


@cache
def load_schema(path: Path) -> dict[str, Any]:
    """A JSON Schema file, parsed once."""
    schema: dict[str, Any] = json.loads(path.read_text())
    return schema


def read_checked_yaml(path: Path, schema_path: Path, *, kind: str) -> Any:
    """Parse the YAML file ``path`` and validate it against ``schema_path``; returns plain JSON data.

    ``kind`` names the document in messages ("pipeline", "cohort manifest"). Raises
    :class:`InputError` for a missing file, invalid YAML, or the first schema violation, naming its
    key path (``slides[2].mpp``) and line.
    """
    if not path.is_file():
        raise InputError(f"{kind} {str(path)!r} does not exist; give the path of a {kind} (.yaml).")
    try:
        text = path.read_text(encoding="utf-8")
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputError(f"{kind} {str(path)!r} is not valid YAML: {exc}") from exc
    try:  # JSON's data model: what the schema describes
        data = json.loads(json.dumps(data))
    except (TypeError, ValueError) as exc:
        raise InputError(f"{kind} {str(path)!r} holds a value YAML reads as a non-JSON type: {exc}.") from exc
    schema = load_schema(schema_path)
    validator = jsonschema.Draft202012Validator(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(data))
    if error is not None:
        raise InputError(_message(path, schema_path, kind, root, error))
    return data


def _message(
    path: Path, schema_path: Path, kind: str, root: yaml.Node | None, error: jsonschema.ValidationError
) -> str:
    keys: list[str | int] = list(error.absolute_path)
    message = error.message
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = set(error.schema.get("properties", {})) if isinstance(error.schema, dict) else set()
        unknown = sorted(k for k in error.instance if k not in allowed)
        if unknown:
            keys.append(unknown[0])
            message = f"unknown key {unknown[0]!r}; allowed keys: {', '.join(sorted(allowed))}"
    elif (
        error.validator == "oneOf"
        and isinstance(error.validator_value, list)
        and all(isinstance(choice, dict) and set(choice) == {"required"} for choice in error.validator_value)
    ):  # {"oneOf": [{"required": ["a"]}, {"required": ["b"]}]}: exactly one of the keys a, b
        choices = [key for choice in error.validator_value for key in choice["required"]]
        message = f"give exactly one of the keys {', '.join(choices)}"
    where = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in keys).lstrip(".") or "top level"
    line = _line_of(root, keys)
    place = f"line {line}, {where}" if line is not None else where
    return f"{kind} {str(path)!r} is not valid at {place}: {message}. See {schema_path.name} in {schema_path.parent}."


def _line_of(node: yaml.Node | None, keys: list[str | int]) -> int | None:
    """The 1-based line of the node at ``keys`` (the key's own line for mapping entries)."""
    if node is None:
        return None
    line = node.start_mark.line + 1
    for key in keys:
        if isinstance(node, yaml.MappingNode):
            entry = next(((k, v) for k, v in node.value if k.value == key), None)
            if entry is None:
                return line
            line, node = entry[0].start_mark.line + 1, entry[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            return line
    return line

"""Loading a run config: defaults <- preset chain <- YAML file <- ``key=value`` overrides.

A preset or file is a *delta*: it states only what differs from the presets named in its ``base:``
(one name or a list, merged in order). Every layer is merged onto the typed schema
(:class:`RunConfig`), so an unknown key, a wrong type or a bad enum value fails at the layer that
introduced it; ``OmegaConf.to_object`` then runs each dataclass's validation once. Any failure is a
:class:`ConfigError` whose one-line message names the file (or override), the dotted key and the
allowed values.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from mta_lab.config.model import ConfigFieldError
from mta_lab.config.run import RunConfig


class ConfigError(Exception):
    """A config cannot be loaded. ``str(error)`` is one line: source, key, problem, allowed values."""


def bundled_dir(name: str) -> Path:
    """A top-level folder of the project (``configs``, ``sweeps``) as installed with the package.

    A wheel carries copies under ``mta_lab/_bundled``; an editable install reads the checkout.
    """
    package = Path(__file__).resolve().parents[1]
    installed = package / "_bundled" / name
    return installed if installed.is_dir() else package.parent / name


def preset_names() -> list[str]:
    return sorted(path.stem for path in bundled_dir("configs").glob("*.yaml"))


def preset_description(name: str) -> str:
    """The first comment line of a preset file, which says what the preset is for."""
    for line in (bundled_dir("configs") / f"{name}.yaml").read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


@dataclass(frozen=True)
class _Layer:
    source: str
    """Where the values come from: a file path, or ``override 'key=value'``."""
    content: DictConfig


def load_config(name_or_path: str, overrides: Sequence[str] = ()) -> RunConfig:
    """The validated config of a preset name or YAML path, with ``key=value`` overrides applied."""
    layers = _file_layers(name_or_path, relative_to=None, chain=())
    layers += [_override_layer(item) for item in overrides]
    return _merge(layers, name_or_path)


def load_config_text(text: str, source: str) -> RunConfig:
    """The validated config of a resolved YAML text (e.g. carried by a sweep trial)."""
    try:
        content = OmegaConf.create(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML: {str(error).splitlines()[0]}") from None
    return _merge([_Layer(source, content)], source)


def _merge(layers: list[_Layer], name: str) -> RunConfig:
    try:  # one merge copies the tree once (a sweep loads a config per cell, a dozen layers each)
        merged = OmegaConf.merge(_defaults(), *(layer.content for layer in layers))
    except OmegaConfBaseException:
        merged = _merge_layer_by_layer(layers)  # to name the layer at fault
    try:
        config = OmegaConf.to_object(merged)
    except ConfigFieldError as error:
        node = failing_node(merged)
        key = f"{node}.{error.field}" if node else error.field
        raise ConfigError(f"{_source_of(key, layers)}: {key}: {error.message}") from None
    except OmegaConfBaseException as error:
        raise ConfigError(f"{name}: {describe_merge_error(error)}") from None
    assert isinstance(config, RunConfig)
    return config


@functools.cache
def _defaults() -> DictConfig:
    """RunConfig's defaults as a typed tree; ``OmegaConf.merge`` copies it, never changes it."""
    return OmegaConf.structured(RunConfig)


def _merge_layer_by_layer(layers: list[_Layer]) -> DictConfig:
    merged = _defaults()
    for layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer.content)
        except OmegaConfBaseException as error:
            raise ConfigError(f"{layer.source}: {describe_merge_error(error)}") from None
    return merged


def resolved_yaml(config: RunConfig) -> str:
    """The fully resolved config as YAML: what a run actually used, every default included."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def config_hash(config: RunConfig) -> str:
    """Identity of what a run does: sha256 of its resolved YAML (16 hex digits)."""
    return hashlib.sha256(resolved_yaml(config).encode()).hexdigest()[:16]


def _file_layers(ref: str, relative_to: Path | None, chain: tuple[Path, ...]) -> list[_Layer]:
    path, source = _resolve(ref, relative_to)
    if path in chain:
        cycle = " -> ".join(p.stem for p in (*chain, path))
        raise ConfigError(f"{source}: base: presets form a cycle ({cycle})")
    content = _read_yaml(path, source)
    bases = content.pop("base", None)
    if bases is None:
        bases = []
    elif isinstance(bases, str):
        bases = [bases]
    elif not (OmegaConf.is_list(bases) and all(isinstance(b, str) for b in bases)):
        raise ConfigError(f"{source}: base: expected a preset name, a YAML path, or a list of them")
    layers: list[_Layer] = []
    for base in bases:
        layers += _file_layers(base, relative_to=path.parent, chain=(*chain, path))
    return [*layers, _Layer(source, content)]


def _resolve(ref: str, relative_to: Path | None) -> tuple[Path, str]:
    """A preset name or a YAML path -> (file, how to name it in messages)."""
    if ref.endswith((".yaml", ".yml")) or "/" in ref:
        path = Path(ref) if relative_to is None else relative_to / ref
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        return path.resolve(), str(path)
    path = bundled_dir("configs") / f"{ref}.yaml"
    if not path.is_file():
        names = preset_names()
        close = difflib.get_close_matches(ref, names, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"unknown preset '{ref}': {hint}allowed: {', '.join(names)}, or a YAML path")
    return path.resolve(), f"configs/{ref}.yaml"


def _read_yaml(path: Path, source: str) -> DictConfig:
    try:
        content = OmegaConf.load(path)
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" (line {where.line + 1})" if where else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{source}{line}: not valid YAML: {problem}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{source}: cannot be read: {error}") from None
    if not isinstance(content, DictConfig):
        raise ConfigError(f"{source}: expected a mapping of config keys at the top level")
    return content


def _override_layer(item: str) -> _Layer:
    source = f"override '{item}'"
    key, sep, _ = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{source}: expected key=value, e.g. model.n_layers=4")
    try:
        return _Layer(source, OmegaConf.from_dotlist([item]))
    except (OmegaConfBaseException, yaml.YAMLError) as error:
        raise ConfigError(f"{source}: cannot parse: {str(error).splitlines()[0]}") from None


def describe_merge_error(error: OmegaConfBaseException) -> str:
    key = getattr(error, "full_key", None) or "?"
    schema = getattr(error, "object_type", None)
    if isinstance(error, ConfigKeyError) and schema is not None and dataclasses.is_dataclass(schema):
        allowed = [f.name for f in dataclasses.fields(schema)]
        name = key.rsplit(".", 1)[-1]
        close = difflib.get_close_matches(name, allowed, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return f"{key}: unknown key; {hint}allowed: {', '.join(allowed)}"
    message = str(error).splitlines()[0]
    return f"{key}: {message}"


def failing_node(node: DictConfig, path: str = "") -> str | None:
    """The dotted path of the deepest dataclass node whose validation fails (children first)."""
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none():
            found = failing_node(child, f"{path}.{key}" if path else str(key))
            if found is not None:
                return found
    try:
        OmegaConf.to_object(node)
    except ConfigFieldError:
        return path
    return None


def _source_of(key: str, layers: list[_Layer]) -> str:
    """The last layer that set ``key`` (or, failing that, anything next to it)."""
    parts = key.split(".")
    for depth in range(len(parts), 0, -1):
        prefix = parts[:depth]
        for layer in reversed(layers):
            if _sets(layer.content, prefix):
                return layer.source
    return layers[-1].source


def _sets(content: DictConfig, parts: list[str]) -> bool:
    """Whether ``content`` sets the key ``parts``, either directly or by replacing a parent whole."""
    node: object = content
    for part in parts:
        if not isinstance(node, DictConfig) or part not in node:
            return False
        node = node._get_node(part)
        if node is None or (isinstance(node, DictConfig) and node._is_none()):
            return True
        if not isinstance(node, DictConfig):
            return True
    return True

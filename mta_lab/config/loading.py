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
from mta_lab.config.runtime import RuntimeConfig

RUNTIME_KEYS = {f.name for f in dataclasses.fields(RuntimeConfig)}


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
    return bundled_names("configs")


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
    """Identity of what a run computes: sha256 of its resolved YAML (16 hex digits), without the
    ``runtime`` section, which says only how it computes."""
    what = OmegaConf.to_container(OmegaConf.structured(config), enum_to_str=True)
    del what["runtime"]
    return hashlib.sha256(OmegaConf.to_yaml(what).encode()).hexdigest()[:16]


def _file_layers(ref: str, relative_to: Path | None, chain: tuple[Path, ...]) -> list[_Layer]:
    path, source = find_yaml(ref, "configs", relative_to)
    if path in chain:
        cycle = " -> ".join(p.stem for p in (*chain, path))
        raise ConfigError(f"{source}: base: presets form a cycle ({cycle})")
    content = read_yaml(path, source)
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


def bundled_names(folder: str) -> list[str]:
    """The names of the YAML files shipped in ``folder`` (``configs``: presets, ``sweeps``)."""
    return sorted(path.stem for path in bundled_dir(folder).glob("*.yaml"))


def find_yaml(ref: str, folder: str, relative_to: Path | None = None) -> tuple[Path, str]:
    """A bundled name or a YAML path (relative to ``relative_to`` if given) -> (the file, how to name it
    in messages). ``folder`` is ``configs`` (presets) or ``sweeps``; an unknown name gets the closest
    shipped one as a suggestion."""
    kind = {"configs": "config", "sweeps": "sweep"}[folder]
    if ref.endswith((".yaml", ".yml")) or "/" in ref:
        path = Path(ref) if relative_to is None else relative_to / ref
        if not path.is_file():
            raise ConfigError(f"{path}: no such {kind} file")
        return path.resolve(), str(path)
    path = bundled_dir(folder) / f"{ref}.yaml"
    if not path.is_file():
        names = bundled_names(folder)
        close = difflib.get_close_matches(ref, names, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        name = "preset" if folder == "configs" else kind
        raise ConfigError(f"unknown {name} '{ref}': {hint}allowed: {', '.join(names)}, or a YAML path")
    return path.resolve(), f"{folder}/{ref}.yaml"


def read_yaml(path: Path, source: str, keys: str = "config keys") -> DictConfig:
    """A YAML file of config-like keys (a preset, a config file, a sweep file), named ``source`` in
    messages: bad YAML (with its line), bytes that are not UTF-8 (with their offset), a top level that
    is not a mapping of ``keys``, and ``${...}`` interpolations (which could pull environment values
    into run names and params) are each one line."""
    try:
        content = OmegaConf.load(path)
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" (line {where.line + 1})" if where else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{source}{line}: not valid YAML: {problem}") from None
    except UnicodeDecodeError as error:
        byte = error.object[error.start : error.start + 1].hex()
        raise ConfigError(f"{source}: not UTF-8 text (byte 0x{byte} at offset {error.start})") from None
    except OSError as error:
        raise ConfigError(f"{source}: cannot be read: {error}") from None
    if not isinstance(content, DictConfig):
        raise ConfigError(f"{source}: expected a mapping of {keys} at the top level")
    interpolated = _interpolation(OmegaConf.to_container(content, resolve=False))
    if interpolated:
        raise ConfigError(
            f"{source}: {interpolated}: interpolations (${{...}}) are not allowed here; write the value"
        )
    return content


def _interpolation(node: object, path: str = "") -> str | None:
    """The dotted key of the first value that is an OmegaConf interpolation."""
    if isinstance(node, dict):
        for key, value in node.items():
            found = _interpolation(value, f"{path}.{key}" if path else str(key))
            if found:
                return found
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found = _interpolation(value, f"{path}[{index}]")
            if found:
                return found
    elif isinstance(node, str) and "${" in node:
        return path or "(top level)"
    return None


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
        if name in RUNTIME_KEYS and key != f"runtime.{name}":  # how a run computes left the model config
            hint = f"it is runtime.{name} (how a run computes, not what); "
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

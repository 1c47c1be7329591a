"""The options of ``densepure certify`` and the jobs, derived from ``RunConfig``'s fields.

Each field's metadata gives its help text, spellings, choices and on/off switch; its type gives
the parser (comma lists for list fields). ``--config FILE.yaml`` and the jobs' presets
(``configs/presets/*.yaml``) supply defaults under the option names (dashes or underscores, any
spelling of an option), and options on the command line win.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Callable

import click
import yaml

from pipeline.config import RunConfig, option_fields

__all__ = ["PRESETS", "certify_options", "load_preset", "option_names"]

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "presets"
"""The jobs' presets: ``<name>.yaml`` holds the defaults of ``jobs/certify_<name>.py``."""


def _csv(cast: Callable[[str], Any]) -> Callable:
    """Parse ``a,b,c`` (or a YAML list) into a list of ``cast`` values."""

    def parse(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None or isinstance(value, list):
            return [cast(v) for v in value] if isinstance(value, list) else value
        items = [v for v in str(value).replace(" ", ",").split(",") if v]
        try:
            return [cast(v) for v in items]
        except ValueError:
            raise click.BadParameter(f"expected a comma-separated list, got {value!r}") from None

    return parse


def _scalar_type(hint: Any) -> Any:
    """int/float/str/bool of ``X`` or ``X | None``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _option_for(f: dataclasses.Field, hint: Any) -> Callable:
    meta = f.metadata
    flags = list(meta.get("flags") or (f"--{f.name.replace('_', '-')}",))
    required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    default = None if required else (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)  # type: ignore[misc]
    kind = _scalar_type(hint)
    common: dict[str, Any] = {"help": meta.get("help"), "required": required}
    if typing.get_origin(kind) is list:
        cast = typing.get_args(kind)[0]
        shown = ",".join(map(str, default)) if default else None
        return click.option(*flags, f.name, type=str, metavar="A,B,...", default=shown, show_default=shown is not None,
                            callback=_csv(cast), **common)
    if kind is bool:
        if meta.get("switch"):
            return click.option(f"{flags[0]}/{meta['switch']}", f.name, default=default, show_default=True, **common)
        return click.option(*flags, f.name, is_flag=True, default=default, **common)
    ctype = click.Choice(meta["choices"]) if meta.get("choices") else kind
    return click.option(*flags, f.name, type=ctype, default=default, show_default=default is not None, **common)


def option_names(command: click.Command) -> dict[str, str]:
    """Every spelling of every option (``max``, ``max_images``, ``max-images``) -> its parameter name."""
    names: dict[str, str] = {}
    for param in command.params:
        if not isinstance(param, click.Option) or param.name is None:
            continue
        for opt in [*param.opts, *param.secondary_opts]:
            bare = opt.lstrip("-")
            if bare.startswith("no-") and opt in param.secondary_opts:
                continue
            names[bare] = names[bare.replace("-", "_")] = param.name
        names[param.name] = param.name
    return names


def _normalise(data: dict[str, Any], command: click.Command, where: str) -> dict[str, Any]:
    """YAML keys (any option spelling) -> parameter names."""
    names = option_names(command)
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = names.get(str(key)) or names.get(str(key).replace("-", "_"))
        if name is None or name == "config":
            close = difflib.get_close_matches(str(key), [n for n in names if n != "config"], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise click.BadParameter(f"unknown option '{key}' in {where}{hint} (keys are the option names, e.g. data, max_images)")
        # Lists become the comma lists the options parse (click converts defaults as strings).
        out[name] = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
    return out


def load_preset(name: str, command: click.Command) -> dict[str, Any]:
    """The defaults of one of the jobs (``configs/presets/<name>.yaml``), as parameter names."""
    path = PRESETS / f"{name}.yaml"
    preset = _normalise(yaml.safe_load(path.read_text()) or {}, command, str(path))
    if preset.get("model_flags") and not Path(preset["model_flags"]).is_absolute():
        # Paths in a preset are relative to the repository, wherever the job is started from.
        preset["model_flags"] = str(PRESETS.parents[1] / preset["model_flags"])
    return preset


def _load_yaml_config(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Merge a YAML file's options into the defaults before the other options are parsed."""
    if not value:
        return value
    path = Path(value)
    if not path.is_file():
        raise click.BadParameter(f"config file not found: {value}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise click.BadParameter(f"{value} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise click.BadParameter(f"{value} must hold a mapping of option names to values")
    assert ctx.command is not None
    ctx.default_map = {**(ctx.default_map or {}), **_normalise(data, ctx.command, value)}
    return value


def certify_options(fn: Callable) -> Callable:
    """The options of a certification run: every RunConfig field, plus --config (shared by
    ``densepure certify`` and the jobs)."""
    hints = typing.get_type_hints(RunConfig)
    options = [
        click.option("--config", type=click.Path(dir_okay=False), callback=_load_yaml_config, is_eager=True, expose_value=False,
                     help="YAML file of options (keys: the option names, dashes or underscores); command-line options win."),
        *[_option_for(f, hints[f.name]) for f in option_fields()],
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn

"""The `fms-acceleration` console script: plugins, check, configs, and plugin subcommands."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import yaml

from .discovery import CLI_GROUP, discover_plugins
from .errors import AccelerationFrameworkError, AccelerationPluginConfigError
from .framework import AccelerationFramework
from .summary import format_table

CONTENTS_FILE = "CONTENTS.yaml"
SAMPLES_DIR = "sample-configurations"
SAMPLES_ENV_VAR = "FMS_ACCELERATION_SAMPLE_CONFIGS"


_LIBRARY_NOISE = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


def _print_warnings(caught: Sequence[warnings.WarningMessage]) -> None:
    """Echo warnings meant for the user; libraries' deprecation notices are not theirs to fix."""
    for warning in caught:
        if not issubclass(warning.category, _LIBRARY_NOISE):
            print(f"warning: {warning.message}", file=sys.stderr)


def cmd_plugins(args: argparse.Namespace) -> int:
    """List installed plugins with their packages, versions, stanza paths and slots."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = discover_plugins()
    _print_warnings(caught)
    if not found:
        print("no fms-acceleration plugins installed")
        return 0
    rows = []
    for entry in found:
        reg = entry.registration
        paths = [f"{p} (and)" for p in reg.configuration_and_paths]
        paths += [f"{p} (or)" for p in reg.configuration_or_paths]
        slots = ", ".join(sorted(reg.plugin_class.slots)) or "-"
        rows.append((reg.plugin_id, entry.package, entry.version, "; ".join(paths), slots))
    print(format_table(("plugin", "package", "version", "stanzas", "declared slots"), rows))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Validate a configuration; print the active plugins in order, or one clear error."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            framework = AccelerationFramework(args.config)
        except (AccelerationPluginConfigError, AccelerationFrameworkError) as err:
            _print_warnings(caught)
            print(f"error: {err}", file=sys.stderr)
            return 1
        except Exception as err:  # a plugin's own failure still gets one paragraph, no trace
            _print_warnings(caught)
            print(f"error: {args.config}: {type(err).__name__}: {err}", file=sys.stderr)
            return 1
    _print_warnings(caught)
    print(f"{args.config}: OK")
    if not framework.active_plugins:
        print("no active plugins")
    for index, (plugin_id, plugin) in enumerate(framework.active_plugins, start=1):
        slots = ", ".join(sorted(plugin.taken_slots())) or "-"
        print(f"  {index}. {plugin_id} ({type(plugin).__name__}); slots: {slots}")
    return 0


def find_sample_configurations(explicit: str | None) -> Path | None:
    """The CONTENTS.yaml of the sample configurations: --dir, env var, or up from cwd/here."""
    candidates = [explicit, os.environ.get(SAMPLES_ENV_VAR)]
    for start in (Path.cwd(), Path(__file__).resolve()):
        candidates += [str(parent / SAMPLES_DIR) for parent in [start, *start.parents]]
    for candidate in candidates:
        if candidate and (Path(candidate) / CONTENTS_FILE).is_file():
            return Path(candidate) / CONTENTS_FILE
    return None


def cmd_configs(args: argparse.Namespace) -> int:
    """List the sample configurations named in CONTENTS.yaml."""
    contents = find_sample_configurations(args.dir)
    if contents is None:
        print(
            f"error: no {SAMPLES_DIR}/{CONTENTS_FILE} found; pass --dir or set {SAMPLES_ENV_VAR}",
            file=sys.stderr,
        )
        return 1
    entries = (yaml.safe_load(contents.read_text()) or {}).get("framework_configs", [])
    rows = [
        (e["shortname"], ", ".join(e.get("plugins", [])), str(contents.parent / e["filename"]))
        for e in entries
    ]
    print(format_table(("shortname", "plugins", "file"), rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, including subcommands that installed plugins contribute."""
    parser = argparse.ArgumentParser(
        prog="fms-acceleration", description="Acceleration plugins for HF Trainer fine-tuning."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("plugins", help="list installed plugins").set_defaults(func=cmd_plugins)
    check = sub.add_parser("check", help="validate an acceleration configuration")
    check.add_argument("config", help="path to the acceleration YAML file")
    check.set_defaults(func=cmd_check)
    configs = sub.add_parser("configs", help="list sample configurations")
    configs.add_argument("--dir", help=f"folder holding {CONTENTS_FILE}")
    configs.set_defaults(func=cmd_configs)
    builtin = set(sub.choices)
    for entry_point in metadata.entry_points(group=CLI_GROUP):
        if entry_point.name in builtin:
            warnings.warn(
                f"CLI plugin '{entry_point.name}' ({entry_point.value}) would shadow a built-in "
                "command and is skipped",
                stacklevel=2,
            )
            continue
        try:
            entry_point.load()(sub)
        except Exception as err:  # a broken plugin command must not break the others
            warnings.warn(
                f"CLI plugin '{entry_point.name}' ({entry_point.value}) failed to load and is "
                f"skipped: {type(err).__name__}: {err}",
                stacklevel=2,
            )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parser = build_parser()
    _print_warnings(caught)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""The `fms-acceleration` console script (also `python -m fms_acceleration.cli`): plugins, check,
configs, install, and subcommands that installed packages contribute."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

from .catalogue import PACKAGE_PREFIX, checkout_packages, checkout_root, plugin_short_names
from .constants import CLI_GROUP, PLUGIN_PREFIX
from .discovery import plugin_catalogue
from .errors import AccelerationFrameworkError, AccelerationPluginConfigError
from .framework import AccelerationFramework
from .packages import entry_points_of, installed_versions, load_entry_points
from .summary import format_table
from .validation import suggestion
from .yaml_loading import read_yaml_file

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
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("ignore")
        catalogue = plugin_catalogue()
    rows = []
    for reg in catalogue.registrations:
        paths = [f"{p} (and)" for p in reg.configuration_and_paths]
        paths += [f"{p} (or)" for p in reg.configuration_or_paths]
        slots = ", ".join(sorted(reg.plugin_class.slots)) or "-"
        rows.append((reg.plugin_id, reg.package_name, reg.package_version, "; ".join(paths), slots))
    if rows:
        print(format_table(("plugin", "package", "version", "stanzas", "declared slots"), rows))
    else:
        print("no fms-acceleration plugins installed")
    for broken in catalogue.broken:
        print(f"broken: plugin {broken.describe()}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Validate a configuration; print the active plugins in order, or one clear error."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            framework = AccelerationFramework(args.config, strict_stanzas=True)
        except (AccelerationPluginConfigError, AccelerationFrameworkError) as err:
            _print_warnings(caught)
            print(f"error: {_with_source(str(err), args.config)}", file=sys.stderr)
            return 1
        except Exception as err:  # a plugin's own failure still gets one paragraph, no trace
            _print_warnings(caught)
            print(f"error: {args.config}: {type(err).__name__}: {err}", file=sys.stderr)
            return 1
    _print_warnings(caught)
    print(f"{args.config}: OK")
    for index, (plugin_id, plugin) in enumerate(framework.plugins.items(), start=1):
        slots = ", ".join(sorted(plugin.taken_slots())) or "-"
        print(f"  {index}. {plugin_id} ({type(plugin).__name__}); slots: {slots}")
    return 0


def _with_source(message: str, source: str) -> str:
    return message if message.startswith(f"{source}:") else f"{source}: {message}"


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
    try:
        entries = (read_yaml_file(contents, "contents") or {}).get("framework_configs", [])
    except AccelerationPluginConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    rows = [
        (e["shortname"], ", ".join(e.get("plugins", [])), str(contents.parent / e["filename"]))
        for e in entries
    ]
    print(format_table(("shortname", "plugins", "file"), rows))
    return 0


def install_command(name: str, flags: Sequence[str], cwd: Path) -> list[str]:
    """The pip command that installs plugin `name` (short name, module or package name): from
    the checkout around `cwd` when there is one, else by package name from the index."""
    short = name.removeprefix(PLUGIN_PREFIX).removeprefix(PACKAGE_PREFIX)
    pip = [sys.executable, "-m", "pip", "install", *flags]
    if Path(name).exists():
        return [*pip, name]
    root = checkout_root(cwd)
    local = {p.short_name: p for p in checkout_packages(root)} if root is not None else {}
    known = sorted(set(plugin_short_names(root)) | set(local))
    if short not in known:
        raise AccelerationFrameworkError(
            f"unknown plugin '{name}'{suggestion(short, known)}; known: {', '.join(known)} (or "
            "give a path or a pip requirement)"
        )
    if short in local:
        constraints = root / "constraints.txt"  # type: ignore[operator]
        pins = ["-c", str(constraints)] if constraints.is_file() else []
        return [*pip, *pins, str(root / local[short].folder)]  # type: ignore[operator]
    return [*pip, PACKAGE_PREFIX + short]


# what a plugin install must never replace: a client's stack pins these (fms-hf-tuning: torch
# 2.8, transformers 4.55, peft 0.19), and a newer release pulled in by our metadata breaks it
HELD_PACKAGES = ("torch", "transformers", "peft", "accelerate")


def held_versions() -> dict[str, str]:
    """The installed release of each held package."""
    return installed_versions(HELD_PACKAGES)


def cmd_install(args: argparse.Namespace) -> int:
    """Install a plugin by short name (from this checkout when inside one, else from the
    package index) against the torch / transformers / peft / accelerate already installed."""
    try:
        command = install_command(args.plugin, args.pip_flags, Path.cwd())
    except AccelerationFrameworkError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    held = held_versions()
    with tempfile.TemporaryDirectory() as folder:
        pins = Path(folder) / "held.txt"
        pins.write_text("".join(f"{n}=={v}\n" for n, v in held.items()), encoding="utf-8")
        command = [*command[:4], "-c", str(pins), *command[4:]]
        print("running: " + " ".join(command))
        code = subprocess.call(command)
    if code != 0 and held:
        kept = ", ".join(f"{n} {v}" for n, v in held.items())
        print(
            f"error: pip could not install {args.plugin} against the installed {kept} (see its "
            "output above); nothing of those was changed. Install a release of the plugin "
            "that supports them, or upgrade them yourself first.",
            file=sys.stderr,
        )
    return code


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, including subcommands that installed packages contribute."""
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
    known = ", ".join(plugin_short_names(checkout_root(Path.cwd())))
    install = sub.add_parser("install", help=f"install a plugin by short name ({known})")
    install.add_argument("plugin", help="short name (e.g. peft), module name or path")
    install.add_argument("pip_flags", nargs=argparse.REMAINDER, help="flags passed to pip")
    install.set_defaults(func=cmd_install)
    builtin = set(sub.choices)
    loaded, broken = load_entry_points(
        ep for ep in entry_points_of(CLI_GROUP) if ep.name not in builtin
    )
    for entry in loaded:
        try:
            entry.obj(sub)
        except Exception as err:  # a broken plugin command must not break the others
            warnings.warn(
                f"CLI plugin '{entry.name}' ({entry.value}) failed to register and is skipped: "
                f"{type(err).__name__}: {err}",
                stacklevel=2,
            )
    for failure in broken:
        warnings.warn(f"CLI plugin {failure.describe()}; it is skipped", stacklevel=2)
    for ep in entry_points_of(CLI_GROUP):
        if ep.name in builtin:
            warnings.warn(
                f"CLI plugin '{ep.name}' ({ep.value}) would shadow a built-in command and is "
                "skipped",
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

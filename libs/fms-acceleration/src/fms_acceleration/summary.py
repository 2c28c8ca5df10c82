"""The one table logged at ready-for-train: active plugins, versions and applied patches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain fixed-width text table."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(str(cell))) for w, cell in zip(widths, row)]
    line = "  ".join("-" * w for w in widths)

    def render(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([render(headers), line, *(render(r) for r in rows)])


def ready_for_train_table(
    plugin_rows: Sequence[Sequence[str]],
    patch_rows: Sequence[Sequence[str]],
    passed_through: Sequence[str],
) -> str:
    """Render the summary: one plugins section and one patches section."""
    parts = ["fms-acceleration: ready for train"]
    parts.append(
        format_table(("#", "plugin", "package", "version", "slots", "stanzas"), plugin_rows)
        if plugin_rows
        else "(no active plugins)"
    )
    parts.append(
        format_table(("patch rule", "kind", "count", "targets"), patch_rows)
        if patch_rows
        else "(no patches applied)"
    )
    if passed_through:
        parts.append("passed through (package not installed): " + ", ".join(passed_through))
    return "\n".join(parts)


def active_plugin_lines(plugins: Sequence[tuple[str, Any]]) -> str:
    """The reference's banner and one `Active Plugin:` line per (class name, registration)."""
    lines = ["***** FMS AccelerationFramework *****"]
    for class_name, registration in plugins:
        lines.append(
            f"Active Plugin: {class_name}. Python package: {registration.package_name}. "
            f"Version: {registration.package_version}."
        )
    return "\n".join(lines)

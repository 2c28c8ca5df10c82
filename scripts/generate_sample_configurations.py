"""Generate sample-configurations/ from the commented stanzas each plugin ships in configs/.

    python scripts/generate_sample_configurations.py            # (re)write the samples
    python scripts/generate_sample_configurations.py --verify   # exit 1 if any file is stale

A named configuration is one plugin YAML plus key overrides (e.g. bnb.yaml with quant_type nf4);
a sample combines one or more of them into `sample-configurations/<name>-sample-configuration.yaml`
and is listed in `sample-configurations/CONTENTS.yaml`. Each plugin YAML is first read with the
core's strict loader (duplicate keys and syntax errors name the file, line and column), then
round-tripped with ruamel.yaml so its comments survive the merge (see commented_yaml.py). Every
sample is checked against the same merge done on the plain data, so comment handling cannot
change a value.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

from ruamel.yaml.comments import CommentedMap

from commented_yaml import (
    comment_out,
    copy_key,
    dump,
    load,
    one_line,
    remove,
    set_comments_before,
)
from fms_acceleration.yaml_loading import load_yaml, read_text_file

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "sample-configurations"
CONTENTS = "CONTENTS.yaml"
INDENT = 2  # what commented_yaml.dump indents each mapping level by

# An override value that comments the key out (the plugin then uses its default).
COMMENT_OUT = "<comment out>"
# An override value that removes the key (a scalar or a whole stanza) with its comments.
REMOVE = "<remove>"

_SCATTERMOE = "training.moe.scattermoe"

# name -> (plugin folder, file in its configs/, overrides {dotted path under `plugins:`: value})
CONFIGURATIONS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "bnb-nf4": (
        "accelerated-peft",
        "bnb.yaml",
        {"peft.quantization.bitsandbytes.quant_type": "nf4"},
    ),
    "bnb-nf4-baseline": (
        "accelerated-peft",
        "bnb.yaml",
        {
            "peft.quantization.bitsandbytes.quant_type": "nf4",
            "peft.quantization.bitsandbytes.no_peft_model": True,
        },
    ),
    "auto-gptq": ("accelerated-peft", "autogptq.yaml", {}),
    "bnb-nf4-foak": (
        "fused-ops-and-kernels",
        "fast_quantized_peft.yaml",
        {"peft.quantization.fused_ops_and_kernels.base_layer": "bitsandbytes"},
    ),
    "auto-gptq-foak": (
        "fused-ops-and-kernels",
        "fast_quantized_peft.yaml",
        {
            # fast_quantized_peft.yaml names its bitsandbytes loader; GPTQ brings its own
            "peft.quantization.bitsandbytes": REMOVE,
            "peft.quantization.fused_ops_and_kernels.base_layer": "auto_gptq",
        },
    ),
    "foak-fast-kernels": ("fused-ops-and-kernels", "fast_kernels.yaml", {}),
    # the loss only: lm_head fused with the cross-entropy pays off on CPU as well, where the
    # other kernels fall back to PyTorch and are switched off (they default to on)
    "foak-fused-ce": (
        "fused-ops-and-kernels",
        "fast_kernels.yaml",
        {
            "training.fused_ops_and_kernels.fast_loss": "fused_ce_liger",
            "training.fused_ops_and_kernels.fast_rms_layernorm": False,
            "training.fused_ops_and_kernels.fast_rope_embeddings": False,
            "training.fused_ops_and_kernels.fast_swiglu": False,
        },
    ),
    "fts-default": (
        "finetuning-schedule",
        "finetuning_schedule.yaml",
        {"training.finetuning_schedule.ft_schedule": COMMENT_OUT},
    ),
    "hpo": ("hpo", "hpo.yaml", {}),
    "hpo-fts": ("hpo", "hpo_fts.yaml", {}),
    "aadp-padding-free": ("attention-and-distributed-packing", "padding_free.yaml", {}),
    "aadp-multipack": ("attention-and-distributed-packing", "multipack.yaml", {}),
    "odm": ("online-data-mixing", "odm.yaml", {}),
    "moe-ep1": ("accelerated-moe", "scattermoe.yaml", {}),
    **{
        f"moe-ep{n}": ("accelerated-moe", "scattermoe.yaml", {f"{_SCATTERMOE}.ep_degree": n})
        for n in (2, 4, 8)
    },
}

# sample shortname -> named configurations it merges, in order
SAMPLES: dict[str, tuple[str, ...]] = {
    "accelerated-peft-autogptq": ("auto-gptq",),
    "accelerated-peft-bnb-nf4": ("bnb-nf4",),
    "baseline-peft-bnb-nf4": ("bnb-nf4-baseline",),
    "accelerated-peft-autogptq-foak": ("auto-gptq", "auto-gptq-foak"),
    "accelerated-peft-bnb-nf4-foak": ("bnb-nf4", "bnb-nf4-foak"),
    "foak-fast-kernels": ("foak-fast-kernels",),
    "fts-default": ("fts-default",),
    "fts-foak-fast-kernels": ("fts-default", "foak-fast-kernels"),
    "hpo-lora": ("hpo",),
    "hpo-fts": ("fts-default", "hpo-fts"),
    "aadp-padding-free": ("aadp-padding-free",),
    "aadp-padding-free-multipack": ("aadp-padding-free", "aadp-multipack"),
    "accelerated-peft-bnb-nf4-padding-free": ("aadp-padding-free", "bnb-nf4"),
    "accelerated-peft-bnb-nf4-foak-padding-free": ("aadp-padding-free", "bnb-nf4", "bnb-nf4-foak"),
    "foak-fast-kernels-padding-free": ("aadp-padding-free", "foak-fast-kernels"),
    "foak-fused-ce-padding-free": ("aadp-padding-free", "foak-fused-ce"),
    "odm": ("odm",),
    # the reference's MoE samples (named for the granite MoE models it was tuned on; they fit
    # every architecture the plugin supports): alone, with padding-free, and with fast kernels
    **{
        f"moe-scattermoe-granite-ep{n}{suffix}": (*extra, f"moe-ep{n}")
        for n in (1, 2, 4)
        for suffix, extra in (
            ("", ()),
            ("-padding-free", ("aadp-padding-free",)),
            ("-padding-free-foak", ("aadp-padding-free", "foak-fast-kernels")),
        )
    },
    "moe-scattermoe-granite-ep8": ("moe-ep8",),
    "moe-scattermoe-granite-ep8-foak": ("foak-fast-kernels", "moe-ep8"),
}

# how a sample is run, when not by `fms-acceleration train` (samples with a search stanza)
_SEARCH = "fms-acceleration search sample-configurations/{filename} --trials 6 \\\n#     --storage sqlite:///study.db"
USAGE: dict[str, str] = {"hpo-lora": _SEARCH, "hpo-fts": _SEARCH + " --full-finetuning"}
_TRAIN = "fms-acceleration train --acceleration-config sample-configurations/{filename}"
# MoE samples train a MoE (the embedded model up-cycled); ep_degree N > 1 needs a multiple of N
# processes
_MOE = " --model smollm2-moe"
_TORCHRUN = (
    "torchrun --nproc_per_node {n} -m fms_acceleration_train \\\n"
    "#     --acceleration-config sample-configurations/{{filename}}" + _MOE
)
USAGE.update(
    {
        shortname: _TORCHRUN.format(n=names[-1].removeprefix("moe-ep"))
        if names[-1] != "moe-ep1"
        else _TRAIN + _MOE
        for shortname, names in SAMPLES.items()
        if names[-1].startswith("moe-ep")
    }
)

HEADER = """\
# FMS Acceleration plugin configuration: {shortname}
# Generated by scripts/generate_sample_configurations.py from
{sources}
# Do not edit by hand: change the plugin's configs/*.yaml and re-run the generator.
#
# Use it with:
#   {usage}
"""


class MergeError(ValueError):
    """A plugin YAML, an override or a merge of two plugin YAMLs is not what the tables say."""


def plugin_config_path(name: str) -> Path:
    """The plugin YAML a named configuration starts from."""
    folder, filename, _ = CONFIGURATIONS[name]
    return ROOT / "plugins" / folder / "configs" / filename


def read_plugin_config(path: Path, source: str) -> tuple[CommentedMap, dict]:
    """(the commented tree, the plain data) of a plugin YAML, strictly checked."""
    text = read_text_file(path, "plugin configuration", MergeError)
    data = load_yaml(text, source, MergeError)
    if not isinstance(data, dict) or not isinstance(data.get("plugins"), dict):
        raise MergeError(f"{source}: no top-level 'plugins:' mapping")
    return load(text), data


def _parent(tree: CommentedMap, dotted: str, source: str) -> tuple[Any, str]:
    """(the mapping that holds the last key of `dotted` under `plugins:`, that key)."""
    *parents, leaf = dotted.split(".")
    node = tree["plugins"]
    for depth, part in enumerate(parents):
        node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            missing = ".".join(["plugins", *parents[: depth + 1]])
            raise MergeError(f"{source}: override {dotted!r}: no mapping '{missing}'")
    return node, leaf


def apply_override(tree: CommentedMap, data: dict, dotted: str, value: Any, source: str) -> None:
    """Set, comment out or remove the key at `dotted` (under `plugins:`) in the commented tree
    and the same way in its plain data."""
    node, leaf = _parent(tree, dotted, source)
    plain, _ = _parent(data, dotted, source)
    if value == REMOVE:
        if leaf not in node:
            raise MergeError(f"{source}: override {dotted!r}: nothing to remove")
        remove(node, leaf)
        del plain[leaf]
    elif value == COMMENT_OUT:
        if leaf not in node or isinstance(node[leaf], (dict, list)):
            raise MergeError(f"{source}: override {dotted!r}: no scalar to comment out")
        comment_out(node, leaf, column=INDENT * len(dotted.split(".")))
        del plain[leaf]
    elif isinstance(node.get(leaf), (dict, list)):
        raise MergeError(f"{source}: override {dotted!r} replaces a mapping, not a scalar")
    else:
        node[leaf] = plain[leaf] = value


def _same(mine: Any, other: Any) -> bool:
    """Equal plain values (true and 1 are not the same setting)."""
    return mine == other and isinstance(mine, bool) == isinstance(other, bool)


def merge_into(target: CommentedMap, other: CommentedMap, where: str) -> None:
    """Merge `other`'s keys (with their comments) into `target`; a key both have must be a
    mapping in both or the same value in both."""
    for key, value in other.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in target:
            copy_key(other, key, target)
        elif isinstance(target[key], dict) and isinstance(value, dict):
            merge_into(target[key], value, path)
        elif (
            isinstance(target[key], dict)
            or isinstance(value, dict)
            or not _same(target[key], value)
        ):
            raise MergeError(f"conflicting values for '{path}' in the merged configurations")


def _plain_merge(target: dict, other: dict) -> None:
    for key, value in other.items():
        if isinstance(target.get(key), dict) and isinstance(value, dict):
            _plain_merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


def build_sample(shortname: str, names: tuple[str, ...]) -> str:
    """Text of one sample configuration (comments kept), checked against the plain-data merge."""
    merged, expected = CommentedMap(), {}
    sources = []
    for name in names:
        overrides = CONFIGURATIONS[name][2]
        path = plugin_config_path(name)
        rel = path.relative_to(ROOT).as_posix()
        tree, data = read_plugin_config(path, rel)
        for dotted, value in overrides.items():
            apply_override(tree, data, dotted, value, rel)
        set_comments_before(tree, "plugins", [])  # the file's header is replaced by ours
        merge_into(merged, tree, "")
        _plain_merge(expected, data)
        sources.append(f"#   {rel}")
        shown = {COMMENT_OUT: " commented out", REMOVE: " removed"}
        sources += [
            f"#     with {k}{shown[v]}" if v in shown else f"#     with {one_line(k, v)}"
            for k, v in overrides.items()
        ]
    filename = sample_filename(shortname)
    usage = USAGE.get(shortname, _TRAIN).format(filename=filename)
    header = HEADER.format(shortname=shortname, sources="\n".join(sources), usage=usage)
    text = header + "\n" + dump(merged)
    if load_yaml(text, filename, MergeError) != expected:
        raise MergeError(f"{shortname}: the comment-keeping merge differs from the plain merge")
    return text


def sample_filename(shortname: str) -> str:
    """File name of a sample in sample-configurations/."""
    return f"{shortname}-sample-configuration.yaml"


def build_all(skip_missing: bool) -> tuple[dict[str, str], list[str]]:
    """{file name: text} for every sample and CONTENTS.yaml; plus the samples left out."""
    files, skipped, contents = {}, [], []
    for shortname, names in SAMPLES.items():
        missing = [plugin_config_path(n) for n in names if not plugin_config_path(n).is_file()]
        if missing:
            if not skip_missing:
                raise MergeError(f"{shortname}: missing {', '.join(map(str, missing))}")
            skipped.append(f"{shortname} (missing {missing[0].relative_to(ROOT)})")
            continue
        files[sample_filename(shortname)] = build_sample(shortname, names)
        plugins = list(dict.fromkeys(CONFIGURATIONS[n][0] for n in names))
        contents.append(
            {"shortname": shortname, "plugins": plugins, "filename": sample_filename(shortname)}
        )
    files[CONTENTS] = (
        "# Sample configurations generated by scripts/generate_sample_configurations.py.\n"
        + dump({"framework_configs": contents})
    )
    return files, skipped


def main(argv: list[str] | None = None) -> int:
    """Write the samples, or with --verify report (exit 1) those that differ from the generator."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verify", action="store_true", help="only compare; exit 1 if stale")
    parser.add_argument(
        "--skip-missing",
        action="store_true",
        help="leave out samples whose plugin configs do not exist (instead of failing)",
    )
    parser.add_argument("--output", type=Path, default=OUTPUT, help="folder of the samples")
    args = parser.parse_args(argv)
    try:
        files, skipped = build_all(args.skip_missing)
    except (MergeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for item in skipped:
        print(f"skipped {item}", file=sys.stderr)

    stale = sorted(
        name
        for name, text in files.items()
        if not (args.output / name).is_file()
        or (args.output / name).read_text(encoding="utf-8") != text
    )
    extra = sorted(
        p.name for p in args.output.glob("*-sample-configuration.yaml") if p.name not in files
    )
    if args.verify:
        for name in stale:
            print(f"differs from the generator: {args.output.name}/{name}")
        for name in extra:
            print(f"not made by the generator: {args.output.name}/{name}")
        if stale or extra:
            print("run: python scripts/generate_sample_configurations.py", file=sys.stderr)
            return 1
        print(f"{len(files)} files in {args.output.name}/ match the generator")
        return 0
    args.output.mkdir(parents=True, exist_ok=True)
    for name in stale:
        (args.output / name).write_text(files[name], encoding="utf-8")
    for name in extra:
        (args.output / name).unlink()
    print(f"wrote {len(stale)} of {len(files)} files, removed {len(extra)} in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Map a safetensors weight map onto the reference's ScatterMoE parameter names.

The reference exposed this helper (and tests it); it reads which checkpoint keys hold the
router and each expert projection of one MoE block: `router.weight`, `w1.weight` (gate),
`w2.weight` (down), `w3.weight` (up), each a list of (key, file) — one per expert when the
checkpoint keeps experts apart (Mixtral), one in all when it stacks them (Granite).
"""

from __future__ import annotations

import re
from collections import defaultdict

from ..errors import CheckpointLayoutError
from .scattermoe_constants import KEY_SCATTERMOE_ROUTER, PARAM_NAME_WEIGHT_SCATTERMOE


def _expert_map(expert_name: str) -> dict[str, list[str]]:
    """checkpoint name -> ScatterMoE names it feeds."""
    if "|" not in expert_name:
        return {name: [name] for name in PARAM_NAME_WEIGHT_SCATTERMOE}
    names = expert_name.split("|")
    most = len(PARAM_NAME_WEIGHT_SCATTERMOE)
    if not 2 <= len(names) <= most:
        raise CheckpointLayoutError(
            f"expert_name {expert_name!r}: If expert_name has |, expect between 2 and {most} "
            f"entries (one checkpoint name per ScatterMoE projection w1, w2, w3), but got "
            f"{len(names)}."
        )
    mapping: dict[str, list[str]] = defaultdict(list)
    for name, target in zip(names, PARAM_NAME_WEIGHT_SCATTERMOE):
        mapping[name].append(target)
    return dict(mapping)


def _place(slots: list, index: int, value: tuple[str, str]) -> None:
    slots.extend([None] * (index + 1 - len(slots)))
    slots[index] = value


def get_checkpoint_meta_from_sharded_safetensor(
    weight_map: dict[str, str],
    prefix: str,
    instance_name: str,
    router_name: str = "gate",
    expert_name: str = "experts",
    expert_map: dict[str, list[str]] | None = None,
) -> dict[str, list[tuple[str, str]]]:
    """ScatterMoE name -> [(checkpoint key, file), ...] for the block `prefix.instance_name`."""
    expert_map = expert_map if expert_map is not None else _expert_map(expert_name)
    block = f"{prefix}.{instance_name}."
    pattern = re.compile(rf"({router_name}|{expert_name})\.?(\d+)?\.?(\w+)?\.weight")
    found: dict[str, list] = defaultdict(list)
    for key, file in weight_map.items():
        if not key.startswith(block):
            continue
        match = pattern.match(key[len(block) :])
        if match is None:
            raise CheckpointLayoutError(
                f"Unable to handle key '{key}' with provided router_name '{router_name}' or "
                f"expert_name '{expert_name}'"
            )
        name, index, leaf = match.groups()
        if name == router_name:
            found[KEY_SCATTERMOE_ROUTER].append((key, file))
            continue
        targets = expert_map.get(name, expert_map.get(leaf))
        if not targets:
            raise CheckpointLayoutError(f"key '{key}' maps to no ScatterMoE projection")
        for target in targets:
            _place(found[f"{target}.weight"], int(index or 0), (key, file))
    if not found:
        raise CheckpointLayoutError(
            f"Could not get safetensor map for '{prefix}' and '{instance_name}': no key of the "
            f"weight map starts with '{block}'"
        )
    return dict(found)

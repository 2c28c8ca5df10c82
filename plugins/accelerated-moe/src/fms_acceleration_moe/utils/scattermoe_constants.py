"""Names of the reference's ScatterMoE state dict, kept for code written against it."""

from __future__ import annotations

PARAM_NAME_ROUTER_SCATTERMOE = "router"
# w1: gate projection (activated), w2: down projection, w3: up projection
PARAM_NAME_WEIGHT_SCATTERMOE = ["w1", "w2", "w3"]
KEY_SCATTERMOE_ROUTER = PARAM_NAME_ROUTER_SCATTERMOE + ".weight"

FILE_SAFETENSOR_INDEX = "model.safetensors.index.json"
KEY_REPLICATE = "replicate"
KEY_EXPERT_PARALLEL = "expert_parallel"
DIM_EXPERT = 0

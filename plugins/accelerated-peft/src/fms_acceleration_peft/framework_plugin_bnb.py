"""The `bitsandbytes` plugin: QLoRA with 4-bit (nf4/fp4) bitsandbytes base weights."""

from __future__ import annotations

from typing import Any

import torch

from fms_acceleration import AccelerationPlugin, AccelerationPluginConfigError, StanzaModel, choice

from .bnb_cpu_repack import disable_cpu_weight_repacking
from .bnb_dequant_check import check_4bit_dequantize
from .bnb_loading import QUANT_TYPES, load_4bit_model
from .dtypes import pop_requested_dtype, resolve_dtype
from .lora import lora_hits_on_embeddings
from .peft_wrapping import PEFT_WRAPPING_SLOT, QuantizedLoraPlugin, wrap_with_lora

BNB_STANZA = "peft.quantization.bitsandbytes"
QUANTIZE_EMBEDDINGS_KEY = f"plugins.{BNB_STANZA}.quantize_embeddings"


class BNBOptions(StanzaModel):
    """The `peft.quantization.bitsandbytes` stanza."""

    quant_type: choice(*QUANT_TYPES) = "nf4"
    """4-bit data type of the base weights"""
    no_peft_model: bool = False
    """true: only load in 4-bit; the trainer applies PEFT itself"""
    quantize_embeddings: bool = False
    """true: input embedding and lm_head (tied or not) in 4-bit too, frozen"""


class BNBAccelerationPlugin(QuantizedLoraPlugin):
    """Loads the model in 4-bit through BitsAndBytesConfig and applies the LoRA config itself."""

    require_packages = ("bitsandbytes", "peft")

    def __init__(self, configurations: dict[str, Any]):
        super().__init__(configurations)
        stanza = self.stanza(BNB_STANZA)
        self.quant_type: str = stanza["quant_type"]
        self.no_peft_model: bool = stanza["no_peft_model"]
        self.quantize_embeddings: bool = stanza["quantize_embeddings"]

    @property
    def requires_augmentation(self) -> bool:
        """False with no_peft_model (the trainer applies PEFT), unless quantize_embeddings must
        still check the LoraConfig against the 4-bit embeddings."""
        return not self.no_peft_model or self.quantize_embeddings

    def taken_slots(self) -> frozenset[str]:
        """model_loader always; peft_wrapping unless no_peft_model leaves PEFT to the trainer."""
        slots = super().taken_slots()
        return slots - {PEFT_WRAPPING_SLOT} if self.no_peft_model else slots

    def model_loader(self, model_name: str, **kwargs: Any):
        """Load `model_name` in 4-bit; `dtype` (default: the checkpoint's) is the compute dtype."""
        kwargs = dict(kwargs)
        requested = pop_requested_dtype(kwargs)
        try:
            dtype = resolve_dtype(requested, model_name, default=torch.float32)
            model = load_4bit_model(model_name, self.quant_type, dtype, **kwargs)
        except ValueError as err:
            raise AccelerationPluginConfigError(
                f"plugins.{BNB_STANZA}: model_loader: {err}"
            ) from None
        _refuse_wrong_dequantize(
            model.named_modules(),
            f"plugins.{BNB_STANZA}",
            "train on a GPU or on a CPU without AVX512F, or without this stanza (unquantized)",
        )
        if self.quantize_embeddings:
            from .bnb_embeddings import quantize_embeddings

            try:
                # quant storage = compute dtype, as bnb_4bit_config does for the block linears
                quantized = quantize_embeddings(model, self.quant_type, dtype, dtype)
            except ValueError as err:
                raise AccelerationPluginConfigError(f"{QUANTIZE_EMBEDDINGS_KEY}: {err}") from None
            disable_cpu_weight_repacking(model)  # the new lm_head is a Linear4bit too
            new = (quantized.embedding, quantized.lm_head)
            _refuse_wrong_dequantize(
                ((n, m) for n, m in model.named_modules() if any(m is x for x in new)),
                QUANTIZE_EMBEDDINGS_KEY,
                "set quantize_embeddings: false, or train on a GPU or on a CPU without AVX512F",
            )
        return model

    def augmentation(self, model, train_args, modifiable_args: tuple):
        """Prepare for k-bit training and apply modifiable_args[0] (a LoraConfig) -> (None,)."""
        # Also guards a model that was loaded elsewhere or evaluated since loading.
        disable_cpu_weight_repacking(model)
        if self.quantize_embeddings:
            self._refuse_lora_on_quantized_embeddings(model, modifiable_args)
        if self.no_peft_model:
            return model, modifiable_args
        return wrap_with_lora(
            model,
            train_args,
            modifiable_args,
            BNB_STANZA,
            hint="; pass one, or set no_peft_model: true to leave PEFT to the trainer",
        )

    @staticmethod
    def _refuse_lora_on_quantized_embeddings(model, modifiable_args: tuple) -> None:
        # peft cannot adapt an Embedding4bit, and training a lm_head that shares the 4-bit
        # embedding table would have to write into frozen, quantized storage.
        from peft import LoraConfig

        peft_config = modifiable_args[0] if modifiable_args else None
        if not isinstance(peft_config, LoraConfig):
            return
        hits = lora_hits_on_embeddings(model, peft_config)
        if hits:
            raise AccelerationPluginConfigError(
                f"{QUANTIZE_EMBEDDINGS_KEY}: true freezes the embeddings in 4-bit, but the "
                f"LoraConfig targets or saves {', '.join(hits)}; drop them from "
                "target_modules/modules_to_save or set quantize_embeddings: false"
            )


def _refuse_wrong_dequantize(modules, key: str, remedy: str) -> None:
    """Raise naming the module when bitsandbytes' CPU dequantize is wrong for its shape."""
    mismatches = check_4bit_dequantize(modules)
    if not mismatches:
        return
    first, *rest = mismatches
    also = "".join(f" Also wrong: {m.module} [{', '.join(map(str, m.case.shape))}]." for m in rest)
    raise AccelerationPluginConfigError(f"{key}: {first.describe()}{also} To proceed: {remedy}.")


AccelerationPlugin.register_plugin(
    BNBAccelerationPlugin,
    configuration_and_paths=[BNB_STANZA],
    plugin_id="bitsandbytes",
    package_name="fms-acceleration-peft",
    schemas={BNB_STANZA: BNBOptions},
)

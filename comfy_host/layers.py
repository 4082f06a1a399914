"""The attention layers of a ComfyUI model that identity adapters inject into, in adapter order."""
from __future__ import annotations

from dataclasses import dataclass

from comfy.ldm.modules.attention import SpatialTransformer

from ..guidance.adapter import AdapterFitError, IdentityAdapter


@dataclass(frozen=True)
class HostLayer:
    key: tuple                 # ComfyUI's patch key
    group: str                 # input / middle / output / double / single
    number: int                # block number within its group
    inner_dim: int
    heads: int = 0             # attention heads (InstantX's adapters normalise per head)


def diffusion_model(model):
    return model.get_model_object("diffusion_model")


def is_flux(model) -> bool:
    dm = diffusion_model(model)
    return hasattr(dm, "double_blocks") and hasattr(dm, "single_blocks")


def model_description(model) -> str:
    return f"{type(model.model).__name__} ({type(diffusion_model(model)).__name__})"


def unet_layers(model) -> list[HostLayer]:
    """Cross-attention layers in diffusers' processor order: down, up, then middle blocks."""
    dm = diffusion_model(model)
    layers = []
    for group, blocks in (("input", dm.input_blocks), ("output", dm.output_blocks), ("middle", [dm.middle_block])):
        for number, block in enumerate(blocks):
            for module in block:
                if isinstance(module, SpatialTransformer):
                    for index, tb in enumerate(module.transformer_blocks):
                        if getattr(tb, "attn2", None) is not None:
                            layers.append(HostLayer((group, number, index), group, number,
                                                    tb.attn2.to_q.out_features, tb.attn2.heads))
    return layers


def flux_layers(model) -> list[HostLayer]:
    dm = diffusion_model(model)
    heads = int(getattr(dm, "num_heads", 0))
    return ([HostLayer(("double_block", i), "double", i, dm.hidden_size, heads) for i in range(len(dm.double_blocks))]
            + [HostLayer(("single_block", i), "single", i, dm.hidden_size, heads) for i in range(len(dm.single_blocks))])


def host_layers(model) -> list[HostLayer]:
    return flux_layers(model) if is_flux(model) else unet_layers(model)


def adapter_layers(model, adapter: IdentityAdapter) -> list[HostLayer]:
    """The host layers the adapter's layers map to, in the adapter's order (XLabs' FLUX adapters
    cover the double blocks only)."""
    layers = host_layers(model)
    if is_flux(model) and adapter.config.flux_blocks == "double":
        layers = [layer for layer in layers if layer.group == "double"]
    return layers


def check_fit(adapter: IdentityAdapter, model, layers: list[HostLayer]) -> None:
    family = "flux" if is_flux(model) else "unet"
    dims = [layer.inner_dim for layer in layers]
    if adapter.config.family != family or tuple(dims) != adapter.config.layer_dims:
        which = " (double blocks)" if family == "flux" and adapter.config.flux_blocks == "double" else ""
        raise AdapterFitError(
            f"adapter '{adapter.name}' ({adapter.config.describe()}, layer widths "
            f"{_summary(adapter.config.layer_dims)}) does not fit the model {model_description(model)}, which has "
            f"{len(dims)} {family} attention layers{which} of widths {_summary(dims)}. Use an adapter made for this "
            "base model.")


def fit_summary(adapter: IdentityAdapter, embeds, model) -> str:
    """The three things that must fit, one line each, for error messages."""
    try:
        layers = host_layers(model)
        model_line = (f"{model_description(model)}: {len(layers)} {'flux' if is_flux(model) else 'unet'} "
                      f"attention layers of widths {_summary([layer.inner_dim for layer in layers])}")
    except Exception:   # a model this pack cannot inject into at all
        model_line = f"{model_description(model)}: no UNet cross-attention or FLUX blocks found"
    return (f"  adapter: '{adapter.name}', {adapter.config.describe()}, layer widths "
            f"{_summary(adapter.config.layer_dims)}\n  embeds: {embeds.describe()}\n  model: {model_line}")


def _summary(dims) -> str:
    dims = list(dims)
    return str(dims) if len(dims) <= 8 else f"[{', '.join(map(str, dims[:6]))}, ... {len(dims)} in all]"


def sigma_window(model, start_at: float, end_at: float) -> tuple[float, float]:
    sampling = model.get_model_object("model_sampling")
    return sampling.percent_to_sigma(start_at), sampling.percent_to_sigma(end_at)


def existing_patch(model, kind: str, key: tuple):
    """The replace patch ``model`` already has at ``key`` (ours or another pack's), or None."""
    return model.model_options["transformer_options"].get("patches_replace", {}).get(kind, {}).get(key)

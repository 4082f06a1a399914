"""The attention layers of a ComfyUI model that identity adapters inject into, in adapter order."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

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


def _joint_layers(model) -> list[HostLayer]:
    """One MM-DiT block list whose attention modules say their width and heads (Qwen-Image)."""
    blocks = diffusion_model(model).transformer_blocks
    return [HostLayer(("double_block", i), "double", i, block.attn.inner_dim, block.attn.heads)
            for i, block in enumerate(blocks)]


def _main_layers(model) -> list[HostLayer]:
    """Z-Image (NextDiT): its main layers (not the caption and noise refiners), which ComfyUI marks as double
    blocks in transformer_options while they run."""
    return [HostLayer(("double_block", i), "double", i, layer.attention.n_local_heads * layer.attention.head_dim,
                      layer.attention.n_local_heads) for i, layer in enumerate(diffusion_model(model).layers)]


@dataclass(frozen=True)
class DitFamily:
    """A DiT family the identity adapter injects into through ``patches_replace["dit"]`` and the attention
    override: the adapter family it takes, how the model is recognised (attributes its diffusion model has,
    and has not), its layers in adapter order and the adapter families it accepts (Chroma keeps FLUX.1's
    layout, so FLUX.1 adapters still apply there). Every family's joint attention runs over [text; image]."""
    name: str
    has: tuple[str, ...]
    has_not: tuple[str, ...]
    layers: Callable
    accepts: tuple[str, ...] = ()
    block_patches: bool = True      # False: no patches_replace["dit"]; the attention override finds the layer by
                                    # the block_type/block_index the model's forward writes in transformer_options

    def takes(self, adapter_family: str) -> bool:
        return adapter_family == self.name or adapter_family in self.accepts


DIT_FAMILIES = (
    DitFamily("flux2", ("double_blocks", "single_blocks", "double_stream_modulation_img"), (), flux_layers),
    DitFamily("chroma", ("double_blocks", "single_blocks", "distilled_guidance_layer"), (), flux_layers, ("flux",)),
    DitFamily("flux", ("double_blocks", "single_blocks"), (), flux_layers),
    DitFamily("qwen_image", ("transformer_blocks", "txt_norm", "img_in"), ("double_blocks",), _joint_layers),
    DitFamily("z_image", ("layers", "noise_refiner", "context_refiner", "x_pad_token"), ("double_blocks",), _main_layers,
              block_patches=False),
)


def dit_family(model) -> Optional[DitFamily]:
    """The identity adapter's DiT family of ``model``, or None (a UNet, or a model it cannot inject into)."""
    dm = diffusion_model(model)
    for family in DIT_FAMILIES:
        if all(hasattr(dm, a) for a in family.has) and not any(hasattr(dm, a) for a in family.has_not):
            return family
    return None


def model_family(model) -> str:
    family = dit_family(model)
    return family.name if family is not None else "unet"


def patch_size(model) -> int:
    """Latent pixels per image token along each side (FLUX.1, Chroma, Qwen-Image: 2; FLUX.2: 1)."""
    return int(getattr(diffusion_model(model), "patch_size", 2) or 2)


def host_layers(model) -> list[HostLayer]:
    family = dit_family(model)
    return family.layers(model) if family is not None else unet_layers(model)


def adapter_layers(model, adapter: IdentityAdapter) -> list[HostLayer]:
    """The host layers the adapter's layers map to, in the adapter's order (XLabs' FLUX adapters
    cover the double blocks only)."""
    layers = host_layers(model)
    if is_flux(model) and adapter.config.flux_blocks == "double":
        layers = [layer for layer in layers if layer.group == "double"]
    return layers


def check_fit(adapter: IdentityAdapter, model, layers: list[HostLayer]) -> None:
    family = model_family(model)
    dit = dit_family(model)
    dims = [layer.inner_dim for layer in layers]
    fits = dit.takes(adapter.config.family) if dit is not None else adapter.config.family == family
    if not fits or tuple(dims) != adapter.config.layer_dims:
        which = " (double blocks)" if adapter.config.family == "flux" and adapter.config.flux_blocks == "double" else ""
        raise AdapterFitError(
            f"adapter '{adapter.name}' ({adapter.config.describe()}, layer widths "
            f"{_summary(adapter.config.layer_dims)}) does not fit the model {model_description(model)}, which has "
            f"{len(dims)} {family} attention layers{which} of widths {_summary(dims)}. Use an adapter made for this "
            "base model.")


def fit_summary(adapter: IdentityAdapter, embeds, model) -> str:
    """The three things that must fit, one line each, for error messages."""
    try:
        layers = host_layers(model)
        model_line = (f"{model_description(model)}: {len(layers)} {model_family(model)} "
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

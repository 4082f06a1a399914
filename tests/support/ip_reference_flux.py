"""Whole-model checks of the FLUX IP-Adapter formats (see ``ip_reference``): ComfyUI's FLUX patched by
the pack against diffusers' FluxTransformer2DModel with XLabs' adapter (diffusers' own reader and
processor) or InstantX's (the re-implementation in ``ip_reference``), on identical random weights."""
from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch

from . import ip_layouts as L
from .ip_reference import CASES, InstantXProcessor, MLPProjModel, comfy_prediction, relative

LATENT = 8          # latent height and width: a 4 x 4 grid of image tokens
TEXT = 7


@functools.lru_cache(maxsize=None)
def flux_pair(joint_dim: int):
    import comfy.model_detection
    from .flux_layout import comfy_flux
    transformer = L.diffusers_flux(joint_dim)
    state = comfy.model_detection.convert_diffusers_mmdit({k: v.clone() for k, v in transformer.state_dict().items()},
                                                          "")
    return transformer, comfy_flux(state, L.FLUX["heads"], L.FLUX["axes"])


def pack(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(y: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b = y.shape[0]
    return y.view(b, h // 2, w // 2, -1, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, -1, h, w)


def image_ids(h: int, w: int) -> torch.Tensor:
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None]
    return ids.reshape(-1, 3)


def write_checkpoint(kind: str, folder: Path, seed: int):
    """The file in the authors' layout (XLabs: bf16 safetensors; InstantX: fp16 .bin) and its tensors."""
    from safetensors.torch import save_file
    if kind.startswith("xlabs"):
        state = L.xlabs_checkpoint(kind, L.FLUX["hidden"], L.FLUX["depth"], seed)
        save_file(state, str(folder / "ip_adapter.safetensors"))
        return folder / "ip_adapter.safetensors", state
    nested = L.instantx_checkpoint(L.FLUX["hidden"], L.FLUX["depth"] + L.FLUX["single"], seed)
    torch.save(nested, str(folder / "ip-adapter.bin"))
    return folder / "ip-adapter.bin", nested


def install_instantx(transformer, nested: dict) -> list:
    head_dim = L.FLUX["hidden"] // L.FLUX["heads"]
    names = list(transformer.attn_processors)        # double blocks, then single blocks: InstantX's numbering
    procs = {name: InstantXProcessor(nested["ip_adapter"][f"{i}.to_k_ip.weight"],
                                     nested["ip_adapter"][f"{i}.to_v_ip.weight"], head_dim, 1.0)
             for i, name in enumerate(names)}
    ordered = [procs[name] for name in names]
    transformer.set_attn_processor(procs)
    return ordered


def flux_check(kind: str, seed: int = 0) -> dict:
    """{"difference": largest relative difference of the CFG batch's velocity over a weighted and a
    masked case, "effect": relative change the identity makes to the reference's velocity}."""
    from omniid.comfy_host.identity import apply_identity
    from omniid.encoders.embeds import IdentityEmbeds
    from omniid.guidance.adapter_files import load_adapter
    transformer, model = flux_pair(L.FLUX_TOKEN_WIDTH[kind])
    with tempfile.TemporaryDirectory() as folder:
        path, state = write_checkpoint(kind, Path(folder), seed)
        adapter = load_adapter(str(path))
        if kind.startswith("xlabs"):
            L.load_xlabs_into_diffusers(transformer, folder, path.name)
    procs = install_instantx(transformer, state) if kind == "instantx" else [
        p for p in transformer.attn_processors.values() if hasattr(p, "to_k_ip")]
    projection = MLPProjModel(state["image_proj"]) if kind == "instantx" else None
    if kind.startswith("xlabs"):
        _mask_xlabs(procs)
    g = torch.Generator().manual_seed(seed + 200)
    x = torch.randn(1, 16, LATENT, LATENT, generator=g).expand(2, -1, -1, -1).contiguous()
    sigma, guidance = torch.tensor([0.8, 0.8]), torch.tensor([3.5, 3.5])
    context = torch.randn(2, TEXT, L.FLUX_TOKEN_WIDTH[kind], generator=g)
    pooled_text = torch.randn(2, L.FLUX["pooled_text"], generator=g)
    worst, effect = 0.0, None
    for weight, masked in CASES:
        images = 1 if masked else 2
        embeds = IdentityEmbeds("clip", {"pooled": torch.randn(images, L.POOLED_WIDTH, generator=g),
                                         "pooled_uncond": torch.randn(1, L.POOLED_WIDTH, generator=g)},
                                {"num_images": images})
        grid = LATENT // 2
        mask = torch.rand(1, grid, grid, generator=g) if masked else None
        patched = apply_identity(model, adapter, adapter.identity_tokens(embeds), weight, 0.0, 1.0, mask=mask)
        ours = comfy_prediction(patched, x, sigma, c_crossattn=context, y=pooled_text, guidance=guidance)
        image_mask = None if mask is None else mask.reshape(1, -1, 1)
        for index, proc in enumerate(procs):
            single = kind == "instantx" and index >= L.FLUX["depth"]
            proc.token_mask = image_mask if (image_mask is None or not single) else torch.cat(
                [torch.zeros(1, TEXT, 1), image_mask], 1)

        def reference(scale):
            for proc in procs:
                proc.scale = scale if kind == "instantx" else [scale]
            rows = []
            for row, pooled in ((0, embeds.tensors["pooled"]), (1, embeds.tensors["pooled_uncond"])):
                if kind == "instantx":
                    kwargs = {"ip_hidden_states": projection(pooled).reshape(1, -1, projection.width)}
                else:
                    kwargs = {"ip_adapter_image_embeds": [pooled[None]]}
                with torch.no_grad():
                    v = transformer(hidden_states=pack(x[row:row + 1]), encoder_hidden_states=context[row:row + 1],
                                    pooled_projections=pooled_text[row:row + 1], timestep=sigma[row:row + 1],
                                    img_ids=image_ids(LATENT, LATENT), txt_ids=torch.zeros(TEXT, 3),
                                    guidance=guidance[row:row + 1], joint_attention_kwargs=kwargs).sample
                rows.append(unpack(v, LATENT, LATENT))
            return torch.cat(rows)

        expected = reference(weight)
        worst = max(worst, relative(ours, expected))
        if effect is None:
            effect = relative(reference(0.0), expected)
    return {"difference": worst, "effect": effect}


def _mask_xlabs(procs: list) -> None:
    """diffusers' XLabs processors, with the identity term multiplied by ``token_mask`` when one is set
    (the references have no masks; this multiplication is the test's)."""
    base = type(procs[0])

    class Masked(base):
        token_mask = None

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None, ip_hidden_states=None, ip_adapter_masks=None):
            out = super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                                   ip_hidden_states, ip_adapter_masks)
            if self.token_mask is None or not (isinstance(out, tuple) and len(out) == 3):
                return out
            return out[0], out[1], out[2] * self.token_mask

    for proc in procs:
        proc.__class__ = Masked

"""A diffusers model as the frozen denoiser of the flow-matching objective (``training.flow_matching``).

Implements ``DenoiserHost``: each step installs the step's identity keys/values (which carry
gradients back to the adapter and the encoder) as the layers' injections, through the same
processors ``apply_identity`` uses, and runs the model. SD1.5/SDXL are epsilon models on the
DDPM schedule, written in sigma form as ComfyUI does: x_t = x0 + sigma eps, the UNet reads
x_t / sqrt(sigma^2 + 1) at the timestep of sigma, D(x_t) = x_t - sigma eps_hat. FLUX is a
flow model: x_t = (1 - sigma) x0 + sigma eps, the transformer reads the packed latent at
timestep sigma and predicts the velocity v, D(x_t) = x_t - sigma v. Noise levels are drawn as the
ComfyUI host draws them: u -> its model_sampling's percent_to_sigma (the discrete schedule in
log sigma; FLUX's shifted schedule with mu = 1.15), both checked against ComfyUI's in
tests/comfy/test_diffusers_parity.py.
"""
from __future__ import annotations

import math

import torch

from ..guidance.decoupled import COND, UNCOND, LayerInjection
from .identity import call_state, set_layer_injections
from .layers import host_layers, is_flux, model_family


def ddpm_sigmas(scheduler: dict) -> torch.Tensor:
    """The sigmas of the discrete schedule (SD's scaled_linear 0.00085 .. 0.012 over 1000 steps by default)."""
    steps = int(scheduler.get("num_train_timesteps", 1000))
    start, end = float(scheduler.get("beta_start", 0.00085)), float(scheduler.get("beta_end", 0.012))
    if scheduler.get("beta_schedule", "scaled_linear") == "scaled_linear":
        betas = torch.linspace(start ** 0.5, end ** 0.5, steps, dtype=torch.float64) ** 2
    else:
        betas = torch.linspace(start, end, steps, dtype=torch.float64)
    alphas = torch.cumprod(1 - betas, 0)
    return ((1 - alphas) / alphas).sqrt()


def unet_sigma_window(start_at: float, end_at: float, scheduler: dict | None = None) -> tuple[float, float]:
    """(sigma_start, sigma_end) of an SD1.5/SDXL start_at/end_at (fractions of the schedule), as ComfyUI's
    discrete model_sampling turns them into sigmas: percent p is the sigma at timestep (1 - p) x 999,
    interpolated in log sigma."""
    sigmas = ddpm_sigmas(scheduler or {}).float()
    log = sigmas.log()

    def at(percent: float) -> float:
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        t = (1.0 - percent) * (len(sigmas) - 1)
        low = min(int(t), len(sigmas) - 2)
        w = t - low
        return float((log[low] * (1 - w) + log[low + 1] * w).exp())

    return at(start_at), at(end_at)


FLUX_SHIFT = 1.15          # FLUX's time shift mu, ComfyUI's default for FLUX models
SHIFTS = {"flux2": 2.02}   # the families ComfyUI samples with another shift (its sampling_settings)
FAMILY_HOSTS = ("flux2", "chroma", "qwen_image", "z_image")   # DiTs whose latents and call live in a module of their name


def family_host(family: str):
    """The module with ``latent(vae, pixels)`` and ``velocity(model, x, sigma, text, device, dtype, guidance)``."""
    import importlib
    return importlib.import_module(f"{__package__}.{family}")


def flux_percent_to_sigma(percent: float, shift: float = FLUX_SHIFT) -> float:
    """FLUX's shifted schedule: the sigma at fraction ``percent`` of sampling, t = 1 - percent mapped to
    e^mu / (e^mu + 1/t - 1) (SD3/FLUX's time shift), 1 at the start and 0 at the end."""
    if percent <= 0.0:
        return 1.0
    if percent >= 1.0:
        return 0.0
    t = 1.0 - percent
    return math.exp(shift) / (math.exp(shift) + (1.0 / t - 1.0))


def flux_sigma_window(start_at: float, end_at: float, shift: float = FLUX_SHIFT) -> tuple[float, float]:
    """(sigma_start, sigma_end) of a FLUX start_at/end_at, as ComfyUI's FLUX model_sampling makes them."""
    return flux_percent_to_sigma(start_at, shift), flux_percent_to_sigma(end_at, shift)


class DiffusersDenoiserHost:
    def __init__(self, base, image_size: int, device=None, dtype=torch.float32, guidance: float = 1.0):
        self.base, self.model, self.vae = base, base.model, base.vae
        self.flux = is_flux(self.model)
        self.family = model_family(self.model)
        self.flow = self.family != "unet"          # flow-matching DiTs: x_t = (1 - sigma) x0 + sigma eps
        self.layers = host_layers(self.model)
        self.image_size, self.guidance = image_size, guidance
        self.device = torch.device(device or "cpu")
        self.dtype = dtype
        if not self.flow:
            prediction = base.scheduler.get("prediction_type", "epsilon")
            if prediction != "epsilon":
                raise ValueError(f"the diffusers host trains on epsilon-prediction UNets; this one predicts {prediction}")
            self.sigmas = ddpm_sigmas(base.scheduler).float()
        call_state(self.model)

    def check_adapter(self, adapter) -> None:
        dims = tuple(layer.inner_dim for layer in self.layers)
        if adapter.config.layer_dims != dims:
            raise ValueError(f"the adapter has {len(adapter.config.layer_dims)} layers {adapter.config.layer_dims}, "
                             f"this model's attention layers are {dims}")

    # -- latents and noise --------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) images in [0, 1] -> the model's latents (the VAE's mean, scaled and shifted)."""
        pixels = images[..., :3].permute(0, 3, 1, 2).to(self.device, torch.float32) * 2 - 1
        if self.family in FAMILY_HOSTS:
            return family_host(self.family).latent(self.vae.to(self.device), pixels).float().cpu()
        latent = self.vae.to(self.device).encode(pixels).latent_dist.mean
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((latent - shift) * self.vae.config.scaling_factor).float().cpu()

    def sigma_at(self, u: torch.Tensor) -> torch.Tensor:
        """u in (0, 1) -> sigma, as the ComfyUI host draws them (its model_sampling's percent_to_sigma)."""
        if self.flow:
            shift = SHIFTS.get(self.family, FLUX_SHIFT)
            return torch.tensor([flux_percent_to_sigma(float(x), shift) for x in u.reshape(-1)])
        return self.sigma_of_timestep((1 - u.float()) * (len(self.sigmas) - 1))

    def sigma_of_timestep(self, t: torch.Tensor) -> torch.Tensor:
        low = t.floor().long().clamp(0, len(self.sigmas) - 2)
        w = t - low
        log = self.sigmas.log()
        return (log[low] * (1 - w) + log[low + 1] * w).exp()

    def timestep_of_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        log = self.sigmas.log().to(sigma.device)
        s = sigma.float().log().clamp(log[0], log[-1])
        high = torch.searchsorted(log, s).clamp(1, len(log) - 1)
        low = high - 1
        w = (s - log[low]) / (log[high] - log[low])
        return low.float() + w

    def noise(self, x0, sigma, eps):
        s = sigma.reshape(-1, *([1] * (x0.dim() - 1)))
        return (1 - s) * x0 + s * eps if self.flow else x0 + s * eps

    # -- the model call -------------------------------------------------------------------
    def _text(self, batch: int) -> dict:
        t = self.base.text
        dtype, device = self.dtype, self.device
        config = self.model.config
        if self.flux:
            context = t.get("encoder_hidden_states", torch.zeros(1, 1, config.joint_attention_dim))
            pooled = t.get("pooled_projections", torch.zeros(1, config.pooled_projection_dim))
            return {"encoder_hidden_states": context.to(device, dtype).expand(batch, -1, -1),
                    "pooled_projections": pooled.to(device, dtype).expand(batch, -1)}
        cross = config.cross_attention_dim
        cross = cross[0] if isinstance(cross, (list, tuple)) else cross
        out = {"encoder_hidden_states": t.get("encoder_hidden_states", torch.zeros(1, 77, cross))
               .to(device, dtype).expand(batch, -1, -1)}
        if config.addition_embed_type == "text_time":
            pooled_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            pooled = t.get("text_embeds", torch.zeros(1, pooled_dim)).to(device, dtype)
            size = float(self.image_size)
            time_ids = torch.tensor([[size, size, 0.0, 0.0, size, size]], device=device, dtype=dtype)
            out["added_cond_kwargs"] = {"text_embeds": pooled.expand(batch, -1), "time_ids": time_ids.expand(batch, -1)}
        return out

    def set_identity(self, identity_kv, text_attention: bool = True) -> None:
        for layer, (keys, values) in zip(self.layers, identity_kv):
            injection = LayerInjection({COND: keys, UNCOND: keys}, {COND: values, UNCOND: values}, 1.0)
            set_layer_injections(self.model, layer, (injection,), identity_only=not text_attention)

    def denoise_conditioned(self, x_t, sigma, conditioning, token: int):
        """``training.pivot.PivotHost``: D(x_t) with the prompt's conditioning replaced (per sample), and
        ``token``'s cross-attention map (B, h*w) at the grid nearest 1/16 of the latent, and that grid."""
        from ..guidance.attention_capture import AttentionMaps
        from ..guidance.decoupled import token_grid
        if self.flow:
            raise ValueError("the pivot encoder replaces a word of a CLIP text conditioning: use an SD1.5 or SDXL model")
        for layer in self.layers:              # plain cross-attention, with the maps recorded
            set_layer_injections(self.model, layer, ())
        maps = AttentionMaps(token=token, track_grad=True)
        x = x_t.to(self.device, torch.float32)
        s = sigma.to(self.device, torch.float32)
        state = call_state(self.model)
        state.sigmas, state.cond_or_uncond, state.latent_shape, state.maps = s, (), tuple(x.shape), maps
        try:
            text = self._text(x.shape[0])
            text["encoder_hidden_states"] = conditioning.to(self.device, self.dtype)
            c_in = 1 / (s ** 2 + 1).sqrt()
            eps = self.model((x * c_in.reshape(-1, 1, 1, 1)).to(self.dtype), self.timestep_of_sigma(s),
                             **text).sample.float()
        finally:
            state.maps = None
        out = x - s.reshape(-1, 1, 1, 1) * eps
        n = maps.nearest(max(1, x.shape[-2] * x.shape[-1] // 16))
        if n is None or maps.cross_map(n) is None:
            raise ValueError("the model made no cross-attention call to record")
        return out.float().cpu(), maps.cross_map(n).cpu(), token_grid(n, *x.shape[-2:])

    def denoise(self, x_t, sigma, identity_kv, text_attention: bool) -> torch.Tensor:
        if self.flow and not text_attention:
            raise ValueError("identity-enhanced training (text attention off) needs a UNet model (SD1.5/SDXL): "
                             "FLUX and the other DiTs attend to text and image in one joint attention")
        # the injections stay installed after the call: a checkpointed block recomputes with them in backward
        self.set_identity(identity_kv, text_attention)
        x = x_t.to(self.device, torch.float32)
        s = sigma.to(self.device, torch.float32)
        b = x.shape[0]
        state = call_state(self.model)
        state.sigmas, state.cond_or_uncond, state.latent_shape = s, (), tuple(x.shape)
        if self.flow:
            if self.flux:
                velocity = self._flux(x, s)
            else:
                velocity = family_host(self.family).velocity(self.model, x, s, self.base.text, self.device, self.dtype,
                                                             self.guidance)
            out = x - s.reshape(-1, 1, 1, 1) * velocity
        else:
            c_in = 1 / (s ** 2 + 1).sqrt()
            eps = self.model((x * c_in.reshape(-1, 1, 1, 1)).to(self.dtype), self.timestep_of_sigma(s),
                             **self._text(b)).sample.float()
            out = x - s.reshape(-1, 1, 1, 1) * eps
        return out.float().cpu()

    def _flux(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        packed = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
        rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).to(self.device, self.dtype)
        text = self._text(b)
        txt_ids = torch.zeros(text["encoder_hidden_states"].shape[1], 3, device=self.device, dtype=self.dtype)
        guidance = (torch.full((b,), self.guidance, device=self.device, dtype=self.dtype)
                    if self.model.config.guidance_embeds else None)
        v = self.model(hidden_states=packed.to(self.dtype), timestep=sigma.to(self.dtype), img_ids=img_ids,
                       txt_ids=txt_ids, guidance=guidance, **text).sample.float()
        return v.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

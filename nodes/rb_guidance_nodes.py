"""OmniPortrait RB-Guidance as a GUIDER for SamplerCustomAdvanced (any sampler, any scheduler).

The guider is ComfyUI's CFGGuider plus, while t <= u T, the gradient of E = p / (1 + S) on
z_t. Diffusion features and attention maps come from ComfyUI's public extension points:
an ``output_block_patch`` captures the chosen up-block's input (the forward stops there:
nothing after it is needed for the gradient) and an ``optimized_attention_override``
records attention maps at 1/4 of the latent's resolution (16 x 16 for SD1.5 at 512 px).
Gradients: ComfyUI loads weights as inference tensors, so the guider's model clone gets
weight functions, which make every layer use a fresh copy of its weight; the tracked
forward then runs outside inference mode.
"""
from __future__ import annotations

import math
from typing import Optional

import comfy.model_management
import comfy.samplers
import torch
import torch.nn.functional as F
from comfy_api.latest import io

from ..encoders.face import crop as face_crop_core
from ..encoders.face.alignment import face_outline, render_mask
from ..guidance.decoupled import token_grid
from ..guidance.rb_guidance import (RBSettings, apply_guidance, guidance_gradient, mask_to_latent, normalize,
                                    refine_mask)
from .common import CATEGORY, LOG
from .hosts import gradient_ready

ATTENTION_FACTOR = 4      # attention maps at latent / 4: the paper's 16 x 16 for SD1.5 at 512 px


class StopForward(Exception):
    """Raised by the feature capture once the features are in hand."""


class FeatureCapture:
    """output_block_patch: keep the input of output block ``block`` (the DIFT features).

    ``stop``: end the forward there (nothing after it is needed). Otherwise the forward goes
    on detached from the graph, so only the path to the features is kept for the backward.
    """

    def __init__(self, block: int, stop: bool):
        self.block = block
        self.stop = stop
        self.features: Optional[torch.Tensor] = None

    def __call__(self, h, hsp, transformer_options):
        kind, index = tuple(transformer_options.get("block", ("", -1)))[:2]
        if kind != "output" or index < self.block:
            return h, hsp
        if index == self.block:
            self.features = h
            if self.stop:
                raise StopForward
        return h.detach(), hsp.detach()


class AttentionCapture:
    """optimized_attention_override: head-averaged attention maps per token grid, detached.

    Grids of up to ``MAX_TOKENS`` tokens are recorded (self-attention maps are N x N); the
    guider then uses the grid nearest to latent / 4.
    """

    MAX_TOKENS = 1024

    def __init__(self, subject_token: int, previous=None):
        self.subject_token = subject_token
        self.previous = previous
        self.cross: dict[int, list[torch.Tensor]] = {}
        self.self_maps: dict[int, list[torch.Tensor]] = {}

    def __call__(self, func, q, k, v, heads, *args, **kwargs):
        out = (self.previous(func, q, k, v, heads, *args, **kwargs) if self.previous is not None
               else func(q, k, v, heads, *args, **kwargs))
        if kwargs.get("skip_reshape") or q.ndim != 3:
            return out
        n = q.shape[1]
        is_self = k.shape[1] == n
        if n <= self.MAX_TOKENS and (is_self or 0 < self.subject_token < k.shape[1]):
            with torch.no_grad():
                b, _, inner = q.shape
                d = inner // heads
                qh = q.detach().float().view(b, n, heads, d).transpose(1, 2)
                kh = k.detach().float().view(b, k.shape[1], heads, d).transpose(1, 2)
                probs = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1).mean(dim=1)
            if is_self:
                self.self_maps.setdefault(n, []).append(probs)
            else:
                self.cross.setdefault(n, []).append(probs[..., self.subject_token])
        return out

    def maps(self, batch: int, target_tokens: int):
        """(tokens, cross map (B, N) or None, self maps (B, N, N) or None) at the grid nearest the target."""
        grids = sorted(set(self.self_maps) | set(self.cross), key=lambda n: abs(math.log(n / target_tokens)))
        if not grids:
            return None, None, None
        n = grids[0]
        cross = torch.stack(self.cross[n]).mean(0)[:batch] if n in self.cross else None
        self_maps = torch.stack(self.self_maps[n]).mean(0)[:batch] if n in self.self_maps else None
        return n, cross, self_maps


def _grid(hw: tuple[int, int], factor: int) -> tuple[int, int]:
    return -(-hw[0] // factor), -(-hw[1] // factor)


def _resize_mask(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B or 1, H, W) image-space mask -> (B or 1, h*w) bool on a feature grid."""
    resized = F.interpolate(mask[:, None].float(), size=grid, mode="bilinear", align_corners=False)
    return (resized > 0.5).reshape(mask.shape[0], -1)


def _to_grid(soft: torch.Tensor, source: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(soft.reshape(-1, 1, *source), size=target, mode="bilinear",
                         align_corners=False).reshape(soft.shape[0], -1)


class RBGuider(comfy.samplers.CFGGuider):
    def __init__(self, model_patcher, settings: RBSettings, reference_latent: torch.Tensor,
                 reference_mask: Optional[torch.Tensor], generation_mask: Optional[torch.Tensor],
                 feature_block: int, subject_token: int, seed: int):
        super().__init__(model_patcher)
        self.settings = settings
        self.reference_latent = reference_latent
        self.reference_mask_image = reference_mask
        self.generation_mask_image = generation_mask
        self.feature_block = feature_block
        self.subject_token = subject_token
        self.seed = seed
        self.reference = None
        self.reference_passes = 0
        self.guided_steps = 0
        self.last_score: Optional[torch.Tensor] = None

    def inner_sample(self, *args, **kwargs):
        self.reference = None                   # new run: new reference features
        return super().inner_sample(*args, **kwargs)

    # -- one UNet pass with captures ---------------------------------------------------------
    def _run(self, x: torch.Tensor, sigma: torch.Tensor, model_options: dict, cond, stop: bool):
        """(prediction or None when stopped, features (B, C, h, w), attention maps)."""
        target = math.prod(_grid(tuple(x.shape[-2:]), ATTENTION_FACTOR))
        options = dict(model_options)
        transformer = dict(options.get("transformer_options", {}))
        patches = dict(transformer.get("patches", {}))
        features = FeatureCapture(self.feature_block, stop)
        attention = AttentionCapture(self.subject_token, transformer.get("optimized_attention_override"))
        patches["output_block_patch"] = list(patches.get("output_block_patch", [])) + [features]
        transformer["patches"] = patches
        transformer["optimized_attention_override"] = attention
        options["transformer_options"] = transformer
        prediction = None
        try:
            prediction = comfy.samplers.calc_cond_batch(self.inner_model, [cond], x, sigma, options)[0]
        except StopForward:
            pass
        if features.features is None:
            raise ValueError(f"feature_block {self.feature_block} is past this model's output blocks")
        feats = features.features[: x.shape[0]]
        tokens, cross, self_maps = attention.maps(x.shape[0], target)
        grid = token_grid(tokens, *x.shape[-2:]) if tokens else None
        return prediction, feats, (grid, cross, self_maps)

    def _reference(self, model_options: dict, like: torch.Tensor):
        sampling = self.inner_model.model_sampling
        z = self.inner_model.process_latent_in(self.reference_latent.to(like.device, like.dtype))
        sigma0 = sampling.sigma(torch.tensor([float(self.settings.t0)], device=like.device)).to(like.dtype)
        noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(self.seed)).to(z)
        with torch.no_grad():
            _, feats, _ = self._run(z + sigma0.reshape(-1, 1, 1, 1) * noise, sigma0, model_options,
                                    self.conds["positive"], stop=True)
        grid = tuple(feats.shape[-2:])
        flat = feats[0].flatten(1).transpose(0, 1)                                        # (Nr, C)
        if self.reference_mask_image is not None:
            mask = _resize_mask(self.reference_mask_image[:1].to(flat.device), grid)[0]
        else:
            mask = torch.ones(flat.shape[0], dtype=torch.bool, device=flat.device)
        self.reference_passes += 1
        return flat.detach(), mask

    def _generation_mask(self, feats, attention, ref_feats, ref_mask):
        batch, grid = feats.shape[0], tuple(feats.shape[-2:])
        if self.generation_mask_image is not None:
            mask = _resize_mask(self.generation_mask_image.to(feats.device), grid)
            return mask.expand(batch, -1) if mask.shape[0] == 1 else mask
        attention_grid, cross, self_maps = attention
        attention_grid = attention_grid or grid
        if cross is None:   # no subject token: locate the face by its resemblance to the reference face
            flat = F.normalize(feats.detach().flatten(2).transpose(1, 2).float(), dim=-1)
            ref = F.normalize(ref_feats[ref_mask].float(), dim=-1)
            similarity = torch.einsum("bnc,rc->bnr", flat, ref).amax(-1)
            cross = _to_grid(normalize(similarity), grid, attention_grid)
        if self_maps is None:
            soft = normalize(cross)
        else:
            soft, _ = refine_mask(cross, self_maps, self.settings.iterations, self.settings.alpha,
                                  self.settings.threshold)
        return _to_grid(soft, attention_grid, grid) > self.settings.threshold

    # -- the guidance ------------------------------------------------------------------------
    def predict_noise(self, x, timestep, model_options={}, seed=None):
        sampling = self.inner_model.model_sampling
        t = float(sampling.timestep(timestep).reshape(-1)[0])
        if not self.settings.active(t):
            return super().predict_noise(x, timestep, model_options, seed)
        comfy.model_management.throw_exception_if_processing_interrupted()
        return self._guided(x, timestep, model_options)

    def _guided(self, x, timestep, model_options):
        """CFG whose conditional pass is the tracked one, plus the energy gradient.

        Mirrors ComfyUI's sampling_function (pre-CFG hooks, cfg_function with its post-CFG
        hooks), with the conditional branch evaluated once, with the graph to the features.
        """
        cond, uncond = self.conds.get("positive"), self.conds.get("negative")
        latent_hw = tuple(x.shape[-2:])
        with torch.inference_mode(False):
            x_tracked, sigma = x.clone(), timestep.clone()
            if self.reference is None:
                self.reference = self._reference(model_options, x_tracked)
            ref_feats, ref_mask = self.reference
            state = {}

            def features_fn(z):
                prediction, feats, attention = self._run(z, sigma, model_options, cond, stop=False)
                state["cond"], state["grid"] = prediction.detach(), tuple(feats.shape[-2:])
                return feats.flatten(2).transpose(1, 2), self._generation_mask(feats, attention, ref_feats, ref_mask)

            grad, score, _ = guidance_gradient(
                x_tracked, features_fn, ref_feats, ref_mask, self.settings.strength,
                latent_mask=lambda m: mask_to_latent(m, state["grid"], latent_hw))
        cfg1 = math.isclose(self.cfg, 1.0) and not model_options.get("disable_cfg1_optimization", False)
        uncond_ = None if cfg1 else uncond
        uncond_pred = (comfy.samplers.calc_cond_batch(self.inner_model, [uncond_], x, timestep, model_options)[0]
                       if uncond_ is not None else None)
        out = [state["cond"].to(x.dtype), uncond_pred]
        for fn in model_options.get("sampler_pre_cfg_function", []):
            out = fn({"conds": [cond, uncond_], "conds_out": out, "cond_scale": self.cfg, "timestep": timestep,
                      "input": x, "sigma": timestep, "model": self.inner_model, "model_options": model_options})
        denoised = comfy.samplers.cfg_function(self.inner_model, out[0], out[1], self.cfg, x, timestep,
                                               model_options=model_options, cond=cond, uncond=uncond_)
        self.guided_steps += 1
        self.last_score = score
        return apply_guidance(denoised, timestep, grad.to(denoised.device))


def reference_face_mask(image: torch.Tensor, face_analysis) -> torch.Tensor:
    """(1, H, W) face mask of the reference photo from its landmarks (largest face)."""
    found = face_analysis.detect(face_crop_core.to_uint8(image[0]), with_embedding=False)
    if not found:
        raise ValueError("no face found in the reference image: give a reference_mask, or a clearer photo")
    face = max(found, key=lambda f: f.area)
    height, width = image.shape[1:3]
    size = max(height, width)
    mask = render_mask(face_outline(face), size)[:height, :width]
    return mask[None]


class RBGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniIdentityRBGuidance",
            display_name="RB-Guidance (OmniIdentity)",
            category=f"{CATEGORY}/guidance",
            description=(
                "OmniPortrait's training-free RB-Guidance as a GUIDER for SamplerCustomAdvanced: CFG, plus, while "
                "t <= start_fraction x T, the gradient of E = p / (1 + S) on the latent, where S matches diffusion "
                "features (DIFT) of the reference face (noised to t0) and of the generated face, inside face masks; "
                "the gradient is masked to the face. About twice the cost of plain CFG in the guided steps."),
            inputs=[
                io.Model.Input("model", tooltip="SD1.5 or SDXL model, usually already carrying an identity adapter."),
                io.Conditioning.Input("positive", tooltip="Positive prompt."),
                io.Conditioning.Input("negative", tooltip="Negative prompt."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, tooltip="CFG scale."),
                io.Image.Input("reference", tooltip="Reference photo of the face (its first image is used)."),
                io.Vae.Input("vae", tooltip="The model's VAE, to encode the reference."),
                io.Float.Input("strength", default=8.5, min=0.0, max=100.0, step=0.1,
                               tooltip="p in E = p / (1 + S); 0 turns the guidance off (plain CFG)."),
                io.Float.Input("start_fraction", default=0.6, min=0.0, max=1.0, step=0.01,
                               tooltip="u: guidance only while t <= u x T (the paper's 0.6)."),
                io.Int.Input("t0", default=671, min=0, max=999,
                             tooltip="Timestep the reference is noised to for its features (the paper's 671)."),
                io.Int.Input("feature_block", default=6, min=1, max=64, optional=True,
                             tooltip="DIFT features: the input of this output block (6 = after SD1.5's second "
                                     "up-block, 32 x 32 at 512 px)."),
                io.Int.Input("subject_token", default=0, min=0, max=76, optional=True,
                             tooltip="Position of the subject word in the positive prompt (CLIP tokens, 1 = first "
                                     "word) for the attention-derived face mask; 0 = locate the face by its "
                                     "resemblance to the reference."),
                io.FaceAnalysis.Input("face_analysis", optional=True,
                                      tooltip="Face analysis to mask the reference's face (else reference_mask, else "
                                              "the whole reference)."),
                io.Mask.Input("reference_mask", optional=True, tooltip="Explicit face mask of the reference."),
                io.Mask.Input("generation_mask", optional=True,
                              tooltip="Explicit face mask of the generated image (skips the attention mask)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, optional=True,
                             tooltip="Seed of the noise added to the reference."),
            ],
            outputs=[
                io.Guider.Output(display_name="guider", tooltip="For SamplerCustomAdvanced."),
                io.Image.Output(display_name="mask_preview", tooltip="The reference with its face mask in red."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, negative, cfg, reference, vae, strength, start_fraction, t0,
                feature_block=6, subject_token=0, face_analysis=None, reference_mask=None, generation_mask=None,
                seed=0) -> io.NodeOutput:
        settings = RBSettings(strength=strength, start_fraction=start_fraction, t0=t0)
        image = reference[:1, :, :, :3]
        if reference_mask is None and face_analysis is not None:
            reference_mask = reference_face_mask(image, face_analysis)
        elif reference_mask is not None:
            reference_mask = reference_mask if reference_mask.ndim == 3 else reference_mask[None]
        height, width = (image.shape[1] // 8) * 8, (image.shape[2] // 8) * 8
        latent = vae.encode(image[:, :height, :width])
        if reference_mask is not None:
            reference_mask = reference_mask[:, :height, :width]
        guider = RBGuider(gradient_ready(model), settings, latent, reference_mask,
                          None if generation_mask is None else (generation_mask if generation_mask.ndim == 3
                                                                else generation_mask[None]),
                          feature_block, subject_token, seed)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        preview = image[:, :height, :width].clone()
        if reference_mask is not None:
            m = reference_mask[:1, :, :, None].to(preview)
            preview = preview * (1 - 0.5 * m) + 0.5 * m * torch.tensor([1.0, 0.0, 0.0]).to(preview)
        LOG.info("RB-Guidance: p=%s, u=%s, t0=%s, feature block %s, subject token %s", strength, start_fraction, t0,
                 feature_block, subject_token or "auto")
        return io.NodeOutput(guider, preview)


NODES = [RBGuidance]

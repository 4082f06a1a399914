"""RB-Guidance on Qwen-Image (and its edit variant) and Z-Image in process: run with the Python that runs ComfyUI.

    python tests/comfy/rb_qwen_zimage_inprocess.py --comfyui PATH --family {qwen_image,z_image}

Tiny models with random weights in the published layouts (diffusers' QwenImageTransformer2DModel over
Qwen-Image's 16-channel latent; tests/support/tiny_diffusers.py's Z-Image), configured by ComfyUI's detection
and loaded in inference mode as ComfyUI's loaders do, sampled by ComfyUI's euler sampler over 4 explicit
sigmas (the last 2 guided):
- strength 0 samples ComfyUI's CFGGuider's latents bit for bit (Qwen-Image plain and with an edit's reference
  latent in the conditioning; Z-Image), cfg 2 so both branches run;
- the push: a toy first block (Qwen-Image: a block replace patch placed before the guider's; Z-Image: a
  ``double_block`` patch placed before the guider's, as another pack's would be) makes the features a toy
  function of the latent's patches; at the first guided step the guided x0 minus the plain x0 equals
  -sigma / (1 - sigma) times the masked gradient of E = p / (1 + S) written out here by hand (the reference
  noised the flow's way at t0);
- the subject mask: an attention override placed outside the guider's (another pack's, called first) makes
  the generated image's queries of a 2 x 3 block find the subject word's key, in every joint attention of the
  main blocks (told apart by their length alone); the guider's refined mask is that block. With the edit's
  reference latent the features and maps cover the generated image's tokens only;
- the subject word found with Qwen-Image's (Qwen2.5-VL) and Z-Image's (Qwen3) own tokenizers, directly and
  through the node's set-up (rb_setup.rb_guider), whose preview lines name the word and the feature block.
Prints one JSON line of facts that tests/comfy/test_rb_qwen_image.py (ComfyUI 0.3.64 has Qwen-Image too) and
test_rb_z_image.py (ComfyUI 0.33 only) assert.
"""
from __future__ import annotations

import json

import comfy_process
from rb_flux_inprocess import expected_push

SIGMAS = (1.0, 0.8, 0.55, 0.3, 0.0)                   # 4 steps, the last 2 guided (sigma <= 0.6)
TEXT, SUBJECT = 6, 3                                   # prompt tokens, the subject's index among them


class StreamLength:
    """dit replace patch before the guider's: how many tokens the image stream has."""

    def __init__(self):
        self.lengths = []

    def __deepcopy__(self, memo):
        return self

    def __call__(self, args, extra, *more, **kwargs):
        self.lengths.append(int(args["img"].shape[1]))
        return extra["original_block"](args)


def toy(h):
    import torch
    return torch.tanh(h) * 1.5 + 0.5 * h


class ToyBlock:
    """Qwen-Image: dit replace patch standing in for block 0, a toy function of its image tokens img_in(patches)."""

    def __call__(self, args, extra, *more, **kwargs):
        return {"txt": args["txt"], "img": toy(args["img"])}


class ToyLayer:
    """Z-Image: double_block patch after main layer 0 that makes its generated image's tokens toy(patches W^T)."""

    def __init__(self, weight, count):
        self.weight, self.count = weight, count

    def __call__(self, args, *more, **kwargs):
        import torch
        if args["block_index"] != 0:
            return {}
        img = args["img"]
        tokens = z_patches(args["x"]) @ self.weight.to(img).T
        return {"img": torch.cat([toy(tokens), img[:, self.count:]], dim=1)}


def qwen_patches(z):          # ComfyUI's Qwen-Image patchify: (B, C, 1, H, W) -> (B, h w, C 2 2)
    b, c, t, h, w = z.shape
    patches = z.reshape(b, c, t, h // 2, 2, w // 2, 2).permute(0, 2, 3, 5, 1, 4, 6)
    return patches.reshape(b, t * (h // 2) * (w // 2), c * 4)


def z_patches(z):             # ComfyUI's Z-Image patchify: (B, C, H, W) -> (B, h w, 2 2 C)
    b, c, h, w = z.shape
    return z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 3, 5, 1).flatten(3).flatten(1, 2)


class Constructed:
    """attention override outside the guider's: in the joint attention of a main block (``length`` tokens), the
    queries of the generated image's ``rows`` find the subject's key, and among the generated image's keys each
    other's."""

    def __init__(self, inner, length, rows):
        self.inner, self.length, self.rows = inner, length, rows

    def __call__(self, func, q, k, v, heads, *args, **kwargs):
        flat = q.ndim == 3 and not kwargs.get("skip_reshape")      # ComfyUI 0.3.64's Qwen-Image: (B, L, heads d)
        if flat:
            q, k = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k))
        if q.ndim == 4 and q.shape[2] == self.length:
            q, k = q.clone(), k.clone()
            q[:, :, self.rows] = 4.0 * k[:, :, SUBJECT:SUBJECT + 1]     # logits 4 |k_s|^2 / sqrt(d) against it
            k[:, :, self.rows] += 0.25 * k[:, :, SUBJECT:SUBJECT + 1]   # a quarter of that more on each other
        if flat:
            q, k = (t.transpose(1, 2).flatten(2) for t in (q, k))
        call = self.inner if self.inner is not None else (lambda f, *a, **kw: f(*a, **kw))
        return call(func, q, k, v, heads, *args, **kwargs)


class Harness:
    def __init__(self, torch, shape, reference_seed):
        import comfy.samplers
        self.torch, self.shape, self.predictions = torch, shape, {}
        self.noise = torch.randn(shape, generator=torch.Generator().manual_seed(13))
        self.reference = torch.randn(shape, generator=torch.Generator().manual_seed(reference_seed))
        self.sigmas = torch.tensor(SIGMAS)
        self.sampler = comfy.samplers.sampler_object("euler")

    def run(self, guider, pos, neg, cfg):
        guider.set_conds(pos, neg)
        guider.set_cfg(cfg)
        steps = self.predictions[id(guider)] = []
        return guider.sample(self.noise, self.torch.zeros(self.shape), self.sampler, self.sigmas, disable_pbar=True,
                             seed=13, callback=lambda step, x0, x, total: steps.append(x0.clone()))

    def rb(self, model, strength, mask=None, block=0):
        from omniid.comfy_host.gradients import gradient_ready
        from omniid.comfy_host.rb_guider import RBGuider
        from omniid.guidance.rb_guidance import RBSettings
        return RBGuider(gradient_ready(model), RBSettings(strength=strength), self.reference, None, mask,
                        feature_block=block, subject_token=SUBJECT, seed=0)

    def p0_equal(self, model, pos, neg):
        import comfy.samplers
        return bool(self.torch.equal(self.run(self.rb(model, 0.0), pos, neg, 2.0),
                                     self.run(comfy.samplers.CFGGuider(model), pos, neg, 2.0)))

    def push(self, plain_model, toy_model, pos, neg, features) -> dict:
        """The first guided step's push against the hand computation with ``features`` (z -> (B, 16, C))."""
        import comfy.samplers
        torch = self.torch
        face = torch.zeros(1, 64, 64)
        face[:, 16:48, 0:48] = 1.0                                    # token grid 4 x 4: rows 1-2, columns 0-2
        plain = comfy.samplers.CFGGuider(toy_model)
        self.run(plain, pos, neg, 1.0)
        guided = self.rb(toy_model, 8.5, mask=face, block=1)
        self.run(guided, pos, neg, 1.0)
        first = next(i for i, s in enumerate(SIGMAS[:-1]) if 1000.0 * s <= 600.0)
        plain_x0, guided_x0 = self.predictions[id(plain)], self.predictions[id(guided)]
        return {"before_window_equal": all(torch.equal(a, b) for a, b in zip(guided_x0[:first], plain_x0[:first])),
                **hand_push(torch, plain_model, self, first, plain_x0, guided_x0[first] - plain_x0[first], features)}

    def subject_mask(self, model, pos, neg, length, offset) -> dict:
        """The guider's first guided mask while ``Constructed`` shapes the main blocks' attention; what it saw."""
        import omniid.comfy_host.rb_dit as rb_dit
        torch = self.torch
        face = torch.zeros(4, 4, dtype=torch.bool)
        face[1:3, 1:4] = True
        rows = (offset + torch.nonzero(face.reshape(-1))[:, 0]).tolist()
        guider, seen, original = self.rb(model, 8.5), {}, rb_dit.capture_options
        capture_run = guider._run

        def constructed_options(*args):
            options = original(*args)
            transformer = dict(options["transformer_options"])
            transformer["optimized_attention_override"] = Constructed(transformer["optimized_attention_override"],
                                                                      length, rows)
            return {**options, "transformer_options": transformer}

        def spying(x, sigma, options, cond, stop):
            result = capture_run(x, sigma, options, cond, stop)
            grid, cross, self_maps = result[2]
            if stop:
                seen.setdefault("reference_maps", [grid, cross, self_maps] == [None, None, None])
                return result
            if "mask" not in seen:
                ref_feats, ref_mask = guider.reference
                seen["mask"] = guider._generation_mask(result[1], result[2], ref_feats, ref_mask)[0].tolist()
                seen["features"], seen["grid"] = list(result[1].shape), list(grid)
                seen["maps"] = [list(cross.shape), list(self_maps.shape), float(self_maps.sum(-1).sub(1).abs().max())]
            return result

        guider._run = spying
        rb_dit.capture_options = constructed_options
        try:
            out = self.run(guider, pos, neg, 2.0)
        finally:
            rb_dit.capture_options = original
        return {**seen, "face": face.reshape(-1).tolist(), "finite": bool(torch.isfinite(out).all()),
                "guided_steps": guider.guided_steps, "reference_passes": guider.reference_passes,
                "feature_block": guider.feature_block, "family": guider.family.name}


def hand_push(torch, model, h: Harness, first, plain_x0, push, features) -> dict:
    """The push of the first guided step written out (rb_flux_inprocess.expected_push)."""
    return expected_push(torch, model, h.reference, h.noise, h.sigmas, SIGMAS[first], first, plain_x0, push, features)


def node_setup(torch, model, tokenizer, length: int, latent_lead) -> dict:
    """The node's set-up (rb_setup.rb_guider) on ``model``: the subject word read with the family's tokenizer
    from 'a photo of a woman, smiling' against a positive conditioning of ``length`` tokens, and the lines the
    preview shows. The VAE is a stand-in giving the family's latent shape."""
    from types import SimpleNamespace

    from omniid.comfy_host.rb_setup import rb_guider
    from omniid.guidance.rb_guidance import RBSettings
    tokenizer = tokenizer()
    clip = SimpleNamespace(tokenize=tokenizer.tokenize_with_weights, tokenizer=tokenizer)
    vae = SimpleNamespace(encode=lambda image: torch.zeros(*latent_lead, image.shape[1] // 8, image.shape[2] // 8))
    positive = [[torch.zeros(1, length, 40), {}]]
    guider, _, lines = rb_guider(model, positive, positive, 2.0, torch.rand(1, 64, 64, 3), vae, RBSettings(),
                                 clip=clip, prompt="a photo of a woman, smiling", reference_region="whole image")
    return {"subject_token": guider.subject_token, "lines": lines}


def qwen_image_facts(torch) -> dict:
    from diffusers import QwenImageTransformer2DModel
    from support.qwen_image_layout import comfy_qwen_image
    torch.manual_seed(21)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                                              attention_head_dim=32, num_attention_heads=2, joint_attention_dim=40,
                                              axes_dims_rope=(8, 12, 12))
    with torch.inference_mode():
        model = comfy_qwen_image(transformer.state_dict(), transformer.config)
    g = torch.Generator().manual_seed(22)
    positive, negative = [[torch.randn(1, TEXT, 40, generator=g), {}]], [[torch.randn(1, TEXT, 40, generator=g), {}]]
    edit = [[positive[0][0], {"reference_latents": [torch.randn(1, 16, 1, 8, 8, generator=g)]}]]
    h = Harness(torch, (1, 16, 1, 8, 8), 23)
    out = {"p0_equal": h.p0_equal(model, positive, negative), "p0_equal_edit": h.p0_equal(model, edit, negative)}
    toy_model = model.clone()
    toy_model.set_model_patch_replace(ToyBlock(), "dit", "double_block", 0)
    dm = model.get_model_object("diffusion_model")
    weight, bias = dm.img_in.weight.clone().double(), dm.img_in.bias.clone().double()
    out["hand"] = h.push(model, toy_model, positive, negative, lambda z: toy(qwen_patches(z) @ weight.T + bias))
    out["mask"] = h.subject_mask(model, positive, negative, TEXT + 16, TEXT)
    spied, lengths = model.clone(), StreamLength()
    spied.set_model_patch_replace(lengths, "dit", "double_block", 0)
    out["edit"] = h.subject_mask(spied, edit, negative, TEXT + 32, TEXT)
    out["edit"]["image_stream_tokens"] = sorted(set(lengths.lengths))
    from comfy.text_encoders.qwen_image import QwenImageTokenizer
    out["node"] = node_setup(torch, model, QwenImageTokenizer, 12, (1, 16, 1))
    return out


def z_image_facts(torch) -> dict:
    from support.tiny_diffusers import z_image_transformer
    from support.z_image_layout import comfy_z_image
    torch.manual_seed(31)
    transformer = z_image_transformer()
    with torch.inference_mode():
        model = comfy_z_image(transformer.state_dict(), transformer.config)
    g = torch.Generator().manual_seed(32)
    positive, negative = [[torch.randn(1, TEXT, 40, generator=g), {}]], [[torch.randn(1, TEXT, 40, generator=g), {}]]
    h = Harness(torch, (1, 16, 8, 8), 33)
    out = {"p0_equal": h.p0_equal(model, positive, negative)}
    weight = torch.randn(transformer.config.dim, 64, generator=g).double() * 0.2
    toy_model = model.clone()
    toy_model.set_model_patch(ToyLayer(weight, 16), "double_block")
    out["hand"] = h.push(model, toy_model, positive, negative, lambda z: toy(z_patches(z) @ weight.T))
    # main blocks attend over [caption padded to 32 | generated image padded to 32]
    out["mask"] = h.subject_mask(model, positive, negative, 64, 32)
    from comfy.text_encoders.z_image import ZImageTokenizer
    out["node"] = node_setup(torch, model, ZImageTokenizer, 15, (1, 16))
    return out


WORDS = {   # the conditioning lengths ComfyUI's encoders give 'a photo of a woman, smiling': Qwen-Image drops its
    # system template up to 'user' and the newline (12 left); the edit encoder inserts <|vision_start|>, the
    # image's tokens (64 here) and <|vision_end|> before the prompt; Z-Image keeps all 15
    "qwen_image": (("qwen_image", "qwen_image.QwenImageTokenizer", "Qwen-Image", 12),
                   ("qwen_image_edit", "qwen_image.QwenImageTokenizer", "Qwen-Image", 78)),
    "z_image": (("z_image", "z_image.ZImageTokenizer", "Z-Image", 15),),
}


def subject_words(family: str) -> dict:
    """The subject's place in the conditioning, found with the family's own tokenizer (no text encoder weights)
    as the node finds it."""
    import importlib
    from types import SimpleNamespace

    from omniid.comfy_host.rb_dit import FAMILIES
    from omniid.comfy_host.rb_setup import subject_token
    families = {entry.name: entry for entry in FAMILIES}
    found = {}
    for name, path, family_name, length in WORDS[family]:
        module, cls = path.split(".")
        tokenizer = getattr(importlib.import_module(f"comfy.text_encoders.{module}"), cls)()
        clip = SimpleNamespace(tokenize=tokenizer.tokenize_with_weights, tokenizer=tokenizer)
        positive = [[SimpleNamespace(shape=(1, length, 8)), {}]]
        entry = families[family_name]
        found[name] = list(subject_token(positive, 0, "", clip, "a photo of a woman, smiling", entry.tokenizers,
                                         entry.prompt_from_end))
    return found


def main() -> None:
    args = comfy_process.start(lambda parser: parser.add_argument("--family", choices=("qwen_image", "z_image"),
                                                                  required=True), threads=1)
    import torch
    torch.manual_seed(0)
    facts = qwen_image_facts(torch) if args.family == "qwen_image" else z_image_facts(torch)
    print(json.dumps({**facts, "subject_words": subject_words(args.family)}))


if __name__ == "__main__":
    main()

"""The diffusers host: the pack's attention processors against independent implementations.

UNets (SD1.5, SDXL layouts): the identity processors against diffusers' own
IPAdapterAttnProcessor2_0 given the same K/V projection weights, identity tokens and scale
(per CFG chunk: the unconditional half reads the unconditional tokens). FLUX (double and
single blocks): against a hand-written joint attention with explicit softmax. Weight 0, a
sigma outside the window and ``remove_identity`` give diffusers' own output exactly.
"""
import math

import pytest
import torch

from omniid.diffusers_host.identity import apply_identity, identity_call, remove_identity
from omniid.diffusers_host.layers import host_layers
from omniid.guidance.adapter import AdapterConfig, create_adapter
from omniid.guidance.decoupled import COND, UNCOND, BlockWeights
from support.tiny_diffusers import make_model, text_embeds

TOKEN_DIM = 24


def unet_inputs(kind, batch=2):
    g = torch.Generator().manual_seed(3)
    text = text_embeds(kind)
    kwargs = {"encoder_hidden_states": text["encoder_hidden_states"].expand(batch, -1, -1)}
    if kind == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": text["text_embeds"].expand(batch, -1),
                                       "time_ids": torch.tensor([[32., 32, 0, 0, 32, 32]]).expand(batch, -1)}
    return torch.randn(batch, 4, 16, 16, generator=g), torch.tensor([500.0] * batch), kwargs


def adapter_for(model, seed=1):
    layers = host_layers(model)
    family = "flux" if layers[0].group in ("double", "single") else "unet"
    return create_adapter(AdapterConfig(family=family, token_dim=TOKEN_DIM,
                                        layer_dims=tuple(l.inner_dim for l in layers)), seed=seed)


def identity_tokens(seed=2):
    g = torch.Generator().manual_seed(seed)
    return {COND: torch.randn(5, TOKEN_DIM, generator=g), UNCOND: torch.randn(5, TOKEN_DIM, generator=g)}


class IPAdapterReference:
    """diffusers' IPAdapterAttnProcessor2_0 with this layer's identity tokens per batch row."""

    def __init__(self, layer, kv, scale, tokens_per_row):
        from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
        self.ip = IPAdapterAttnProcessor2_0(layer.inner_dim, TOKEN_DIM, num_tokens=(tokens_per_row.shape[1],),
                                            scale=scale)
        with torch.no_grad():
            self.ip.to_k_ip[0].weight.copy_(kv.to_k.weight)
            self.ip.to_v_ip[0].weight.copy_(kv.to_v.weight)
        self.tokens = tokens_per_row

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        return self.ip(attn, hidden_states, (encoder_hidden_states, [self.tokens]), attention_mask, temb)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_unet_processors_equal_diffusers_ip_adapter_processor(kind):
    unet, _ = make_model(kind)
    x, t, kwargs = unet_inputs(kind)
    adapter, tokens = adapter_for(unet), identity_tokens()
    layers = host_layers(unet)
    blocks = BlockWeights.parse("all=1, middle=0.5, output=2")
    with torch.no_grad():
        plain = unet(x, t, **kwargs).sample
        # batch = [cond row; uncond row], as a CFG call
        apply_identity(unet, adapter, tokens, weight=0.7, blocks=blocks)
        with identity_call(unet, sigmas=torch.tensor([5.0]), cond_or_uncond=[COND, UNCOND]):
            ours = unet(x, t, **kwargs).sample
        remove_identity(unet)
        assert torch.equal(unet(x, t, **kwargs).sample, plain)
        rows = torch.stack([tokens[COND], tokens[UNCOND]])
        for index, layer in enumerate(layers):
            scale = 0.7 * blocks.weight(layer.group, layer.number)
            layer.attention.set_processor(IPAdapterReference(layer, adapter.layers[index], scale, rows))
        reference = unet(x, t, **kwargs).sample
    assert not torch.allclose(reference, plain, atol=1e-3)            # the identity changes the output
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-4)


def test_weight_zero_and_a_closed_sigma_window_give_diffusers_own_output():
    unet, _ = make_model("sd15")
    x, t, kwargs = unet_inputs("sd15")
    with torch.no_grad():
        plain = unet(x, t, **kwargs).sample
        apply_identity(unet, adapter_for(unet), identity_tokens(), weight=1.0, sigma_start=3.0, sigma_end=1.0)
        with identity_call(unet, sigmas=torch.tensor([5.0])):
            outside = unet(x, t, **kwargs).sample
        with identity_call(unet, sigmas=torch.tensor([2.0])):
            inside = unet(x, t, **kwargs).sample
        remove_identity(unet)
        apply_identity(unet, adapter_for(unet), identity_tokens(), weight=0.0)
        zero = unet(x, t, **kwargs).sample
    torch.testing.assert_close(outside, plain, atol=1e-6, rtol=0)
    torch.testing.assert_close(zero, plain, atol=1e-6, rtol=0)
    assert not torch.allclose(inside, plain, atol=1e-3)


def test_unet_layers_carry_comfyui_block_numbers():
    """SD1.5's real config (on the meta device): ComfyUI's input 1, 2, 4, 5, 7, 8, output 3-11, middle 0."""
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768)
    got = [(l.group, l.number) for l in host_layers(unet)]
    assert got == ([("input", n) for n in (1, 2, 4, 5, 7, 8)] + [("output", n) for n in range(3, 12)]
                   + [("middle", 0)])
    assert list(unet.attn_processors)[1::2] == [f"{l.name}.processor" for l in host_layers(unet)]


class HandFluxProcessor:
    """FLUX joint attention by hand (explicit softmax), plus the identity term w * softmax(q K_id^T / sqrt(d)) V_id:
    decoupled, rotated queries of the image tokens, added to the attention output; instantx, the queries before
    the rotation (image tokens in double blocks, every token in single blocks), K/V RMS-normalised per head;
    xlabs (double blocks), the image tokens' queries before the rotation, kept for the image stream after the
    block (``residual``, added by the test's block hook)."""

    def __init__(self, keys, values, weight, txt_len, style="decoupled", kind="double"):
        self.keys, self.values, self.weight, self.txt_len = keys, values, weight, txt_len
        self.style, self.kind, self.residual = style, kind, None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb
        heads = attn.heads

        def split(t):
            return t.view(t.shape[0], t.shape[1], heads, -1)
        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder_hidden_states is not None:
            eq, ek, ev = (split(f(encoder_hidden_states)) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            q = torch.cat([attn.norm_added_q(eq), q], 1)
            k = torch.cat([attn.norm_added_k(ek), k], 1)
            v = torch.cat([ev, v], 1)
        plain_q = q
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        d = q.shape[-1]
        probs = torch.softmax(torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(d), -1)
        out = torch.einsum("bhlm,bmhd->blhd", probs, v)
        kid, vid = (t.view(-1, heads, d) for t in (self.keys, self.values))
        if self.style == "instantx":
            kid, vid = (t / (t.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() for t in (kid, vid))
        start = 0 if (self.style == "instantx" and self.kind == "single") else self.txt_len
        query = (q if self.style == "decoupled" else plain_q)[:, start:]
        id_probs = torch.softmax(torch.einsum("blhd,mhd->bhlm", query, kid) / math.sqrt(d), -1)
        term = self.weight * torch.einsum("bhlm,mhd->blhd", id_probs, vid)
        if self.style == "xlabs":
            self.residual = term.flatten(2) if self.kind == "double" else None
        else:
            out = torch.cat([out[:, :start], out[:, start:] + term], 1)
        out = out.flatten(2)
        if encoder_hidden_states is None:
            return out
        txt, img = out[:, :self.txt_len], out[:, self.txt_len:]
        return attn.to_out[1](attn.to_out[0](img)), attn.to_add_out(txt)


def flux_inputs():
    g = torch.Generator().manual_seed(4)
    text = text_embeds("flux")
    ids = torch.stack(torch.meshgrid(torch.arange(4.), torch.arange(4.), indexing="ij"), -1).reshape(-1, 2)
    img_ids = torch.cat([torch.zeros(16, 1), ids], 1)
    return dict(hidden_states=torch.randn(1, 16, 64, generator=g), encoder_hidden_states=text["encoder_hidden_states"],
                pooled_projections=text["pooled_projections"], timestep=torch.tensor([0.6]), img_ids=img_ids,
                txt_ids=torch.zeros(7, 3), guidance=torch.tensor([3.5]))


def test_flux_processors_equal_a_hand_computation_in_double_and_single_blocks():
    model, _ = make_model("flux")
    inputs = flux_inputs()
    adapter, tokens = adapter_for(model), identity_tokens()
    blocks = BlockWeights.parse("double=0.8, single.1=1.5")
    with torch.no_grad():
        plain = model(**inputs).sample
        apply_identity(model, adapter, tokens, weight=0.9, blocks=blocks)
        ours = model(**inputs).sample
        remove_identity(model)
        torch.testing.assert_close(model(**inputs).sample, plain, atol=1e-6, rtol=0)
        for index, layer in enumerate(host_layers(model)):
            kv = adapter.layers[index]
            layer.attention.set_processor(HandFluxProcessor(kv.to_k(tokens[COND]), kv.to_v(tokens[COND]),
                                                            0.9 * blocks.weight(layer.group, layer.number), 7))
        reference = model(**inputs).sample
    assert not torch.allclose(reference, plain, atol=1e-3)
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("style", ["instantx", "xlabs"])
def test_flux_instantx_and_xlabs_attentions_equal_a_hand_computation(style):
    from omniid.guidance.adapter import AdapterConfig, create_adapter
    model, _ = make_model("flux")
    inputs = flux_inputs()
    layers = host_layers(model)
    if style == "xlabs":
        layers = [l for l in layers if l.group == "double"]
    adapter = create_adapter(AdapterConfig(family="flux", token_dim=TOKEN_DIM, layer_dims=tuple(l.inner_dim for l in layers),
                                           attention=style, flux_blocks="double" if style == "xlabs" else "all",
                                           kv_bias=style == "xlabs"), seed=3)
    tokens = identity_tokens()
    with torch.no_grad():
        plain = model(**inputs).sample
        apply_identity(model, adapter, tokens, weight=0.9)
        ours = model(**inputs).sample
        remove_identity(model)
        hooks = []
        for index, layer in enumerate(layers):
            kv = adapter.layers[index]
            hand = HandFluxProcessor(kv.to_k(tokens[COND]), kv.to_v(tokens[COND]), 0.9, 7, style, layer.group)
            layer.attention.set_processor(hand)
            if style == "xlabs":
                def add(block, args, output, hand=hand):
                    context, image = output
                    return context, image + hand.residual
                hooks.append(layer.block.register_forward_hook(add))
        reference = model(**inputs).sample
        for hook in hooks:
            hook.remove()
    assert not torch.allclose(reference, plain, atol=1e-3)
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-4)


def test_qwen_image_calls_name_the_generated_image_first_in_img_shapes():
    """The generated image's token grid, which alone takes the identity, as Qwen-Image's pipelines and the
    diffusers host call the transformer: QwenImagePipeline, -Edit / -EditPlus (references after it), the
    host's own velocity (one tuple per sample); no single grid for several frames or no img_shapes."""
    from omniid.diffusers_host.identity import _generated_grid
    assert _generated_grid([[(1, 4, 6)]] * 2) == (4, 6)
    assert _generated_grid([[(1, 4, 6), (1, 8, 8), (1, 2, 4)]] * 2) == (4, 6)
    assert _generated_grid([(1, 4, 6)] * 2) == (4, 6)
    assert _generated_grid([[(3, 4, 6)]]) is None and _generated_grid(None) is None

"""RB-Guidance math: masks, matching, energy gradient (against finite differences), masking."""
import pytest
import torch
import torch.nn.functional as F

from omniid.guidance.rb_guidance import (LatentScales, RBSettings, apply_guidance, energy, guidance_gradient,
                                         mask_to_latent, match_score, normalize, refine_mask)


def features_net(seed=0):
    """A small deterministic conv net: latent (B, 4, 8, 8) -> features (B, 16 positions, 6 channels)."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(8, 4, 3, 3, generator=g, dtype=torch.float64) * 0.3
    w2 = torch.randn(6, 8, 3, 3, generator=g, dtype=torch.float64) * 0.3

    def run(x):
        h = torch.tanh(F.conv2d(x, w1, padding=1))
        h = F.conv2d(h, w2, padding=1, stride=2)                      # (B, 6, 4, 4)
        return h.flatten(2).transpose(1, 2)

    return run


def test_energy_gradient_matches_finite_differences():
    net = features_net()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    gen_mask = torch.zeros(2, 16, dtype=torch.bool)
    gen_mask[:, 5:11] = True
    ref = torch.randn(9, 6, generator=g, dtype=torch.float64)
    ref_mask = torch.ones(9, dtype=torch.bool)
    ref_mask[0] = False

    def total_energy(z):
        return energy(match_score(ref, ref_mask, net(z), gen_mask), 8.5).sum()

    grad, score, _ = guidance_gradient(x, lambda z: (net(z), gen_mask), ref, ref_mask, 8.5)
    assert grad.shape == x.shape and torch.isfinite(score).all()
    h = 1e-6
    for flat in torch.randperm(x.numel(), generator=g)[:12]:
        step = torch.zeros_like(x).view(-1)
        step[flat] = h
        step = step.view_as(x)
        numeric = (total_energy(x + step) - total_energy(x - step)) / (2 * h)
        assert float(grad.view(-1)[flat]) == pytest.approx(float(numeric), rel=1e-4, abs=1e-8)


def test_background_gradients_are_zero():
    net = features_net(2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    gen_mask = torch.zeros(1, 16, dtype=torch.bool)
    gen_mask[0, [5, 6, 9, 10]] = True                                  # a 2 x 2 block of the 4 x 4 grid
    ref = torch.randn(5, 6, generator=g, dtype=torch.float64)
    grad, _, _ = guidance_gradient(x, lambda z: (net(z), gen_mask), ref, torch.ones(5, dtype=torch.bool), 8.5,
                                   latent_mask=lambda m: mask_to_latent(m, (4, 4), (8, 8)))
    latent = mask_to_latent(gen_mask, (4, 4), (8, 8))
    assert (grad * (1 - latent)).abs().max() == 0
    # inside the mask the gradient is the unmasked energy's, untouched; outside, the masking removed a
    # gradient of the same order (the convolutions spread the face's energy onto the background)
    unmasked, _, _ = guidance_gradient(x, lambda z: (net(z), gen_mask), ref, torch.ones(5, dtype=torch.bool), 8.5)
    torch.testing.assert_close(grad, unmasked * latent, rtol=0, atol=1e-12)
    assert (unmasked * (1 - latent)).abs().max() > 0.1 * unmasked.abs().max()


def test_match_score_by_hand():
    ref = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    gen = torch.tensor([[[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]]])
    everywhere = torch.ones(1, 3, dtype=torch.bool)
    assert match_score(ref, torch.ones(2, dtype=torch.bool), gen, everywhere).item() == pytest.approx(1.0)
    only_third = torch.tensor([[False, False, True]])
    assert match_score(ref, torch.ones(2, dtype=torch.bool), gen, only_third).item() == pytest.approx(-0.5)
    nothing = torch.zeros(1, 3, dtype=torch.bool)
    assert match_score(ref, torch.ones(2, dtype=torch.bool), gen, nothing).item() == 0.0
    with pytest.raises(ValueError, match="reference mask is empty"):
        match_score(ref, torch.zeros(2, dtype=torch.bool), gen, everywhere)


def test_mask_refinement_by_hand():
    cross = torch.tensor([[0.0, 1.0, 2.0, 4.0]])
    identity = torch.eye(4)[None]
    soft, binary = refine_mask(cross, identity, iterations=1, alpha=2.0, threshold=0.5)
    expected = normalize(normalize(cross) ** 2)
    torch.testing.assert_close(soft, expected)
    assert binary.tolist() == [[False, False, False, True]]
    spread = torch.full((1, 4, 4), 0.25)                             # every token attends everywhere
    soft, _ = refine_mask(cross, spread, iterations=3)
    assert torch.allclose(soft, torch.zeros_like(soft))             # a flat map normalises to 0 (no face)


def test_guidance_window_and_strength():
    settings = RBSettings()
    assert (settings.strength, settings.start_fraction, settings.t0) == (8.5, 0.6, 671)
    assert settings.active(600.0) and settings.active(10.0) and not settings.active(600.5)
    assert not RBSettings(strength=0.0).active(100.0)
    with pytest.raises(ValueError):
        RBSettings(t0=1000)


def test_guidance_moves_x0_against_the_gradient():
    denoised = torch.zeros(1, 4, 2, 2)
    grad = torch.ones(1, 4, 2, 2)
    out = apply_guidance(denoised, grad, LatentScales(torch.tensor([1.0]), torch.tensor([2.0])))
    assert torch.equal(out, torch.full_like(denoised, -2.0))


def test_gradient_is_taken_on_the_models_noisy_latent():
    """The paper adds grad_{z_t} E to the CFG noise prediction, z_t the model's own noisy latent
    (z_t = sqrt(abar) x0 + sqrt(1 - abar) eps). A host sampling k-diffusion's x = z_t / sqrt(abar)
    differentiates on x; the push must still be the paper's: checked against a hand derivation on a
    toy feature function (one position, cosine similarity to one reference feature)."""
    torch.manual_seed(0)
    sigma = torch.tensor([1.7])                                    # SD1.5 near t = 600: sqrt(abar) ~ 0.5
    reference = torch.randn(1, 4)
    z = torch.randn(1, 4, 1, 1)                                    # the model's latent z_t (one position)
    x = z * (1 + sigma ** 2).sqrt()                               # k-diffusion's variable
    scales = LatentScales.k_diffusion(sigma)
    p = 8.5

    def features(x_):                                              # the model reads z_t = x * input_scale
        z_ = x_ * scales.input_scale.reshape(-1, 1, 1, 1)
        return z_.flatten(2).transpose(1, 2), torch.ones(1, 1, dtype=torch.bool)

    grad_x, score, _ = guidance_gradient(x, features, reference, torch.ones(1, dtype=torch.bool), p)
    # by hand: S = cos(z, r); dE/dz = -p / (1 + S)^2 * (r / (|z||r|) - (z.r) z / (|z|^3 |r|))
    zv, r = z.flatten(), reference[0]
    cos = zv @ r / (zv.norm() * r.norm())
    d_cos = r / (zv.norm() * r.norm()) - (zv @ r) * zv / (zv.norm() ** 3 * r.norm())
    grad_z = -p / (1 + cos) ** 2 * d_cos
    denoised = torch.randn(1, 4, 1, 1)
    expected = denoised - sigma * grad_z.reshape(1, 4, 1, 1)      # x0 = x - sigma * eps_hat, eps_hat = eps + grad_z
    torch.testing.assert_close(score, cos[None])
    torch.testing.assert_close(apply_guidance(denoised, grad_x, scales), expected)
    # the old push, sigma * grad_x, was the paper's times sqrt(abar) = 1 / sqrt(1 + sigma^2)
    torch.testing.assert_close(denoised - sigma * grad_x, denoised - sigma * grad_z.reshape(1, 4, 1, 1)
                               / (1 + sigma ** 2).sqrt())


def test_pivot_encoder_binds_the_face_to_the_class_word(tmp_path):
    from omniid.encoders.checkpoint import CheckpointError
    from omniid.encoders.pivot import PivotConfig, PivotIDEncoder, load_pivot, save_pivot
    torch.manual_seed(0)
    pivot = PivotIDEncoder(PivotConfig(image_dim=12, text_dim=8)).eval()
    cond = torch.randn(2, 6, 8)
    face = torch.randn(1, 12)
    with torch.no_grad():
        out = pivot.apply(cond, 3, face)
        expected = torch.cat([cond[:, 3], face.expand(2, -1)], -1) @ pivot.fuse.weight.T + pivot.fuse.bias
    torch.testing.assert_close(out[:, 3], expected)
    assert torch.equal(out[:, :3], cond[:, :3]) and torch.equal(out[:, 4:], cond[:, 4:])
    path = tmp_path / "pivot.safetensors"
    save_pivot(pivot, str(path))
    loaded = load_pivot(str(path))
    assert loaded.config == pivot.config and torch.equal(loaded.fuse.weight, pivot.fuse.weight)
    with pytest.raises(ValueError, match="made for 8"):
        pivot.apply(torch.randn(1, 6, 16), 1, face)
    with pytest.raises(ValueError, match="outside"):
        pivot.apply(cond, 9, face)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="pivot.safetensors"):
        load_pivot(str(path))


def test_the_subject_token_is_found_in_the_prompt():
    from omniid.guidance.rb_guidance import find_subject_token
    tokens = ["<|startoftext|>", "a</w>", "photo</w>", "of</w>", "a</w>", "smiling</w>", "woman</w>", "in</w>",
              "astron", "aut</w>", "gear</w>", "<|endoftext|>", "<|endoftext|>"]
    assert find_subject_token(tokens) == (6, "woman")
    assert find_subject_token(tokens, "astronaut") == (9, "astronaut")           # the word's last piece
    assert find_subject_token(tokens, "Photo") == (2, "photo")
    assert find_subject_token(tokens, "dog") == (None, "")
    assert find_subject_token(["<|startoftext|>", "a</w>", "man</w>", "and</w>", "a</w>", "person</w>"]) == (2, "man")


def test_several_people_give_one_energy_term_per_reference_and_mask():
    """E = sum_i p / (1 + S_i), S_i matching reference i inside generated mask i: the gradient is the sum of
    the single-person gradients, kept inside the union of the masks."""
    net = features_net(1)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    refs = [torch.randn(16, 6, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in (4, 5)]
    ref_masks = [torch.ones(16, dtype=torch.bool), torch.arange(16) < 8]
    gen_masks = [torch.arange(16)[None] < 8, torch.arange(16)[None] >= 8]

    def single(i):
        return guidance_gradient(x, lambda z: (net(z), gen_masks[i]), refs[i], ref_masks[i], 8.5)

    grad, scores, union = guidance_gradient(x, lambda z: (net(z), gen_masks), refs, ref_masks, 8.5)
    (g0, s0, _), (g1, s1, _) = single(0), single(1)
    torch.testing.assert_close(grad, g0 + g1)
    torch.testing.assert_close(scores, torch.stack([s0, s1], -1))
    assert union.all()
    with pytest.raises(ValueError, match="2 reference face"):
        guidance_gradient(x, lambda z: (net(z), gen_masks[:1]), refs, ref_masks, 8.5)

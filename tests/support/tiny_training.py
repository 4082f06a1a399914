"""Small stand-ins for the training tests: a base model with cross-attention layers, a visual encoder,
an ArcFace, a face mask (pure torch)."""
import torch


class TinyHost:
    """A small epsilon-prediction denoiser with cross-attention layers, standing in for a base model."""
    image_size = 32

    def __init__(self, layers=(32, 32), seed=0):
        g = torch.Generator().manual_seed(seed)
        self.layers = layers
        self.text = torch.randn(4, 32, generator=g)
        self.w_in = [torch.randn(3, d, generator=g) * 0.5 for d in layers]
        self.w_text = [(torch.randn(32, d, generator=g) * 0.2, torch.randn(32, d, generator=g) * 0.2) for d in layers]
        self.w_out = [torch.randn(d, 3, generator=g) * 0.2 for d in layers]
        self.text_calls = []

    def encode(self, images):
        return torch.nn.functional.avg_pool2d(images.permute(0, 3, 1, 2) * 2 - 1, 4)   # (B, 3, 8, 8)

    def sigma_at(self, u):
        return 0.05 + 2.0 * (1 - u)

    def noise(self, x0, sigma, eps):
        return x0 + sigma.reshape(-1, 1, 1, 1) * eps

    def denoise(self, x_t, sigma, identity_kv, text_attention):
        self.text_calls.append(text_attention)
        b = x_t.shape[0]
        h = (x_t / (1 + sigma.reshape(-1, 1, 1, 1) ** 2).sqrt()).flatten(2).transpose(1, 2)   # (B, 64, 3)
        eps = torch.zeros_like(h)
        for i, (k_id, v_id) in enumerate(identity_kv):
            q = h @ self.w_in[i]
            out = torch.nn.functional.scaled_dot_product_attention(q, k_id, v_id)
            if text_attention:
                k_t, v_t = (self.text @ w for w in self.w_text[i])
                out = out + torch.nn.functional.scaled_dot_product_attention(q, k_t.expand(b, -1, -1),
                                                                             v_t.expand(b, -1, -1))
            eps = eps + out @ self.w_out[i]
        eps = eps.transpose(1, 2).reshape(x_t.shape)
        return x_t - sigma.reshape(-1, 1, 1, 1) * eps


class TinyPivotHost(TinyHost):
    """TinyHost whose text tokens come from the given conditioning; reports one token's attention map."""

    def denoise_conditioned(self, x_t, sigma, conditioning, token):
        h = (x_t / (1 + sigma.reshape(-1, 1, 1, 1) ** 2).sqrt()).flatten(2).transpose(1, 2)
        eps, maps = torch.zeros_like(h), []
        for i in range(len(self.layers)):
            q = h @ self.w_in[i]
            k, v = (conditioning @ w for w in self.w_text[i])
            probs = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, -1)
            maps.append(probs[..., token])
            eps = eps + (probs @ v) @ self.w_out[i]
        eps = eps.transpose(1, 2).reshape(x_t.shape)
        return x_t - sigma.reshape(-1, 1, 1, 1) * eps, torch.stack(maps).mean(0), (8, 8)


def tiny_arcface(width=16):
    """A stand-in ArcFace: a fixed random projection of the photo's 4 x 4 colour layout, unit length."""
    weight = torch.randn(48, width, generator=torch.Generator().manual_seed(7))

    def embed(images):                                           # (B, H, W, 3) -> (B, width)
        pooled = torch.nn.functional.adaptive_avg_pool2d(images.permute(0, 3, 1, 2), 4).flatten(1)
        return torch.nn.functional.normalize(pooled @ weight, dim=-1)
    return embed


class TinyTower:
    """A small ViT as a pivot VisionTower: patch embedding, 3 transformer blocks, final norm, projection."""

    @staticmethod
    def create(dim=32, out=16, depth=3, seed=0):
        from omniid.encoders.pivot import VisionTower

        class Tower(VisionTower):
            layout = "tiny_test_vit"

            def __init__(self):
                super().__init__()
                self.patch = torch.nn.Conv2d(3, dim, 8, 8)
                self.layers = torch.nn.ModuleList(torch.nn.TransformerEncoderLayer(dim, 4, 64, dropout=0.0,
                                                                                   batch_first=True)
                                                  for _ in range(depth))
                self.norm = torch.nn.LayerNorm(dim)
                self.proj = torch.nn.Linear(dim, out, bias=False)
                self.calls = [0] * depth
                for i, layer in enumerate(self.layers):
                    layer.linear1.register_forward_pre_hook(   # inside the block: recomputation counts too
                        lambda m, a, i=i: self.calls.__setitem__(i, self.calls[i] + 1))

            def blocks(self):
                return list(self.layers)

            def stem(self):
                return [self.patch]

            def head(self):
                return [self.norm, self.proj]

            def forward(self, images):                                 # (B, H, W, 3) in [0, 1]
                x = torch.nn.functional.interpolate(images.permute(0, 3, 1, 2), size=(32, 32), mode="bilinear")
                x = self.patch(x * 2 - 1).flatten(2).transpose(1, 2)
                for layer in self.layers:
                    x = layer(x)
                return self.proj(self.norm(x.mean(1)))

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return Tower()


def ellipse_mask(image):
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, image.shape[0]), torch.linspace(-1, 1, image.shape[1]),
                            indexing="ij")
    return ((xs / 0.6) ** 2 + (ys / 0.8) ** 2 <= 1).float()

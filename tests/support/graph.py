"""A tiny builder for API-format prompts in the tests and benchmarks; defaults are the tiny test models."""
from __future__ import annotations


class Graph:
    def __init__(self):
        self.nodes: dict[str, dict] = {}

    def add(self, class_type: str, **inputs) -> str:
        node_id = str(len(self.nodes) + 1)
        self.nodes[node_id] = {"class_type": class_type, "inputs": inputs}
        return node_id

    @staticmethod
    def out(node_id: str, index: int = 0) -> list:
        return [node_id, index]

    def photos(self, *names: str) -> list:
        """LoadImage each file and batch them with ImageBatch (same-size images are not resized)."""
        batch = self.out(self.add("LoadImage", image=names[0]))
        for name in names[1:]:
            batch = self.out(self.add("ImageBatch", image1=batch, image2=self.out(self.add("LoadImage", image=name))))
        return batch

    def checkpoint(self, name: str = "omniid_tiny_sd15.safetensors") -> str:
        return self.add("CheckpointLoaderSimple", ckpt_name=name)

    def sd_sampling(self, model=None, ckpt: str | None = None, seed: int = 1, steps: int = 4,
                    cfg: float = 5.0, size: int = 64, batch: int = 1, prefix: str = "sample",
                    positive: str = "a portrait photo", negative: str = "blurry") -> dict:
        """Checkpoint -> prompts -> KSampler -> VAEDecode -> SaveImage; returns the node ids.

        ``ckpt``: a checkpoint loader node to reuse; ``model``: a patched model to sample with."""
        ckpt = ckpt or self.checkpoint()
        pos = self.add("CLIPTextEncode", clip=self.out(ckpt, 1), text=positive)
        neg = self.add("CLIPTextEncode", clip=self.out(ckpt, 1), text=negative)
        latent = self.add("EmptyLatentImage", width=size, height=size, batch_size=batch)
        sampler = self.add("KSampler", model=model or self.out(ckpt, 0), positive=self.out(pos),
                           negative=self.out(neg), latent_image=self.out(latent), seed=seed, steps=steps, cfg=cfg,
                           sampler_name="euler", scheduler="normal", denoise=1.0)
        decode = self.add("VAEDecode", samples=self.out(sampler), vae=self.out(ckpt, 2))
        save = self.add("SaveImage", images=self.out(decode), filename_prefix=prefix)
        return {"checkpoint": ckpt, "positive": pos, "negative": neg, "sampler": sampler, "save": save}

"""A guided workflow against ComfyUI's CFGGuider on the same inputs, in one prompt: the workflow's guider
node's model, conditionings and cfg feed a CFGGuider twin that samples with the same noise, sampler and sigmas;
both latents are saved and read back."""
from __future__ import annotations

from pathlib import Path


def add_plain_twin(prompt: dict, guider_id: str, sampler_id: str, prefix: str) -> None:
    """Adds the CFGGuider twin of ``guider_id`` sampled like ``sampler_id`` (a SamplerCustomAdvanced), and saves
    both latents as ``{prefix}/guided`` and ``{prefix}/plain``."""
    guider = prompt[guider_id]["inputs"]
    sampler = prompt[sampler_id]["inputs"]
    prompt["plain"] = {"class_type": "CFGGuider",
                       "inputs": {key: guider[key] for key in ("model", "positive", "negative", "cfg")}}
    prompt["plain_sampler"] = {"class_type": "SamplerCustomAdvanced", "inputs": {**sampler, "guider": ["plain", 0]}}
    for name, node in (("guided", sampler_id), ("plain", "plain_sampler")):
        prompt[f"keep_{name}"] = {"class_type": "SaveLatent",
                                  "inputs": {"samples": [node, 0], "filename_prefix": f"{prefix}/{name}"}}


def guided_change(base_directory: Path, prefix: str):
    """(the guided latent, max |guided - plain| / max |plain|) of the last run's saved pair."""
    from safetensors.torch import load_file
    folder = Path(base_directory) / "output" / prefix
    latents = {name: load_file(str(sorted(folder.glob(f"{name}_0*.latent"))[-1]))["latent_tensor"]
               for name in ("guided", "plain")}
    change = float((latents["guided"] - latents["plain"]).abs().max() / latents["plain"].abs().max())
    return latents["guided"], change

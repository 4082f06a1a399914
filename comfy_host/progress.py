"""Progress bars and Cancel for long nodes, and the training loop inside a node."""
from __future__ import annotations

import logging
from typing import Callable

import comfy.model_management as mm
import comfy.utils
import torch

from ..training.trainer import Trainer, TrainingCancelled


def progress(total: int) -> Callable[[int], None]:
    """A per-unit callback: advances the node's progress bar and honours Cancel."""
    bar = comfy.utils.ProgressBar(total)

    def step(_index: int = 0) -> None:
        mm.throw_exception_if_processing_interrupted()
        bar.update(1)

    return step


def trainable_copy(module_factory, state: dict):
    """A float32 copy made outside inference mode (ComfyUI runs nodes in it), so it can be trained."""
    with torch.inference_mode(False):
        module = module_factory()
        module.load_state_dict({k: v.detach().float().clone() for k, v in state.items()})
        return module.float().train()


def run_training(trainer: Trainer, resume: bool) -> None:
    """Resume if asked, train with a progress bar; Cancel saves a checkpoint, then stops the prompt.

    Where ComfyUI's progress hook itself raises on Cancel (and clears the flag while doing so), the
    exception is caught here and remembered, so the trainer still stops at its next step boundary
    and writes its checkpoint before the prompt ends."""
    if resume:
        trainer.resume()
    steps = trainer.config.steps
    bar = comfy.utils.ProgressBar(steps)
    cancelled = False

    def on_step(step: int, _loss: float) -> None:
        nonlocal cancelled
        try:
            bar.update_absolute(step, steps)
        except mm.InterruptProcessingException:
            cancelled = True

    def should_stop() -> bool:
        return cancelled or mm.processing_interrupted()

    logging.getLogger("OmniIdentity").info("training from step %d to %d; Cancel keeps a checkpoint at %s", trainer.step,
                                           steps, trainer.checkpoint_path)
    try:
        trainer.run(on_step=on_step, should_stop=should_stop)
    except TrainingCancelled as stopped:
        raise mm.InterruptProcessingException() from stopped
    except mm.InterruptProcessingException:
        # Cancel raised inside a step (by a ComfyUI model the step calls): the optimizer has not
        # stepped yet, so the module and the step counter still agree; keep them.
        trainer.save()
        raise

"""Training recipes: the papers' settings per stage, one switch away from the practical defaults.

``recipe``:
- ``custom``: the values given (node widgets, command-line flags) are used as they are;
- ``quick``: practical single-machine values (the nodes' defaults), to see a stage work;
- ``paper``: the paper's batch, steps, resolution and learning rate for the stage (below),
  except for values given explicitly (the command line's flags; a node's widgets always have
  a value, so there ``paper`` overrides them and says so).

The papers give *effective* (global) batches. A run here reaches one as
``batch x grad_accum x processes``: the paper recipe keeps the per-process micro-batch asked for
(rounded down to a divisor unless it was given explicitly) and sets ``grad_accum`` so that the
product is the paper's; an explicit ``grad_accum`` keeps both as given.

| stage | paper | batch (global) | steps | resolution | lr (AdamW, constant) | source |
|---|---|---|---|---|---|---|
| mtd | Omni-ID | 256 | 250,000 | 448 | 1e-4 | appendix A.2 "Training Details" (the main text says 200K) |
| flow | Omni-ID | 32 | 5,000 | 512 | 1e-4 | appendix A.2 (A.1: the CLIP baseline too; main text: 10K) |
| flow_arcface | Omni-ID | 32 | 75,000 | 512 | 1e-4 | appendix A.1 "ArcFace": 75K steps to converge |
| pivot_sd15 | OmniPortrait | - | 80,000 | 512 | 2e-5 | "Loss & Training" (batch not given) |
| pivot_sdxl | OmniPortrait | - | 60,000 | 1024 | 2e-5 | "Loss & Training" (filtered to 1024) |

Where the paper gives no batch (OmniPortrait) the recipe keeps the one asked for.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

RECIPES = ("custom", "quick", "paper")


@dataclass(frozen=True)
class Recipe:
    steps: int
    lr: float
    image_size: int
    batch: Optional[int]            # effective (global) batch; None: the paper gives none
    source: str


PAPER = {
    "mtd": Recipe(250_000, 1e-4, 448, 256, "Omni-ID appendix A.2: batch 256 (32 x 8 A100), 250K iterations, 448 px, "
                                            "constant lr 1e-4, AdamW"),
    "flow": Recipe(5_000, 1e-4, 512, 32, "Omni-ID appendix A.2: batch 32, 5K iterations, 512 px, constant lr 1e-4, "
                                         "AdamW (A.1: the CLIP baseline the same)"),
    "flow_arcface": Recipe(75_000, 1e-4, 512, 32, "Omni-ID appendix A.1: the ArcFace baseline takes 75K steps to "
                                                  "converge (batch, size and lr as the flow stage)"),
    "pivot_sd15": Recipe(80_000, 2e-5, 512, None, "OmniPortrait 'Loss & Training': SD 80K steps, AdamW 2e-5 "
                                                  "(batch not given)"),
    "pivot_sdxl": Recipe(60_000, 2e-5, 1024, None, "OmniPortrait 'Loss & Training': SDXL 60K steps at 1024 px, "
                                                   "AdamW 2e-5 (batch not given)"),
}

QUICK = {
    "mtd": Recipe(1000, 1e-4, 448, 8, "quick: single machine"),
    "flow": Recipe(1000, 1e-4, 512, 8, "quick: single machine"),
    "flow_arcface": Recipe(1000, 1e-4, 512, 8, "quick: single machine"),
    "pivot_sd15": Recipe(1000, 2e-5, 512, 4, "quick: single machine"),
    "pivot_sdxl": Recipe(1000, 2e-5, 1024, 4, "quick: single machine"),
}


@dataclass(frozen=True)
class Settings:
    steps: int
    lr: float
    image_size: int
    batch: int                      # per process, per micro-batch
    grad_accum: int

    def global_batch(self, world: int = 1) -> int:
        return self.batch * self.grad_accum * world


def flow_stage(method: str) -> str:
    return "flow_arcface" if method == "arcface" else "flow"


def pivot_stage(text_dim: int) -> str:
    return "pivot_sdxl" if text_dim == 2048 else "pivot_sd15"


def split_batch(effective: int, micro: int, world: int = 1) -> tuple[int, int]:
    """(batch, grad_accum) with batch x grad_accum x world == effective, batch <= micro, as large as it can be."""
    if effective % world:
        raise ValueError(f"the paper's batch {effective} cannot be split over {world} processes")
    per_process = effective // world
    batch = max(d for d in range(1, min(micro, per_process) + 1) if per_process % d == 0)
    return batch, per_process // batch


def resolve(stage: str, recipe: str, given: Settings, explicit: frozenset = frozenset(),
            world: int = 1) -> tuple[Settings, str]:
    """The settings a run uses, and a line that says where they come from (printed at start).

    ``given``: the values asked for; ``explicit``: the names among steps, lr, image_size, batch,
    grad_accum the user set on purpose (they win over the recipe)."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, not {recipe!r}")
    if recipe == "custom":
        return given, (f"recipe custom ({stage}): {given.steps} steps, batch {given.batch} x accum "
                       f"{given.grad_accum} x {world} process(es), {given.image_size} px, lr {given.lr:g}")
    table = (PAPER if recipe == "paper" else QUICK)[stage]
    out = replace(given, **{k: getattr(table, k) for k in ("steps", "lr", "image_size") if k not in explicit})
    if table.batch is not None and "grad_accum" not in explicit:
        if recipe == "quick":
            batch, accum = (given.batch if "batch" in explicit else table.batch), 1
        elif "batch" in explicit:                       # the micro-batch asked for; accumulate up to the paper's
            per_process, left = divmod(table.batch, world * given.batch)
            if left or not per_process:
                raise ValueError(f"batch {given.batch} x {world} process(es) does not divide the paper's global "
                                 f"batch {table.batch}; choose a divisor, or leave batch to the recipe")
            batch, accum = given.batch, per_process
        else:
            batch, accum = split_batch(table.batch, given.batch, world)
        out = replace(out, batch=batch, grad_accum=accum)
    kept = sorted(explicit & {"steps", "lr", "image_size", "batch", "grad_accum"})
    line = (f"recipe {recipe} ({stage}): {out.steps} steps, global batch {out.global_batch(world)} "
            f"(batch {out.batch} x accum {out.grad_accum} x {world} process(es)), {out.image_size} px, "
            f"lr {out.lr:g} - {table.source}" + (f"; kept as given: {', '.join(kept)}" if kept else ""))
    return out, line

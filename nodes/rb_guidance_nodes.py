"""OmniPortrait's RB-Guidance node: a GUIDER for SamplerCustomAdvanced (the engine is comfy_host.rb_guider)."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..comfy_host import rb_setup
from ..guidance.rb_guidance import RBSettings
from .common import CATEGORY, Faces, OmniNode, advanced


class RBGuidance(OmniNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniIdentityRBGuidance",
            display_name="RB-Guidance (OmniIdentity)",
            category=f"{CATEGORY}/guidance",
            description=(
                "OmniPortrait's training-free RB-Guidance as a GUIDER for SamplerCustomAdvanced: CFG, plus, while "
                "t <= start_fraction x T, the gradient of E = p / (1 + S) on the model's noisy latent, where S "
                "matches diffusion features (DIFT) of the reference face (noised to t0) and of the generated face "
                "inside face masks; the gradient is masked to the face. As in the paper, the generated face's mask "
                "is the subject word's cross-attention refined by self-attention (give the prompt text and the CLIP "
                "so the node finds the word), and the reference's mask its detected face. The preview says which "
                "masks were used."),
            inputs=[
                io.Model.Input("model", tooltip="SD1.5, SDXL, FLUX.1 (dev, Kontext), Chroma, FLUX.2, Qwen-Image "
                                               "(-Edit) or Z-Image model, usually already carrying an identity "
                                               "adapter (or PuLID-FLUX)."),
                io.Conditioning.Input("positive", tooltip="Positive prompt."),
                io.Conditioning.Input("negative", tooltip="Negative prompt."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, tooltip="CFG scale (paper: 7.5)."),
                io.Image.Input("reference", tooltip="Reference photo of the face; for several people, one photo "
                                                    "per person (a batch), paired with layout_faces."),
                io.Vae.Input("vae", tooltip="The model's VAE, to encode the reference."),
                io.Float.Input("strength", default=8.5, min=0.0, max=100.0, step=0.1,
                               tooltip="p in E = p / (1 + S) (paper: 8.5); 0 turns the guidance off (plain CFG)."),
                io.Float.Input("start_fraction", default=0.6, min=0.0, max=1.0, step=0.01,
                               tooltip="u: guidance only while t <= u x T (the paper's 0.6)."),
                io.Int.Input("t0", default=671, min=0, max=999,
                             tooltip="Timestep the reference is noised to for its features (the paper's 671)."),
                io.Int.Input("feature_block", default=0, min=0, max=64, optional=True,
                             tooltip="DIFT features. SD: the input of this output block; FLUX.1, Chroma, FLUX.2: "
                                     "the generated image's tokens of this block's output, counting the double "
                                     "blocks, then the single blocks (1 = the first); Qwen-Image: its blocks; "
                                     "Z-Image: its main layers. 0 = the model's default: SD output block 6 (after "
                                     "SD1.5's second up-block), FLUX-type DiTs the last double block (FLUX.1: 19), "
                                     "Qwen-Image block 45 of 60, Z-Image layer 11 of 30."),
                io.Clip.Input("clip", optional=True,
                              tooltip="The CLIP that encoded the positive prompt: reads the prompt's tokens to find "
                                      "the subject word."),
                io.String.Input("prompt", default="", multiline=True, optional=True,
                                tooltip="The positive prompt's text (share one String with CLIP Text Encode), for "
                                        "finding the subject word."),
                io.String.Input("subject", default="", optional=True,
                                tooltip="The word naming the person; empty = the first of man, woman, person, boy, "
                                        "girl, ... in the prompt (or the pivot token of Apply Pivot ID)."),
                advanced(io.Int.Input("subject_token", default=0, min=0, max=511, optional=True,
                             tooltip="Expert: the subject's position among the prompt's tokens (SD: CLIP, 1 = first "
                                     "word; DiTs: their text stream, where the first word may be 0, so find it instead); 0 = find it from "
                                     "subject / prompt / Apply Pivot ID.")),
                io.Combo.Input("mask_source", options=list(rb_setup.MASK_SOURCES), default="subject attention",
                               optional=True,
                               tooltip="Generated face mask: the subject word's attention (paper), or the positions "
                                       "that resemble the reference face (no prompt needed)."),
                io.Combo.Input("reference_region", options=list(rb_setup.REFERENCE_REGIONS), default="face",
                               optional=True,
                               tooltip="Match the reference's face (paper; detected with face_analysis, else the "
                                       "bundled dlib detector) or the whole reference image."),
                io.FaceAnalysis.Input("face_analysis", optional=True,
                                      tooltip="Face analysis for the reference's face mask (default: bundled dlib)."),
                io.Mask.Input("reference_mask", optional=True, tooltip="Explicit face mask of the reference."),
                io.Mask.Input("generation_mask", optional=True,
                              tooltip="Explicit face mask of the generated image (skips the attention mask); one per "
                                      "reference photo when several are given."),
                Faces.Input("layout_faces", optional=True,
                            tooltip="Several people: Face Crop (selection 'all') of the layout image; face i of it "
                                    "is guided toward reference photo i (one energy term per pair)."),
                # control_after_generate stated, not left to the editor's rule for inputs named seed: frontend
                # 1.49's loader (migrateWidgetsValues) counts only stated controls, so with one forceInput socket
                # (subject_token) the counts matched, it dropped a saved value as a pre-1.16 forceInput one and
                # shifted the rest (seed read "fixed")
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, optional=True, control_after_generate=True,
                             tooltip="Seed of the noise added to the reference."),
            ],
            outputs=[
                io.Guider.Output(display_name="guider", tooltip="For SamplerCustomAdvanced."),
                io.Image.Output(display_name="mask_preview",
                                tooltip="The reference with its face mask in red, and which masks are used."),
            ],
        )

    MIN_IMAGE_SIZE = 64

    @classmethod
    def execute(cls, model, positive, negative, cfg, reference, vae, strength, start_fraction, t0,
                feature_block=0, clip=None, prompt="", subject="", subject_token=0, mask_source="subject attention",
                reference_region="face", face_analysis=None, reference_mask=None, generation_mask=None,
                layout_faces=None, seed=0) -> io.NodeOutput:
        reference, face_analysis, reference_mask, generation_mask = cls.checked(
            reference=reference, face_analysis=face_analysis, reference_mask=reference_mask,
            generation_mask=generation_mask)
        guider, preview, lines = rb_setup.rb_guider(
            model, positive, negative, cfg, reference, vae, RBSettings(strength, start_fraction, t0), feature_block,
            clip, prompt, subject, subject_token, mask_source, reference_region, face_analysis, reference_mask,
            generation_mask, layout_faces, seed)
        return io.NodeOutput(guider, preview, ui=ui.PreviewText("\n".join(lines)))


NODES = [RBGuidance]

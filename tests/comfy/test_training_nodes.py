"""The headless training workflow in a real ComfyUI: both stages on a tiny dataset, files the loaders read."""
import json
import shutil
import time

import pytest
import torch

from omniid.cli.client import ExecutionFailed, PromptRejected
from support.graph import Graph
from support.assets import TEST_ARCFACE_ONNX
from support.testing import images_of, load_workflow

TINY = ("CLIP vision.clip_name=omniid_random_clip_vit_h.safetensors",
        "Base model.ckpt_name=omniid_tiny_sd15.safetensors",
        "Stage 1: MTD.encoder_size=tiny (1 cross + 1 self, 128 wide, 16 queries)",
        "Stage 1: MTD.decoder_size=tiny (1 cross + 1 self, 64 wide)",
        "Stage 1: MTD.image_size=56", "Stage 1: MTD.steps=3", "Stage 1: MTD.batch=2", "Stage 1: MTD.targets=3",
        "Stage 1: MTD.precision=fp32", "Stage 1: MTD.save_every=1",
        "Stage 2: flow matching.image_size=64", "Stage 2: flow matching.steps=2", "Stage 2: flow matching.batch=2",
        "Stage 2: flow matching.targets=2", "Stage 2: flow matching.precision=fp32")


@pytest.fixture(scope="module")
def tiny_people(comfy_server, input_photos):
    """input/tiny_people: two identities made from the test photos."""
    root = comfy_server.base_directory / "input" / "tiny_people"
    for person, names in (("obama", [f"id_{i}.png" for i in range(1, 8)]), ("mirrored", ["id_5.png", "id_6.png"])):
        (root / person).mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copy(input_photos[name], root / person / name)
    return "input/tiny_people"


def test_headless_training_writes_files_the_loaders_read(comfy, comfy_server, tiny_people):
    prompt = load_workflow("api/train_omni_id.json", f"Dataset.folder={tiny_people}", "Stage 1: MTD.run_name=t1",
                           "Stage 2: flow matching.run_name=t1", *TINY)
    result = comfy.run(prompt, timeout=1200)
    saved = {node: result.outputs[node]["text"][0] for node in ("4", "9", "10")}
    assert saved["4"].startswith("saved models/omni_identity/trained/omni_id_mtd_")
    assert saved["10"].startswith("saved models/ipadapter/trained/omni_id_sd15_")
    assert images_of(comfy, result, "5")[0].shape[:2] == (360, 640)
    encoder_name = saved["9"].removeprefix("saved models/omni_identity/")
    adapter_name = saved["10"].removeprefix("saved models/ipadapter/")
    # both stages changed the weights they train
    from omniid.encoders.checkpoint import load_encoder
    from omniid.guidance.adapter import create_adapter
    from omniid.guidance.adapter_files import load_adapter
    models = comfy_server.base_directory / "models"
    stage1 = load_encoder(str(models / "omni_identity" / saved["4"].removeprefix("saved models/omni_identity/")))
    stage2 = load_encoder(str(models / "omni_identity" / encoder_name))
    assert stage1.config == stage2.config
    assert any(not torch.equal(a, b) for a, b in zip(stage1.state_dict().values(), stage2.state_dict().values()))
    trained = load_adapter(str(models / "ipadapter" / adapter_name))
    start = create_adapter(trained.config, seed=0)
    assert trained.config.layer_dims == (320, 320, 320, 320) and trained.config.token_dim == 128
    assert all(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), start.state_dict().values()))

    # the next prompt loads both and generates with them
    g = Graph()
    encoder = g.out(g.add("OmniIdentityEncoderLoader", encoder_name=encoder_name))
    clip = g.out(g.add("CLIPVisionLoader", clip_name="omniid_random_clip_vit_h.safetensors"))
    embeds = g.out(g.add("OmniIdentityEncode", encoder=encoder, clip_vision=clip, images=g.photos("id_3.png")))
    ckpt = g.checkpoint()
    adapter = g.out(g.add("OmniIdentityAdapterLoader", adapter_name=adapter_name))
    model = g.out(g.add("OmniIdentityApplyAdapter", model=g.out(ckpt, 0), adapter=adapter, embeds=embeds,
                        weight=1.0, start_at=0.0, end_at=1.0))
    ids = g.sd_sampling(model=model, ckpt=ckpt, steps=2)
    result = comfy.run(g.nodes, timeout=600)
    assert len(images_of(comfy, result, ids["save"])) == 1


def tiny_mtd_graph(tiny_people, steps: int, run_name: str, resume: bool, **extra) -> Graph:
    """Train Encoder (MTD) on the tiny people with a tiny encoder and decoder, its loss plot saved."""
    g = Graph()
    dataset = g.out(g.add("OmniIdentityDataset", folder=tiny_people, min_photos=2))
    clip = g.out(g.add("CLIPVisionLoader", clip_name="omniid_random_clip_vit_h.safetensors"))
    node = g.add("OmniIdentityTrainEncoderMTD", dataset=dataset, clip_vision=clip,
                 encoder_size="tiny (1 cross + 1 self, 128 wide, 16 queries)",
                 decoder_size="tiny (1 cross + 1 self, 64 wide)", image_size=28, mask_ratio=0.95,
                 sampler="few_to_many", steps=steps, lr=1e-3, batch=1, grad_accum=1, inputs_min=1, inputs_max=2,
                 targets=2, precision="fp32", seed=3, run_name=run_name, resume=resume, save_every=1, **extra)
    g.add("SaveImage", images=g.out(node, 1), filename_prefix=f"{run_name}_plot")
    return g


def test_training_cancels_and_resumes_from_its_checkpoint_and_bad_datasets_are_refused(comfy, comfy_server,
                                                                                         tiny_people):
    def mtd_graph(steps):
        return tiny_mtd_graph(tiny_people, steps, "resume_me", resume=True).nodes

    # Cancel mid-run: the node stops after its current step and leaves a checkpoint that resumes
    prompt_id = comfy.queue_prompt(mtd_graph(100000))
    checkpoint = comfy_server.base_directory / "output" / "omni_identity_training" / "resume_me.mtd.pt"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not checkpoint.exists():
        time.sleep(0.2)
    comfy.interrupt()
    with pytest.raises(ExecutionFailed) as cancelled:
        comfy.wait(prompt_id, timeout=300)
    assert cancelled.value.interrupted
    stopped_at = torch.load(checkpoint, weights_only=True)["step"]
    assert 1 <= stopped_at < 100000
    checkpoint.unlink()

    comfy.run(mtd_graph(2), timeout=600)
    checkpoint = comfy_server.base_directory / "output" / "omni_identity_training" / "resume_me.mtd.pt"
    assert checkpoint.is_file()
    assert torch.load(checkpoint, weights_only=True)["step"] == 2
    comfy.run(mtd_graph(4), timeout=600)
    state = torch.load(checkpoint, weights_only=True)
    assert state["step"] == 4 and len(state["losses"]) == 4            # continued, not restarted

    with pytest.raises(PromptRejected) as rejected:
        comfy.queue_prompt({"1": {"class_type": "OmniIdentityDataset",
                                  "inputs": {"folder": "input/nowhere", "min_photos": 2}},
                            "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}})
    assert "dataset folder 'input/nowhere' not found" in str(rejected.value)
    g = Graph()
    faces = g.out(g.add("OmniIdentityFaceAnalysisLoader", backend="dlib", provider="CPU", det_size=640))
    built = g.add("OmniIdentityBuildDataset", images=g.photos("id_1.png", "no_face.png"), face_analysis=faces,
                  name="too_small", photos_per_identity=8, pose_clusters=16, min_pose_difference=15.0,
                  drop_fraction=0.2, similarity_threshold=-1.0, crop_size=112)
    g.add("PreviewAny", source=g.out(built, 1))
    with pytest.raises(ExecutionFailed) as failed:
        comfy.run(g.nodes, timeout=300)
    message = failed.value.error["exception_message"]
    assert "no identity had 8 faces with distinct poses" in message and json.dumps("images_without_face") in message


def test_pivot_encoder_trains_its_visual_encoder_and_apply_pivot_uses_it(comfy, comfy_server, tiny_people):
    """OmniPortrait trains the visual encoder with the linear layer: the saved pivot file carries the trained
    vision tensors (format 2), and Apply Pivot ID embeds the reference with them, not with the plain CLIP."""
    g = Graph()
    ckpt = g.checkpoint()
    clip = g.out(g.add("CLIPVisionLoader", clip_name="omniid_random_clip_vit_h.safetensors"))
    faces = g.out(g.add("OmniIdentityFaceAnalysisLoader", backend="dlib", provider="CPU", det_size=640))
    dataset = g.out(g.add("OmniIdentityDataset", folder=tiny_people, min_photos=2))
    positive = g.out(g.add("CLIPTextEncode", clip=g.out(ckpt, 1), text="a photo of a person"))
    empty = g.out(g.add("CLIPTextEncode", clip=g.out(ckpt, 1), text=""))
    trained = g.add("OmniIdentityTrainPivotEncoder", model=g.out(ckpt, 0), vae=g.out(ckpt, 2), clip_vision=clip,
                    dataset=dataset, face_analysis=faces, positive=positive, class_token=5, eta=0.002,
                    image_size=64, steps=2, lr=1e-3, batch=1, targets=2, seed=0, run_name="pivot_test",
                    resume=False, save_every=0, vision_blocks=1, gradient_checkpointing=True,
                    condition_dropout=0.1, unconditional=empty)
    saved = g.add("OmniIdentitySavePivotEncoder", pivot_encoder=g.out(trained), filename_prefix="trained/pivot")
    g.add("SaveImage", images=g.out(trained, 1), filename_prefix="pivot_loss")
    result = comfy.run(g.nodes, timeout=900)
    name = result.outputs[saved]["text"][0].removeprefix("saved models/omni_identity/")
    from omniid.encoders.pivot import PivotConfig, PivotIDEncoder, load_pivot, save_pivot
    folder = comfy_server.base_directory / "models" / "omni_identity"
    pivot = load_pivot(str(folder / name))
    assert (pivot.config.image_dim, pivot.config.text_dim) == (1024, 768)
    assert (pivot.config.vision_blocks, pivot.config.vision_layout) == (1, "comfy_clip_vision")
    layers = {int(k.split(".")[3]) for k in pivot.vision_state if k.startswith("vision_model.encoder.layers.")}
    assert len(layers) == 1 and "visual_projection.weight" in pivot.vision_state      # the last block + the head
    # the same linear layer without the visual encoder, and with a visual encoder whose projection is zero
    plain = PivotIDEncoder(PivotConfig(1024, 768))
    plain.load_state_dict(pivot.state_dict())
    save_pivot(plain, str(folder / "trained" / "pivot_plain.safetensors"))
    zeroed = PivotIDEncoder(pivot.config, {**pivot.vision_state,
                                           "visual_projection.weight": pivot.vision_state["visual_projection.weight"] * 0})
    zeroed.load_state_dict(pivot.state_dict())
    save_pivot(zeroed, str(folder / "trained" / "pivot_zeroed.safetensors"))

    g = Graph()
    ckpt = g.checkpoint()
    clip = g.out(g.add("CLIPVisionLoader", clip_name="omniid_random_clip_vit_h.safetensors"))
    runs = {}
    for label, file in (("trained", name), ("plain", "trained/pivot_plain.safetensors"),
                        ("zeroed", "trained/pivot_zeroed.safetensors")):
        ids = g.sd_sampling(ckpt=ckpt, steps=2, prefix=label)
        pivoted = g.add("OmniIdentityApplyPivot", conditioning=g.out(ids["positive"]), pivot_name=file,
                        clip_vision=clip, reference=g.photos("id_2.png"), class_token=5)
        g.nodes[ids["sampler"]]["inputs"]["positive"] = g.out(pivoted)
        runs[label] = ids["save"]
    plain = g.sd_sampling(ckpt=ckpt, steps=2, prefix="nopivot")
    result = comfy.run(g.nodes, timeout=900)
    images = {label: images_of(comfy, result, save)[0] for label, save in runs.items()}
    without = images_of(comfy, result, plain["save"])[0]
    assert images["trained"].shape == without.shape and (images["trained"] != without).any()
    assert (images["zeroed"] != images["plain"]).any()          # the file's visual encoder is what embeds the face


@pytest.mark.parametrize("method", ["clip", "arcface", "infinite_id"])
def test_flow_matching_node_trains_a_paper_baseline_that_generates(comfy, comfy_server, tiny_people, method):
    """Omni-ID A.1: the baselines train in the same flow-matching stage; clip has no encoder (only the adapter's
    projections train), arcface starts a new ArcFace projection. The saved adapter then applies to Encode
    Baseline's embeds of that method (Infinite-ID Encode's for infinite_id, trained as Infinite-ID trains: identity
    enhanced, text cross-attention off). The paper recipe is logged but explicit-free widgets are overridden, so
    these runs stay on custom."""
    g = Graph()
    ckpt = g.checkpoint()
    clip = g.out(g.add("CLIPVisionLoader", clip_name="omniid_random_clip_vit_h.safetensors"))
    faces = g.out(g.add("OmniIdentityFaceAnalysisLoader", backend="dlib", provider="CPU", det_size=640,
                        arcface_model=TEST_ARCFACE_ONNX))
    dataset = g.out(g.add("OmniIdentityDataset", folder=tiny_people, min_photos=2))
    positive = g.out(g.add("CLIPTextEncode", clip=g.out(ckpt, 1), text="a photo of a person"))
    trained = g.add("OmniIdentityTrainFlowMatching", model=g.out(ckpt, 0), vae=g.out(ckpt, 2), clip_vision=clip,
                    dataset=dataset, positive=positive,
                    mode="identity_enhanced" if method == "infinite_id" else "omni_id", image_size=64, steps=2, lr=1e-3,
                    batch=2,
                    grad_accum=1, inputs_min=1, inputs_max=2, targets=2, precision="fp32", seed=0,
                    run_name=f"baseline_{method}", resume=False, save_every=0, method=method,
                    encoder_size="tiny (1 cross + 1 self, 128 wide, 16 queries)", face_analysis=faces,
                    arcface_merge="concat", recipe="custom")
    saved = g.add("OmniIdentitySaveAdapter", adapter=g.out(trained, 1), filename_prefix=f"trained/{method}")
    saved_encoder = None
    if method != "clip":
        saved_encoder = g.add("OmniIdentitySaveEncoder", encoder=g.out(trained, 0),
                              filename_prefix=f"trained/{method}_encoder")
    g.add("SaveImage", images=g.out(trained, 2), filename_prefix=f"{method}_loss")
    result = comfy.run(g.nodes, timeout=900)
    adapter_name = result.outputs[saved]["text"][0].removeprefix("saved models/ipadapter/")
    from omniid.guidance.adapter import create_adapter
    from omniid.guidance.adapter_files import load_adapter
    adapter = load_adapter(str(comfy_server.base_directory / "models" / "ipadapter" / adapter_name))
    assert adapter.config.embeds_kind == method and adapter.config.projection == "none"
    assert adapter.config.token_dim == (1280 if method == "clip" else 128)
    start = create_adapter(adapter.config, seed=0)
    assert all(not torch.equal(a, b) for a, b in zip(adapter.state_dict().values(), start.state_dict().values()))

    g = Graph()
    ckpt = g.checkpoint()
    inputs = dict(images=g.photos("id_3.png"))
    if method != "infinite_id":
        inputs["method"] = method
    if method in ("clip", "infinite_id"):
        inputs["clip_vision"] = g.out(g.add("CLIPVisionLoader", clip_name="omniid_random_clip_vit_h.safetensors"))
    if method != "clip":
        encoder_name = result.outputs[saved_encoder]["text"][0].removeprefix("saved models/omni_identity/")
        inputs["encoder"] = g.out(g.add("OmniIdentityEncoderLoader", encoder_name=encoder_name))
        inputs["face_analysis"] = g.out(g.add("OmniIdentityFaceAnalysisLoader", backend="dlib", provider="CPU",
                                              det_size=640, arcface_model=TEST_ARCFACE_ONNX))
    encode = "OmniIdentityEncodeInfiniteID" if method == "infinite_id" else "OmniIdentityEncodeBaseline"
    embeds = g.out(g.add(encode, **inputs))
    loaded = g.out(g.add("OmniIdentityAdapterLoader", adapter_name=adapter_name))
    model = g.out(g.add("OmniIdentityApplyAdapter", model=g.out(ckpt, 0), adapter=loaded, embeds=embeds,
                        weight=1.0, start_at=0.0, end_at=1.0))
    ids = g.sd_sampling(model=model, ckpt=ckpt, steps=2)
    result = comfy.run(g.nodes, timeout=600)
    assert len(images_of(comfy, result, ids["save"])) == 1


def test_training_nodes_log_the_paper_recipe_they_run(comfy, comfy_server, tiny_people):
    """recipe=paper replaces the widgets by the paper's values and says so at start (the run is then cancelled)."""
    g = tiny_mtd_graph(tiny_people, 3, "recipe_paper", resume=False, recipe="paper")
    checkpoint = comfy_server.base_directory / "output" / "omni_identity_training" / "recipe_paper.mtd.pt"
    prompt_id = comfy.queue_prompt(g.nodes)
    line = "recipe paper (mtd): 250000 steps, global batch 256 (batch 1 x accum 256 x 1 process(es)), 448 px, lr 0.0001"
    started = "training from step 0 to 250000; Cancel keeps a checkpoint"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and started not in comfy_server.log_text():
        time.sleep(0.2)
    comfy.interrupt()                                   # Cancel: the trainer saves its checkpoint and stops
    with pytest.raises(ExecutionFailed):
        comfy.wait(prompt_id, timeout=600)
    assert line in comfy_server.log_text()
    state = torch.load(checkpoint, weights_only=True)
    # the paper's global batch 256 as batch 1 x 256 accumulations and its lr, not the widgets' 1e-3
    assert (state["config"]["batch"], state["config"]["grad_accum"], state["config"]["lr"]) == (1, 256, 1e-4)

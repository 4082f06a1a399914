"""FLAME nodes: load the user's FLAME, fit identities, draw landmark conditions for ControlNet."""
from __future__ import annotations

import json
import os

import numpy as np
import torch
from comfy_api.latest import io, ui

from ..encoders.flame import (LANDMARK_MODES, FlameFitError, FlameModel, fit_flame, frame_face, load_grid,
                              observations, project, render_conditions, repose, single_template,
                              templates_from_params)
from ..encoders.flame.photos import photo_conditions, photo_landmarks
from ..encoders.flame.render import draw_points
from ..comfy_host.folders import model_file_path, model_files
from ..comfy_host.progress import progress
from .common import CATEGORY, LOG, OmniNode

FlameModelType = io.Custom("FLAME_MODEL")
FlameParamsType = io.Custom("FLAME_PARAMS")

NO_FILES = "(no files in models/flame)"
WHERE_TO_PUT_FLAME = (
    "FLAME is licensed and not shipped with this pack. Register at https://flame.is.tue.mpg.de, download "
    "FLAME 2020 (or FLAME 2023) and place its model file, generic_model.pkl (or flame2023.pkl), in "
    "ComfyUI/models/flame/. Place a landmark embedding beside it: landmark_embedding.npy from DECA "
    "(github.com/yfeng95/DECA, data/; 68 points) or flame_static_embedding.pkl from the FLAME release (51 points, "
    "no jaw line). Then refresh the editor and pick both files in 'FLAME Loader (OmniIdentity)'. Without FLAME, "
    "'Face Landmarks (OmniIdentity)' draws the landmarks of photos instead.")
TEMPLATE_MODES = ("grid 3x3", "single", "driving photos", "fitted photos")


def _flame_options(prefer: tuple[str, ...]) -> list[str]:
    files = model_files("flame")
    if not files:
        return [NO_FILES]
    return sorted(files, key=lambda f: (not any(p in os.path.basename(f).lower() for p in prefer), f))


class FlameLoader(OmniNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniIdentityFlameLoader",
            display_name="FLAME Loader (OmniIdentity)",
            category=f"{CATEGORY}/flame",
            description=("Loads your FLAME head model (FLAME 2020 generic_model.pkl, FLAME 2023, or an .npz with the "
                         "same arrays) and its landmark embedding from models/flame. Files are read as plain arrays; "
                         "nothing in them is executed. FLAME is licensed and not shipped: " + WHERE_TO_PUT_FLAME),
            inputs=[
                io.Combo.Input("model", options=_flame_options(("generic_model", "flame20")),
                               tooltip="The FLAME model file in models/flame."),
                io.Combo.Input("landmark_embedding", options=_flame_options(("embedding", "lmk")),
                               tooltip="landmark_embedding.npy (DECA, 68 points) or flame_static_embedding.pkl "
                                       "(51 points) in models/flame."),
                io.Int.Input("shape_components", default=100, min=1, max=300,
                             tooltip="Leading shape components fitted (DECA uses 100)."),
                io.Int.Input("expression_components", default=50, min=0, max=100,
                             tooltip="Leading expression components fitted (DECA uses 50)."),
            ],
            outputs=[FlameModelType.Output(display_name="flame_model", tooltip="The FLAME model with its landmark embedding.")],
        )

    @classmethod
    def validate_inputs(cls, model=None, landmark_embedding=None):
        if NO_FILES in (model, landmark_embedding):
            return WHERE_TO_PUT_FLAME
        present = set(model_files("flame"))
        missing = [name for name in (model, landmark_embedding) if name is not None and name not in present]
        if missing:
            return f"{', '.join(repr(m) for m in missing)} not found in models/flame. {WHERE_TO_PUT_FLAME}"
        return True

    @classmethod
    def execute(cls, model: str, landmark_embedding: str, shape_components: int,
                expression_components: int) -> io.NodeOutput:
        paths = []
        for name in (model, landmark_embedding):
            path = model_file_path("flame", name) if name != NO_FILES else None
            if path is None:
                raise FileNotFoundError(f"'{name}' is not in models/flame. {WHERE_TO_PUT_FLAME}")
            paths.append(path)
        flame = FlameModel.from_files(paths[0], paths[1], n_shape=shape_components,
                                      n_expression=min(expression_components, 100), name=model)
        return io.NodeOutput(flame, ui=ui.PreviewText(flame.describe()))


def _check_model(flame_model) -> FlameModel:
    if not isinstance(flame_model, FlameModel):
        raise TypeError("flame_model must come from 'FLAME Loader (OmniIdentity)'")
    return flame_model


def _overlay(image: torch.Tensor, layers: list[tuple[np.ndarray, tuple[float, float, float]]], radius: int):
    out = image[..., :3].clone().float()
    h, w = out.shape[:2]
    for points, colour in layers:
        mask = torch.from_numpy(draw_points(points, w, h, radius)) > 0
        out[mask] = torch.tensor(colour)
    return out


class FlameFit(OmniNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniIdentityFlameFit",
            display_name="FLAME Fit (OmniIdentity)",
            category=f"{CATEGORY}/flame",
            description=("Fits one FLAME shape code to a person from the 68 landmarks of one or more photos (and, per "
                         "photo, head pose, jaw and expression), by least squares with Gaussian priors on the codes "
                         "(scaled-orthographic camera, Levenberg-Marquardt). As in the paper, 3D landmarks are fitted "
                         "when the face analysis gives them (insightface's 68-point 3D landmarks); 2D ones (dlib) "
                         "otherwise. More photos from different angles pin the shape down better. Photos without a "
                         "face are skipped."),
            inputs=[
                FlameModelType.Input("flame_model", tooltip="From FLAME Loader (OmniIdentity)."),
                io.Image.Input("images", tooltip="Photos of one person (a batch)."),
                io.FaceAnalysis.Input("face_analysis", tooltip="From Face Analysis Loader (OmniIdentity); needs "
                                                               "68 landmarks (dlib, or insightface with 1k3d68)."),
                io.Float.Input("shape_prior", default=1.0, min=0.0, max=1000.0, step=0.01,
                               tooltip="Pull of the shape code toward the mean face; raise it for noisy landmarks "
                                       "or a single photo, lower it to follow the landmarks more closely."),
                io.Float.Input("expression_prior", default=1.0, min=0.0, max=1000.0, step=0.01,
                               tooltip="Pull of each photo's expression code toward neutral."),
                io.Int.Input("iterations", default=40, min=1, max=500,
                             tooltip="Levenberg-Marquardt iterations at most."),
                io.Combo.Input("landmarks", options=list(LANDMARK_MODES), default=LANDMARK_MODES[0], optional=True,
                               tooltip="Fit 3D landmarks when every face has them (the paper), or always the 2D ones."),
            ],
            outputs=[
                FlameParamsType.Output(display_name="flame_params",
                                       tooltip="The identity's shape code and each photo's pose and expression."),
                io.Image.Output(display_name="preview",
                                tooltip="Each fitted photo: detected landmarks green, the fitted FLAME's red."),
            ],
        )

    @classmethod
    def execute(cls, flame_model, images, face_analysis, shape_prior: float, expression_prior: float,
                iterations: int, landmarks: str = LANDMARK_MODES[0]) -> io.NodeOutput:
        flame_model, images, face_analysis = cls.checked(
            flame_model=flame_model, images=images, face_analysis=face_analysis)
        model = _check_model(flame_model)
        step = progress(len(images) + 1)
        found = photo_landmarks(images, face_analysis)
        step()
        if found.skipped:
            LOG.warning("FlameFit: no face in image(s) %s; they are skipped", found.skipped)
        if not found.faces:
            raise FlameFitError(f"no face found in any of the {len(images)} photo(s); FLAME needs at least one")
        observed, dims = observations(model, found.faces, landmarks)
        params = fit_flame(model, observed, shape_prior=shape_prior, expression_prior=expression_prior,
                           iterations=iterations, image_sizes=found.image_sizes)
        for _ in found.faces:
            step()
        with torch.no_grad():
            fitted = project(model.landmarks(params.posed()), params.scale, params.translation).numpy()[..., :2]
        previews = []
        for i, index in enumerate(found.image_indices):
            radius = max(1, round(min(found.image_sizes[i]) / 256))
            previews.append(_overlay(images[index], [(observed[i][:, :2], (0.1, 0.9, 0.2)),
                                                     (fitted[i], (1.0, 0.15, 0.1))], radius))
        same = len({tuple(p.shape) for p in previews}) == 1
        preview = torch.stack(previews) if same else previews[0][None]
        text = json.dumps({**params.summary(), "landmarks": dims, "skipped_images": found.skipped})
        return io.NodeOutput(params, preview, ui=ui.PreviewText(text))


class FlameLandmarks(OmniNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniIdentityFlameLandmarks",
            display_name="FLAME Landmarks (OmniIdentity)",
            category=f"{CATEGORY}/flame",
            description=("Re-poses a fitted identity (its FLAME shape code) with templates of expression and pose and "
                         "draws each posed face's 2D landmarks as a ControlNet condition: OpenPose face style (68 "
                         "points and the pupils, white on black), which ControlNet 1.1 OpenPose "
                         "(control_v11p_sd15_openpose) and the SDXL OpenPose ControlNets read. Templates: the bundled "
                         "3x3 grid (neutral, smile, jaw open x yaw -30/0/+30), one pose from the sliders, the poses "
                         "and expressions of driving photos, or the identity's own fitted photos."),
            inputs=[
                FlameModelType.Input("flame_model", tooltip="From FLAME Loader (OmniIdentity): the model the identity was fitted with."),
                FlameParamsType.Input("flame_params", tooltip="The identity, from FLAME Fit."),
                io.Combo.Input("templates", options=list(TEMPLATE_MODES), default="grid 3x3",
                               tooltip="Which poses and expressions to draw."),
                io.Int.Input("width", default=512, min=64, max=4096, step=8,
                             tooltip="Condition image width: the generation's width."),
                io.Int.Input("height", default=512, min=64, max=4096, step=8,
                             tooltip="Condition image height: the generation's height."),
                io.Float.Input("face_size", default=0.55, min=0.05, max=1.5, step=0.01,
                               tooltip="The neutral frontal face's larger extent as a fraction of the shorter side."),
                io.Boolean.Input("recenter", default=True,
                                 tooltip="Centre every posed face on the canvas (FLAME turns the head about the "
                                         "neck, which moves the face sideways)."),
                io.Int.Input("point_radius", default=0, min=0, max=32,
                             tooltip="Radius of the dots in pixels; 0 = OpenPose's 3 px per 512 px."),
                io.Float.Input("yaw", default=0.0, min=-90.0, max=90.0, step=1.0, optional=True,
                               tooltip="'single' only: degrees, > 0 turns the face toward the image's right."),
                io.Float.Input("pitch", default=0.0, min=-60.0, max=60.0, step=1.0, optional=True,
                               tooltip="'single' only: degrees, > 0 tilts the face up."),
                io.Float.Input("roll", default=0.0, min=-90.0, max=90.0, step=1.0, optional=True,
                               tooltip="'single' only: degrees, counter-clockwise in the image."),
                io.Float.Input("jaw_open", default=0.0, min=0.0, max=0.6, step=0.01, optional=True,
                               tooltip="'single' only: jaw opening in radians."),
                io.Float.Input("smile", default=0.0, min=0.0, max=1.5, step=0.05, optional=True,
                               tooltip="'single' only: strength of the bundled smile."),
                FlameParamsType.Input("driving", optional=True,
                                      tooltip="'driving photos': FLAME Fit of the photos whose poses and "
                                              "expressions to copy (same FLAME model)."),
            ],
            outputs=[
                io.Image.Output(display_name="conditions",
                                tooltip="One landmark image per template; feed ControlNetApplyAdvanced."),
                io.String.Output(display_name="labels", tooltip="The template of each image, as JSON."),
            ],
        )

    @classmethod
    def execute(cls, flame_model, flame_params, templates: str, width: int, height: int, face_size: float,
                recenter: bool, point_radius: int, yaw: float = 0.0, pitch: float = 0.0, roll: float = 0.0,
                jaw_open: float = 0.0, smile: float = 0.0, driving=None) -> io.NodeOutput:
        flame_model, flame_params, driving = cls.checked(
            flame_model=flame_model, flame_params=flame_params, driving=driving)
        model = _check_model(flame_model)
        if templates == "grid 3x3":
            chosen = load_grid()
        elif templates == "single":
            chosen = [single_template(yaw, pitch, roll, jaw_open, smile)]
        elif templates == "driving photos":
            if driving is None:
                raise ValueError("templates 'driving photos' needs the 'driving' input: FLAME Fit of the driving photos")
            chosen = templates_from_params(driving, "driving")
        else:
            chosen = templates_from_params(flame_params, "photo")
        if flame_params.model_name and flame_params.model_name != model.name:
            LOG.warning("FlameLandmarks: the identity was fitted with %s, drawn with %s",
                        flame_params.model_name, model.name)
        with torch.no_grad():
            neutral = model.landmarks(repose(model, flame_params.shape, [single_template(0, 0, 0, 0, 0)]))[0].numpy()
            posed = model.landmarks(repose(model, flame_params.shape, chosen)).numpy()
        framing = frame_face(neutral, width, height, face_size)
        points = []
        for face in posed:
            if recenter:
                lo, hi = face[:, :2].min(0), face[:, :2].max(0)
                framing.center = tuple(float(c) for c in (lo + hi) / 2)
            points.append(framing.project(face))
        images = render_conditions(np.stack(points), model.landmark_layout, width, height,
                                   radius=point_radius or None)
        labels = json.dumps([t.label for t in chosen])
        return io.NodeOutput(images, labels, ui=ui.PreviewText(labels))


class FaceLandmarks(OmniNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniIdentityFaceLandmarks",
            display_name="Face Landmarks (OmniIdentity)",
            category=f"{CATEGORY}/flame",
            description=("The path without FLAME: draws the 68 landmarks (and pupils) of every face in photos where "
                         "they are, OpenPose face style, as ControlNet conditions of the photos' size."),
            inputs=[
                io.Image.Input("images", tooltip="Photos whose face poses to copy."),
                io.FaceAnalysis.Input("face_analysis", tooltip="From Face Analysis Loader (OmniIdentity)."),
                io.Int.Input("point_radius", default=0, min=0, max=32,
                             tooltip="Radius of the dots in pixels; 0 = OpenPose's 3 px per 512 px."),
            ],
            outputs=[io.Image.Output(display_name="conditions", tooltip="One landmark image per photo, for ControlNetApplyAdvanced.")],
        )

    @classmethod
    def execute(cls, images, face_analysis, point_radius: int) -> io.NodeOutput:
        images, face_analysis = cls.checked(images=images, face_analysis=face_analysis)
        conditions, faceless = photo_conditions(images, face_analysis, radius=point_radius or None)
        if faceless:
            LOG.warning("FaceLandmarks: no face with 68 landmarks in image(s) %s; their conditions are black",
                        faceless)
        if len(faceless) == len(images):
            raise ValueError(f"no face with 68 landmarks in any of the {len(images)} image(s)")
        text = (f"no face in image(s) {', '.join(str(i + 1) for i in faceless)}: their conditions are black"
                if faceless else f"landmarks of {len(images)} image(s)")
        return io.NodeOutput(conditions, ui=ui.PreviewText(text))


NODES = [FlameLoader, FlameFit, FlameLandmarks, FaceLandmarks]

"""FLAME: loading the user's model, fitting identities, re-posing and landmark conditions."""
from .files import FlameFileError, load_landmark_embedding, load_model_arrays
from .fit import LANDMARK_MODES, FlameFitError, FlameParams, fit_flame, model_rows, observations, project
from .model import FlameModel, FlamePose
from .render import Framing, frame_face, render_conditions
from .templates import Template, load_grid, repose, single_template, templates_from_params

__all__ = ["LANDMARK_MODES", "FlameFileError", "FlameFitError", "FlameModel", "FlameParams", "FlamePose", "Framing", "Template",
           "fit_flame", "frame_face", "load_grid", "load_landmark_embedding", "load_model_arrays", "model_rows",
           "observations", "project", "render_conditions", "repose", "single_template", "templates_from_params"]

"""Identity metrics on real photos (dlib backend), CLIP-I/CLIP-T through open_clip, the report."""
import math

import numpy as np
import pytest
import torch

from omniid.encoders.face import create_analyzer
from omniid.training.metrics import (THRESHOLDS, clip_image_similarity, clip_text_similarity,
                                     face_embeddings, identity_report, pairwise_similarity)
from omniid.training.report import render_report, score_lines
from support.assets import load_photo


@pytest.fixture(scope="module")
def analyzer():
    return create_analyzer("dlib")


def batch(*paths):
    return [torch.from_numpy(load_photo(p).astype(np.float32) / 255.0)[None] for p in paths]


def embedding(analyzer, path):
    embeddings, kind = face_embeddings(batch(path)[0], analyzer)
    assert kind == "dlib128"
    return embeddings[0]


def test_an_image_scores_one_against_itself(analyzer, photos):
    e = embedding(analyzer, photos / "obama.jpg")
    assert pairwise_similarity(e[None], e[None], "dlib128")[0, 0] == pytest.approx(1.0)
    arc = np.random.default_rng(0).normal(size=(1, 512))
    assert pairwise_similarity(arc, arc, "arcface512")[0, 0] == pytest.approx(1.0)


def test_same_person_above_the_threshold_others_below(analyzer, photos):
    obama = [embedding(analyzer, photos / n) for n in ("obama.jpg", "obama2.jpg", "obama3.jpg")]
    biden = embedding(analyzer, photos / "biden.jpg")
    same = identity_report(obama[1:], [obama[0]], "dlib128")
    other = identity_report([biden], obama, "dlib128")
    assert all(s > THRESHOLDS["dlib128"] for s in same.per_image) and same.same_person == [True, True]
    assert other.per_image[0] < THRESHOLDS["dlib128"] and other.same_person == [False]


def test_faceless_images_are_reported_not_scored(analyzer, photos, no_face_photo):
    generated, _ = face_embeddings([batch(photos / "obama2.jpg")[0][0], batch(no_face_photo)[0][0]], analyzer)
    assert generated[1] is None
    report = identity_report(generated, [embedding(analyzer, photos / "obama.jpg")], "dlib128")
    assert report.per_image[1] is None and len(report.scored) == 1
    assert report.notes == ["no face found in generated image(s) 2"]
    assert math.isfinite(report.mean) and report.to_dict()["std"] == 0.0
    with pytest.raises(ValueError, match="no reference face"):
        identity_report(generated, [], "dlib128")


def test_clip_scores_through_open_clip():
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    from omniid.encoders.clip_features import OpenCLIPScorer
    torch.manual_seed(0)
    model = open_clip.model.CLIP(embed_dim=24, vision_cfg=CLIPVisionCfg(layers=2, width=32, head_width=16,
                                                                        patch_size=16, image_size=64),
                                 text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2,
                                                      layers=1))
    scorer = OpenCLIPScorer(model, open_clip.get_tokenizer("ViT-B-32"))
    images = torch.rand(3, 80, 80, 3)
    image_embeds = scorer.image_embeds(images)
    torch.testing.assert_close(clip_image_similarity(image_embeds, image_embeds[:1])[0], torch.tensor(1.0))
    text = scorer.text_embeds(["a photo of a person"])
    clip_t = clip_text_similarity(image_embeds, text)
    assert clip_t.shape == (3,) and (clip_t.abs() <= 1.0001).all()
    with pytest.raises(ValueError, match="one CLIP model"):
        clip_text_similarity(image_embeds, torch.rand(1, 16))


def test_report_image():
    lines = [score_lines(0.71, True, 0.8, 0.3), score_lines(None, None, None, None)]
    picture = render_report(torch.rand(2, 64, 48, 3), torch.rand(1, 40, 40, 3), lines, "title", ["summary"])
    assert picture.shape[0] == 1 and picture.shape[-1] == 3 and picture.shape[1] > 192 * 2
    assert lines[1] == ["ID: no face"]

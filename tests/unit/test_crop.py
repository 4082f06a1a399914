"""Detect -> select -> align -> crop over batches of real photos (dlib backend)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from omniid.encoders.face import (NoFaceFoundError, create_analyzer, crop_faces, draw_faces,
                                  template_points)
from support.assets import group_photo, load_photo


def letterbox(path, size=640) -> torch.Tensor:
    """A photo scaled to fit a size x size canvas (aspect kept, grey borders), as (H, W, 3)."""
    image = Image.fromarray(load_photo(path))
    image.thumbnail((size, size), Image.LANCZOS)
    canvas = Image.new("RGB", (size, size), (128, 128, 128))
    canvas.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    return torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)


@pytest.fixture(scope="module")
def analyzer():
    return create_analyzer("dlib")


def test_crops_masks_and_records_for_each_face(analyzer, photos):
    batch = torch.stack([letterbox(photos / "obama.jpg"), letterbox(photos / "biden.jpg")])
    result = crop_faces(batch, analyzer, crop_size=224, padding=0.25)
    assert result.crops.shape == (2, 224, 224, 3) and result.masks.shape == (2, 224, 224)
    assert result.crops.dtype == batch.dtype and 0.0 <= result.crops.min() <= result.crops.max() <= 1.0
    assert [r.image_index for r in result.faces.records] == [0, 1]
    assert result.faces.skipped_images == [] and result.warnings == []
    json.dumps(result.faces.to_dict())                      # the FACES record is plain data
    for mask in result.masks:
        assert mask[112, 112] == 1.0                        # the face centre is inside the mask
        assert mask[2, 2] == 0.0 and mask[2, 221] == 0.0     # the top corners are background


@pytest.mark.parametrize("name", ["obama.jpg", "obama2.jpg", "biden.jpg"])
def test_eye_centres_of_the_crop_land_on_the_template(analyzer, photos, image_batch, name):
    """Detect again in the aligned crop: the eyes sit where the ArcFace template puts them."""
    crop_size = 224
    result = crop_faces(image_batch(photos / name), analyzer, crop_size=crop_size, padding=0.25)
    crop = (result.crops[0].numpy() * 255).round().astype(np.uint8)
    again = analyzer.detect(crop, with_embedding=False)
    assert len(again) == 1
    error = np.linalg.norm(again[0].keypoints5[:2] - template_points(crop_size, 0.25)[:2], axis=1)
    assert error.max() < 5.0, f"eye centres {error} px from the template"


def test_faceless_images_are_skipped_with_a_warning(analyzer, photos, no_face_photo):
    batch = torch.stack([letterbox(no_face_photo), letterbox(photos / "obama2.jpg"), letterbox(no_face_photo)])
    result = crop_faces(batch, analyzer)
    assert len(result.crops) == 1 and result.faces.records[0].image_index == 1
    assert result.faces.skipped_images == [0, 2]
    assert result.warnings == ["no face found in image 1 of 3; skipped it",
                               "no face found in image 3 of 3; skipped it"]


def test_a_batch_without_any_face_fails_clearly(analyzer, no_face_photo, image_batch):
    with pytest.raises(NoFaceFoundError, match=r"No face found in any of the 2 input image\(s\).*dlib"):
        crop_faces(torch.cat([image_batch(no_face_photo)] * 2), analyzer)


def test_progress_callback_runs_per_image_and_can_cancel(analyzer, photos, no_face_photo):
    batch = torch.stack([letterbox(photos / "obama.jpg"), letterbox(no_face_photo)])
    seen = []
    crop_faces(batch, analyzer, on_image_done=seen.append)
    assert seen == [0, 1]

    class Cancelled(Exception):
        pass

    def cancel(index):
        raise Cancelled

    with pytest.raises(Cancelled):
        crop_faces(batch, analyzer, on_image_done=cancel)


def test_selection_modes_on_a_group_photo(analyzer):
    path = group_photo()
    if path is None:
        pytest.skip("insightface's t1.jpg group photo needs insightface installed")
    batch = torch.from_numpy(load_photo(path).astype(np.float32) / 255.0)[None]
    everyone = crop_faces(batch, analyzer, selection="all")
    records = everyone.faces.records
    assert len(records) >= 3
    areas = [r.face.area for r in records]
    assert areas == sorted(areas, reverse=True)
    largest = crop_faces(batch, analyzer, selection="largest").faces.records
    assert len(largest) == 1 and largest[0].face.area == max(areas)
    confident = crop_faces(batch, analyzer, selection="most_confident").faces.records[0]
    assert confident.face.score == max(r.face.score for r in records)
    centre = np.array([(batch.shape[2] - 1) / 2, (batch.shape[1] - 1) / 2])
    central = crop_faces(batch, analyzer, selection="closest_to_center").faces.records[0]
    distances = [np.linalg.norm((r.face.bbox[:2] + r.face.bbox[2:]) / 2 - centre) for r in records]
    assert np.linalg.norm((central.face.bbox[:2] + central.face.bbox[2:]) / 2 - centre) == pytest.approx(min(distances))


def test_preview_draws_on_a_copy(analyzer, photos, image_batch):
    batch = image_batch(photos / "obama.jpg")
    before = batch.clone()
    result = crop_faces(batch, analyzer)
    preview = draw_faces(batch, result.faces)
    assert preview.shape == batch.shape
    assert torch.equal(batch, before)
    x0, y0, x1, y1 = (int(v) for v in result.faces.records[0].face.bbox)
    assert torch.allclose(preview[0, y0, (x0 + x1) // 2], torch.tensor([0.0, 1.0, 0.0]))   # green box edge


def test_bad_arguments_are_rejected(analyzer, photos, image_batch):
    with pytest.raises(ValueError, match="selection"):
        crop_faces(image_batch(photos / "obama.jpg"), analyzer, selection="random")
    with pytest.raises(ValueError, match="batch"):
        crop_faces(image_batch(photos / "obama.jpg")[0], analyzer)

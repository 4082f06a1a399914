"""With insightface unimportable, the pack still loads and the dlib backend still works."""
import pytest

from omniid.cli.client import ComfyClient, ExecutionFailed
from support.testing import images_of, load_workflow, populate_base, start_server

BLOCKER = 'raise ImportError("No module named {name!r} (hidden by the OmniIdentity test)")\n'


@pytest.fixture(scope="module")
def server_without_insightface(comfyui, tiny_models, input_photos, tmp_path_factory):
    blocker = tmp_path_factory.mktemp("hide-insightface")
    for name in ("insightface", "onnxruntime"):
        (blocker / name).mkdir()
        (blocker / name / "__init__.py").write_text(BLOCKER.format(name=name))
    base = populate_base(tmp_path_factory.mktemp("comfy-base-noif"), tiny_models, input_photos)
    server = start_server(comfyui, base, env={"PYTHONPATH": str(blocker)})
    yield server
    server.cleanup()


def test_pack_loads_and_dlib_works(server_without_insightface):
    log = server_without_insightface.log_text()
    assert "IMPORT FAILED" not in "\n".join(l for l in log.splitlines() if "OmniIdentity" in l)
    client = ComfyClient(server_without_insightface.url)
    assert "OmniIdentityFaceCrop" in client.object_info()
    result = client.run(load_workflow("api/face_crop.json", "Photo.image=obama.jpg"), timeout=300)
    assert len(images_of(client, result, "4")) == 1


def test_insightface_backend_says_what_to_install(server_without_insightface):
    client = ComfyClient(server_without_insightface.url)
    prompt = load_workflow("api/face_crop.json", "Photo.image=obama.jpg",
                           "Face analysis.backend=insightface/antelopev2")
    with pytest.raises(ExecutionFailed) as failure:
        client.run(prompt, timeout=300)
    message = failure.value.error["exception_message"]
    assert "could not import insightface" in message and "hidden by the OmniIdentity test" in message
    assert "pip install -r requirements-insightface.txt" in message
    assert "dlib" in message

"""Nodes never change the objects they are given: ComfyUI caches a node's outputs and hands the same
objects to every node that reads them, in this prompt and in later ones."""
import json

from support.graph import Graph

XLABS = "omniid_tiny_flux_xlabs.safetensors"      # loads in bfloat16, as XLabs publishes it


def digest_of(result, node) -> dict:
    return json.loads(result.outputs[node]["text"][0])


def test_save_adapter_leaves_the_cached_adapter_as_it_was(comfy):
    g = Graph()
    loader = g.add("OmniIdentityAdapterLoader", adapter_name=XLABS)
    before = g.add("OmniTestDigest", value=g.out(loader))
    first = digest_of(comfy.run(g.nodes, timeout=600), before)
    assert first["dtypes"] == ["bfloat16"]

    g = Graph()
    loader_again = g.add("OmniIdentityAdapterLoader", adapter_name=XLABS)
    saved = g.add("OmniIdentitySaveAdapter", adapter=g.out(loader_again), filename_prefix="unchanged/xlabs")
    after = g.add("OmniTestDigest", value=g.out(loader_again), after=g.out(saved))
    result = comfy.run(g.nodes, timeout=600)
    assert loader_again in result.cached_nodes(), "the loader ran again, so its cached object was not re-read"
    assert result.outputs[saved]["text"][0].startswith("saved models/ipadapter/unchanged/xlabs_")
    assert digest_of(result, after) == first

"""Backbones: the preset registry and its input contract, resolving --backbone, and loading."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from backbones import hub, registry
from backbones.inputs import decode_to_backbone_input


def test_probe_hands_its_module_to_the_next_load_only(tiny_backbone, monkeypatch):
    import tensorflow_hub

    loads = []
    real_load = tensorflow_hub.load

    def counting_load(handle, *args, **kwargs):
        loads.append(handle)
        return real_load(handle, *args, **kwargs)

    monkeypatch.setattr(tensorflow_hub, "load", counting_load)
    spec = hub.probe(registry.resolve(tiny_backbone))
    assert len(loads) == 1 and spec.image_size and spec.embedding_dim

    embed = hub.load(spec)  # the probed module: no second load
    assert len(loads) == 1
    images = tf.random.uniform([2, spec.image_size, spec.image_size, 3], seed=0)
    first = embed(images).numpy()

    again = hub.load(spec)  # handed over once; a later load reads the SavedModel
    assert len(loads) == 2
    np.testing.assert_allclose(again(images).numpy(), first, rtol=1e-5, atol=1e-6)


def test_presets_declare_their_input_contract():
    for name in ("mobilenet_v2_100_224", "efficientnet_v2_b0", "inception_v3", "resnet_50_v2"):
        preset = registry.get(name)
        assert preset.spec.image_size in (224, 299)
        assert preset.spec.value_range == (0.0, 1.0)
        assert preset.spec.handle.startswith("https://")
        assert preset.build is None  # downloaded from TF-Hub, not built here
    assert registry.get("inception_v3").spec.image_size == 299
    builtin = registry.get(registry.DEFAULT_BACKBONE)
    assert builtin.spec.handle == "hubflow-builtin://efficientnet_lite2" and builtin.build
    assert (builtin.spec.image_size, builtin.spec.embedding_dim) == (260, 1280)


def test_resolve_backbone_flag_values(tmp_path):
    assert registry.resolve("inception_v3", image_size=256).image_size == 256  # flag overrides
    local = registry.resolve(str(tmp_path / "model"))
    assert (local.handle, local.image_size) == (str(tmp_path / "model"), 0)  # probed later
    url = "https://tfhub.dev/x/feature_vector/1"
    assert registry.resolve(url).handle == url
    with pytest.raises(ValueError, match="--backbone: unknown preset 'resnet50'.*inception_v3"):
        registry.resolve("resnet50")


def test_decode_to_backbone_input_range_and_shape():
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (50, 30), (255, 0, 0)).save(buf, "PNG")
    out = decode_to_backbone_input(tf.constant([buf.getvalue()]), 24).numpy()
    assert out.shape == (1, 24, 24, 3)
    np.testing.assert_allclose(out[0, 12, 12], [1.0, 0.0, 0.0], atol=1e-6)

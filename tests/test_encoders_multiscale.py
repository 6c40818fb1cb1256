"""The timm backend's multi-scale, intermediate-stage embedding (``scales``, ``feature_stage``;
retailklip.encoders.multiscale), on the real ImageNet MobileNetV2 and real GroceryStore photos."""

import numpy as np
import pytest
import torch
from conftest import MOBILENET_OPTIONS, MOBILENET_SPEC
from PIL import Image

from retailklip import create_encoder
from retailklip.errors import RetailKlipError

MULTI = {"scales": [224, 320], "feature_stage": -1, "crop_pct": 1.0}


@pytest.fixture(scope="module")
def multi_encoder(mobilenet_weights):
    return create_encoder(MOBILENET_SPEC, weights=mobilenet_weights, **MOBILENET_OPTIONS, **MULTI)


def _timm_stage_features(weights, path, size: int) -> torch.Tensor:
    """Independent reference: timm's own transform at ``size`` (crop_pct 1.0) and the last
    feature stage (blocks.6 of mobilenetv2_100), average-pooled -> (320,)."""
    import timm
    from safetensors.torch import load_file
    from timm.data import create_transform

    model = timm.create_model("mobilenetv2_100", pretrained=False)
    model.load_state_dict(load_file(str(weights)))
    model.eval()
    tf = create_transform(size, interpolation="bilinear", crop_pct=1.0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    feats = {}
    model.blocks[6].register_forward_hook(lambda m, i, o: feats.__setitem__("b6", o))
    with torch.no_grad():
        model(tf(Image.open(path).convert("RGB"))[None])
    return feats["b6"][0].mean(dim=(1, 2))


def test_multiscale_embedding_is_the_per_scale_stage_features(multi_encoder, mobilenet_weights, val_photos):
    """Each half of the 640-d embedding is the unit-normalised, average-pooled last stage of
    MobileNetV2 at one input size, scaled by 1/sqrt(2); the 224 px half comes from resizing the
    320 px input, so it matches timm's own 224 px preprocessing closely but not bit-exactly."""
    assert multi_encoder.dim == 640 and multi_encoder.groups == 2
    path = val_photos[0][0]
    v = multi_encoder.embed([path])[0]
    assert v.shape == (640,) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v), 1.0, atol=1e-5)
    for half, size in ((v[:320], 224), (v[320:], 320)):
        np.testing.assert_allclose(np.linalg.norm(half), 2**-0.5, atol=1e-5)
        ref = _timm_stage_features(mobilenet_weights, path, size)
        ref = (ref / ref.norm()).numpy() * 2**-0.5
        cos = float(half @ ref) * 2
        tol = 1e-5 if size == 320 else 0.02  # 320: the same pixels; 224: resized tensor vs resized image
        assert cos > 1 - tol, (size, cos)


def test_cosine_is_the_mean_of_the_scales_cosines(multi_encoder, val_photos):
    """With a centre, the per-scale parts are centred then normalised on their own."""
    paths = [p for p, _ in val_photos[:5]]
    raw = multi_encoder.features(torch.stack([multi_encoder.prepare(p) for p in paths])).numpy()
    center = raw[2:].mean(0)
    enc = multi_encoder.with_center(center)
    assert enc.groups == 2 and enc.identity.center != "none"
    v = enc.embed(paths[:2])

    def unit(x):
        return x / np.linalg.norm(x)

    parts = [(unit(raw[0, s] - center[s]), unit(raw[1, s] - center[s])) for s in (slice(0, 320), slice(320, 640))]
    np.testing.assert_allclose(float(v[0] @ v[1]), np.mean([float(a @ b) for a, b in parts]), atol=1e-5)


def test_options_change_the_identity_and_the_default_is_unchanged(multi_encoder, mobilenet_encoder, mobilenet_weights):
    assert multi_encoder.identity != mobilenet_encoder.identity
    assert '"scales": [224, 320]' in multi_encoder.identity.preprocess
    assert '"feature_stage": 4' in multi_encoder.identity.preprocess  # -1 resolved to the stage index
    assert "scales" not in mobilenet_encoder.identity.preprocess  # catalogs made before keep their identity
    stage_only = create_encoder(MOBILENET_SPEC, weights=mobilenet_weights, feature_stage=4, **MOBILENET_OPTIONS)
    assert stage_only.dim == 320 and stage_only.groups == 1
    assert '"scales": [224]' in stage_only.identity.preprocess


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"scales": [224, "x"]}, "integers >= 32"),
        ({"scales": [224, 224]}, "distinct"),
        ({"scales": "224"}, "list of input sides"),
        ({"scales": []}, "list of input sides"),
        ({"scales": [16]}, "integers >= 32"),
        ({"scales": [224, 320], "input_size": 256}, "not both"),
        ({"feature_stage": 5}, r"\[-5, 4\]"),
        ({"feature_stage": "last"}, "integer"),
    ],
)
def test_bad_options_are_one_line_errors(mobilenet_weights, options, message):
    with pytest.raises(RetailKlipError, match=message) as e:
        create_encoder(MOBILENET_SPEC, weights=mobilenet_weights, **options)
    assert "\n" not in str(e.value)


def test_groups_must_divide_the_dimension(mobilenet_encoder):
    from retailklip.encoders import Encoder

    for bad in (0, 3, True):
        with pytest.raises(ValueError, match="groups"):
            Encoder(mobilenet_encoder.model, mobilenet_encoder.preprocess, mobilenet_encoder.identity, groups=bad)


def test_catalog_with_multiscale_encoder_recognises_its_references(tmp_path, mobilenet_weights, iconic, capsys):
    """End to end through the CLI: ``--encoder-option`` values are JSON, the options are stored
    with the catalog, and the reopened catalog embeds queries the same way (a reference image is
    its own nearest neighbour at distance ~0)."""
    import json

    from catalog import Catalog
    from catalog.cli import main

    cat = str(tmp_path / "cat")
    assert main(["--catalog", cat, "init", "--encoder", MOBILENET_SPEC, "--weights", str(mobilenet_weights),
                 "--augmentations", "1", "--encoder-option", "interpolation=bilinear", "--encoder-option", "crop_pct=1.0",
                 "--encoder-option", "scales=[224, 320]", "--encoder-option", "feature_stage=-1"]) == 0
    chosen = iconic[:3]
    for _, name, path in chosen:
        assert main(["--catalog", cat, "add", str(path), "--sku", name]) == 0
    capsys.readouterr()
    assert main(["--catalog", cat, "recognize", *[str(p) for _, _, p in chosen], "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for (_, name, _), o in zip(chosen, out):
        r = o["recognitions"][0]
        assert r["sku"] == name and r["distance"] < 1e-4
    c = Catalog.open(cat)
    try:
        enc = c.encoder()
        assert enc.dim == 640 and enc.groups == 2
    finally:
        c.close()


MIXED = {"feature_stage": ["pooled", -1]}


@pytest.fixture(scope="module")
def mixed_encoder(mobilenet_weights):
    return create_encoder(MOBILENET_SPEC, weights=mobilenet_weights, **MOBILENET_OPTIONS, **MIXED)


def test_pooled_and_stage_parts_are_the_two_single_embeddings(mixed_encoder, mobilenet_encoder, mobilenet_weights,
                                                              val_photos):
    """``feature_stage=["pooled", -1]``: one forward pass gives the plain encoder's 1280-d
    embedding and the last stage's 320-d one, each unit-normalised and scaled by 1/sqrt(2)."""
    stage = create_encoder(MOBILENET_SPEC, weights=mobilenet_weights, feature_stage=-1, **MOBILENET_OPTIONS)
    assert mixed_encoder.dim == 1600 and mixed_encoder.groups == (1280, 320)
    assert '"feature_stage": ["pooled", 4]' in mixed_encoder.identity.preprocess
    assert mixed_encoder.identity not in (mobilenet_encoder.identity, stage.identity)
    paths = [p for p, _ in val_photos[:3]]
    v = mixed_encoder.embed(paths)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(v[:, :1280] * 2**0.5, mobilenet_encoder.embed(paths), atol=1e-5)
    np.testing.assert_allclose(v[:, 1280:] * 2**0.5, stage.embed(paths), atol=1e-5)


def test_unequal_parts_cosine_is_the_mean_of_the_parts(mixed_encoder, val_photos):
    paths = [p for p, _ in val_photos[:6]]
    raw = mixed_encoder.features(torch.stack([mixed_encoder.prepare(p) for p in paths])).numpy()
    center = raw[2:].mean(0)
    enc = mixed_encoder.with_center(center)
    assert enc.groups == (1280, 320)
    v = enc.embed(paths[:2])

    def unit(x):
        return x / np.linalg.norm(x)

    parts = [(unit(raw[0, s] - center[s]), unit(raw[1, s] - center[s])) for s in (slice(0, 1280), slice(1280, 1600))]
    np.testing.assert_allclose(float(v[0] @ v[1]), np.mean([float(a @ b) for a, b in parts]), atol=1e-5)


def test_multiscale_with_pooled_and_stage_is_scale_major(mobilenet_weights, val_photos):
    enc = create_encoder(MOBILENET_SPEC, weights=mobilenet_weights, scales=[160, 224], feature_stage=[-1, "pooled"],
                         **MOBILENET_OPTIONS)
    assert enc.groups == (320, 1280, 320, 1280) and enc.dim == 3200
    v = enc.embed([val_photos[0][0]])[0]
    for s in np.split(v, np.cumsum(enc.groups)[:-1]):
        np.testing.assert_allclose(np.linalg.norm(s), 0.5, atol=1e-5)


@pytest.mark.parametrize(
    ("stage", "message"),
    [([], "integer or a list"), (["pooled", "pooled"], "twice"), ([-1, 4], "twice"), (["head"], "integer or a list"),
     ([-1, True], "integer or a list"), (["pooled", 7], r"\[-5, 4\]")],
)
def test_bad_stage_lists_are_one_line_errors(mobilenet_weights, stage, message):
    with pytest.raises(RetailKlipError, match=message) as e:
        create_encoder(MOBILENET_SPEC, weights=mobilenet_weights, feature_stage=stage)
    assert "\n" not in str(e.value)


def test_group_widths_must_sum_to_the_dimension(mobilenet_encoder):
    from retailklip.encoders import Encoder

    for bad in ((640, 639), (1280, 0), (), "1280", (640.0, 640.0)):
        with pytest.raises(ValueError, match="groups"):
            Encoder(mobilenet_encoder.model, mobilenet_encoder.preprocess, mobilenet_encoder.identity, groups=bad)
    ok = Encoder(mobilenet_encoder.model, mobilenet_encoder.preprocess, mobilenet_encoder.identity, groups=[1000, 280])
    assert ok.groups == (1000, 280)


def test_rebuild_onto_pooled_and_stage_through_the_cli(tmp_path, mobilenet_weights, iconic, capsys):
    """The loop's nightly step: ``catalog rebuild --encoder-option 'feature_stage=["pooled", -1]'``
    re-embeds a catalog made with the plain embedding; the references are their own nearest
    neighbours in the new 1600-d index and the stored options survive a reopen."""
    import json

    from catalog import Catalog
    from catalog.cli import main

    cat = str(tmp_path / "cat")
    assert main(["--catalog", cat, "init", "--encoder", MOBILENET_SPEC, "--weights", str(mobilenet_weights),
                 "--augmentations", "1", "--encoder-option", "interpolation=bilinear"]) == 0
    chosen = iconic[:3]
    for _, name, path in chosen:
        assert main(["--catalog", cat, "add", str(path), "--sku", name]) == 0
    assert main(["--catalog", cat, "rebuild", "--encoder", MOBILENET_SPEC, "--weights", str(mobilenet_weights),
                 "--encoder-option", "interpolation=bilinear", "--encoder-option", 'feature_stage=["pooled", -1]']) == 0
    capsys.readouterr()
    assert main(["--catalog", cat, "recognize", *[str(p) for _, _, p in chosen], "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [o["recognitions"][0]["sku"] for o in out] == [name for _, name, _ in chosen]
    assert all(o["recognitions"][0]["distance"] < 1e-4 for o in out)
    c = Catalog.open(cat)
    try:
        enc = c.encoder()
        assert enc.dim == 1600 and enc.groups == (1280, 320)
    finally:
        c.close()

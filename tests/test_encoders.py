import pickle

import numpy as np
import pytest
import torch
from conftest import MOBILENET_OPTIONS, MOBILENET_SPEC, TINY_CLIP_OPTIONS, TINY_CLIP_SPEC
from safetensors.torch import save_file

from retailklip import EncoderSpec, create_encoder
from retailklip.errors import EncoderMismatchError, RetailKlipError, WeightsError, WeightsUnavailableError


def test_spec_parsing():
    s = EncoderSpec.parse("open_clip:ViT-L-14/laion2b_s32b_b82k")
    assert (s.backend, s.model, s.tag) == ("open_clip", "ViT-L-14", "laion2b_s32b_b82k")
    assert str(s) == "open_clip:ViT-L-14/laion2b_s32b_b82k"
    assert EncoderSpec.parse("timm:mobilenetv2_100") == EncoderSpec("timm", "mobilenetv2_100")
    for bad in ["", "ViT-L-14", "keras:resnet", "timm:", "timm:resnet50/tag"]:
        with pytest.raises(RetailKlipError):
            EncoderSpec.parse(bad)


def test_mobilenet_embeddings_real_photos(mobilenet_encoder, val_photos):
    paths = [p for p, _ in val_photos[:6]]
    v = mobilenet_encoder.embed(paths)
    assert v.shape == (6, 1280) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    # Deterministic, and independent of batching.
    mobilenet_encoder.batch_size, bs = 4, mobilenet_encoder.batch_size
    try:
        np.testing.assert_allclose(mobilenet_encoder.embed(paths), v, atol=1e-5)
    finally:
        mobilenet_encoder.batch_size = bs
    # Photos of one product are closer to each other than to another product.
    same = float(v[0] @ v[1])  # two Golden-Delicious photos
    banana = mobilenet_encoder.embed([p for p, c in val_photos if "Banana" in str(p)][:1])[0]
    assert same > float(v[0] @ banana)


def test_mobilenet_wrapper_equals_raw_timm_forward(mobilenet_encoder, mobilenet_weights, val_photos):
    import timm
    from safetensors.torch import load_file
    from timm.data import create_transform

    model = timm.create_model("mobilenetv2_100", pretrained=False, num_classes=1000)
    model.load_state_dict(load_file(str(mobilenet_weights)))
    model.reset_classifier(0)
    model.eval()
    tf = create_transform(224, interpolation="bilinear", crop_pct=0.875, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    from PIL import Image

    path = val_photos[0][0]
    with torch.no_grad():
        raw = model(tf(Image.open(path).convert("RGB"))[None])[0]
    raw = (raw / raw.norm()).numpy()
    np.testing.assert_allclose(mobilenet_encoder.embed([path])[0], raw, atol=1e-5)


def test_identity_records_weights_hash_and_dim(mobilenet_encoder):
    ident = mobilenet_encoder.identity
    assert ident.backend == "timm" and ident.dim == 1280
    assert ident.weights == "sha256:8e312b89d9e5bafb1f80b7f42a00c2bb9bb33085ad48d2304a2ccbb230eefe4d"
    other = create_encoder(MOBILENET_SPEC, random_init=True, **MOBILENET_OPTIONS).identity
    with pytest.raises(EncoderMismatchError, match="mismatch"):
        ident.check_same(other)


def test_tiny_open_clip_random_init(tiny_clip_encoder, val_photos):
    v = tiny_clip_encoder.embed([p for p, _ in val_photos[:3]])
    assert v.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    again = create_encoder(TINY_CLIP_SPEC, random_init=True, **TINY_CLIP_OPTIONS)
    assert again.identity == tiny_clip_encoder.identity
    np.testing.assert_allclose(again.embed([val_photos[0][0]]), v[:1], atol=1e-6)


def test_open_clip_local_weights_roundtrip(tiny_clip_encoder, tmp_path, val_photos):
    path = tmp_path / "visual.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_clip_encoder.model.state_dict().items()}, str(path))
    loaded = create_encoder(TINY_CLIP_SPEC, weights=path, seed=123, **TINY_CLIP_OPTIONS)
    assert loaded.identity.weights.startswith("sha256:")
    x = [val_photos[0][0]]
    np.testing.assert_allclose(loaded.embed(x), tiny_clip_encoder.embed(x), atol=1e-6)
    # A full-CLIP checkpoint ("visual." prefix, text tower beside it) loads too.
    full = {f"visual.{k}": v.contiguous() for k, v in tiny_clip_encoder.model.state_dict().items()}
    full["text_projection"] = torch.zeros(32, 32)
    torch.save(full, tmp_path / "full.pt")
    loaded2 = create_encoder(TINY_CLIP_SPEC, weights=tmp_path / "full.pt", **TINY_CLIP_OPTIONS)
    np.testing.assert_allclose(loaded2.embed(x), tiny_clip_encoder.embed(x), atol=1e-6)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/retailklip_pwned",))


def test_weights_errors(tmp_path, mobilenet_weights):
    with pytest.raises(WeightsError, match="not found.*--weights"):
        create_encoder(MOBILENET_SPEC, weights=tmp_path / "nope.safetensors")
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"x": _Evil()}))
    with pytest.raises(WeightsError, match="refused|not a readable"):
        create_encoder(MOBILENET_SPEC, weights=evil)
    import os

    assert not os.path.exists("/tmp/retailklip_pwned")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(WeightsError):
        create_encoder(MOBILENET_SPEC, weights=garbage)
    with pytest.raises(WeightsError, match="does not fit timm:resnet18"):
        create_encoder("timm:resnet18", weights=mobilenet_weights)
    with pytest.raises(WeightsError, match="does not fit open_clip"):
        create_encoder(TINY_CLIP_SPEC, weights=mobilenet_weights, **TINY_CLIP_OPTIONS)


def test_offline_pretrained_gives_clear_error():
    with pytest.raises(WeightsUnavailableError, match=r"ViT-B-32.*--weights"):
        create_encoder("open_clip:ViT-B-32/laion2b_s34b_b79k")
    with pytest.raises(RetailKlipError, match="no pretrained tag"):
        create_encoder("open_clip:ViT-B-32/not_a_tag")
    with pytest.raises(RetailKlipError, match="unknown open_clip model"):
        create_encoder("open_clip:NoSuchNet/x")
    with pytest.raises(WeightsError, match="no weights given"):
        create_encoder("open_clip:ViT-B-32")
    with pytest.raises(WeightsUnavailableError, match="--weights"):
        create_encoder("timm:mobilenetv2_100")


def test_rgba_crop_is_composited(mobilenet_encoder):
    from PIL import Image

    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    grey = Image.new("RGB", (64, 64), mobilenet_encoder.background)
    np.testing.assert_allclose(mobilenet_encoder.embed([rgba]), mobilenet_encoder.embed([grey]), atol=1e-6)


def test_centering_changes_identity_and_embeddings(mobilenet_encoder, val_photos):
    photos = [p for p, _ in val_photos[::40]]
    mean = mobilenet_encoder.mean_feature(photos)
    assert mean.shape == (1280,) and mean.dtype == np.float32 and (mean > 0).any()
    centred = mobilenet_encoder.with_center(mean)
    assert centred.model is mobilenet_encoder.model
    assert centred.identity.center.startswith("sha256:") and mobilenet_encoder.identity.center == "none"
    assert centred.identity.key != mobilenet_encoder.identity.key
    v, c = mobilenet_encoder.embed(photos), centred.embed(photos)
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, atol=1e-5)
    # Non-negative CNN features share a large common component: centring spreads them apart.
    off = ~np.eye(len(photos), dtype=bool)
    assert (c @ c.T)[off].mean() < (v @ v.T)[off].mean() - 0.2
    with pytest.raises(ValueError, match="shape"):
        mobilenet_encoder.with_center(mean[:10])


def test_random_init_silences_only_open_clip(caplog, monkeypatch):
    """Building a random-init open_clip model drops open_clip's own warning, not the process's
    other root-logger records (it used to disable the root logger meanwhile)."""
    import logging

    import open_clip

    real = open_clip.create_model

    def create(*a, **k):
        logging.warning("a POS thread's warning")  # noqa: LOG015 - root logger, from outside open_clip
        return real(*a, **k)

    monkeypatch.setattr(open_clip, "create_model", create)
    with caplog.at_level(logging.WARNING):
        create_encoder(TINY_CLIP_SPEC, random_init=True, **TINY_CLIP_OPTIONS)
    assert "a POS thread's warning" in caplog.text
    assert not logging.getLogger().disabled



@pytest.fixture
def encoder_table():
    """The encoder backend table, restored after the test."""
    from retailklip.encoders import ENCODER_BACKENDS

    saved = dict(ENCODER_BACKENDS)
    yield ENCODER_BACKENDS
    ENCODER_BACKENDS.clear()
    ENCODER_BACKENDS.update(saved)


def test_registered_backend_is_created_by_name(encoder_table, mobilenet_encoder):
    """A new backend is one registered builder; create_encoder finds it by its SPEC's name."""
    from retailklip.encoders import list_encoders, register_encoder

    calls = []

    @register_encoder("fake")
    def build(model, tag, **kwargs):
        calls.append((model, tag, kwargs["device"], kwargs["seed"]))
        return mobilenet_encoder

    assert list_encoders() == ("open_clip", "timm", "fake")
    assert create_encoder("fake:net", seed=3) is mobilenet_encoder
    assert calls == [("net", None, "cpu", 3)]
    with pytest.raises(RetailKlipError, match="only open_clip specs take a /TAG"):
        create_encoder("fake:net/tag")
    with pytest.raises(ValueError, match="registered already"):
        register_encoder("fake", build)
    del encoder_table["fake"]
    with pytest.raises(RetailKlipError, match=r"^bad encoder spec 'fake:net': expected open_clip:MODEL/TAG, "
                                              r"open_clip:MODEL or timm:MODEL$"):
        create_encoder("fake:net")


def test_offline_pretrained_tag_is_one_line(tmp_path):
    """With the hub forced offline and an empty hub cache, a pretrained tag fails with ONE line on
    stderr naming the model, the tag and the --weights FILE alternative (open_clip's own error
    log record is not printed beside it)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(repo))
    r = subprocess.run(
        [sys.executable, "-m", "catalog.cli", "--catalog", str(tmp_path / "cat"), "init",
         "--encoder", "open_clip:ViT-B-32/laion2b_s34b_b79k"],
        check=False, capture_output=True, text=True, env=env, cwd=repo, timeout=300,
    )
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "open_clip:ViT-B-32/laion2b_s34b_b79k" in lines[0] and "--weights" in lines[0]
    assert not (tmp_path / "cat" / "catalog.db").exists()


def test_timm_input_size_option(mobilenet_encoder, mobilenet_weights, val_photos):
    """``input_size`` (docs/evaluation.md, issue 14): a 256 px network input, resize 256 / 0.875."""
    big = create_encoder(MOBILENET_SPEC, weights=mobilenet_weights, input_size=256, **MOBILENET_OPTIONS)
    path = val_photos[0][0]
    assert tuple(big.prepare(path).shape) == (3, 256, 256)
    assert tuple(mobilenet_encoder.prepare(path).shape) == (3, 224, 224)
    assert '"input_size": [3, 256, 256]' in big.identity.preprocess
    assert big.identity.key != mobilenet_encoder.identity.key  # another preprocessing, another identity
    v, w = big.embed([path])[0], mobilenet_encoder.embed([path])[0]
    assert v.shape == (1280,) and abs(float(np.linalg.norm(v)) - 1) < 1e-5
    assert 0.5 < float(v @ w) < 0.9999  # the same photo, seen at another scale
    for bad in (0, 16, 256.0, True, "256"):
        with pytest.raises(RetailKlipError, match="input_size"):
            create_encoder(MOBILENET_SPEC, weights=mobilenet_weights, input_size=bad)

"""The embedding step of ``catalog rebuild`` (catalog/embedding.py): in-process and on Ray Data,
on real GroceryStore packshots with the real MobileNetV2 weights."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from conftest import MOBILENET_OPTIONS, MOBILENET_SPEC
from isolated import run_isolated
from raycases import embed_on_ray

from catalog import Catalog
from catalog.embedding import EmbedJob, embed_local, embed_ray
from catalog.errors import CatalogError
from catalog.writes import prepare_reference
from retailklip import create_encoder
from retailklip.errors import InvalidImageError, WeightsError


def _jobs(iconic, n: int, first_id: int = 100) -> list[EmbedJob]:
    return [EmbedJob(first_id + i, str(path)) for i, (_cid, _name, path) in enumerate(iconic[:n])]


def test_embed_local_equals_catalog_prepare(tmp_path, iconic, mobilenet_weights):
    """embed_local computes, bit for bit, what Catalog.add embeds for the same image, K and seed."""
    k, seed = 3, 7
    cat = Catalog.init(tmp_path / "cat", encoder=MOBILENET_SPEC, weights=mobilenet_weights, augmentations=k,
                       encoder_options=MOBILENET_OPTIONS)
    enc = cat.encoder()
    jobs = _jobs(iconic, 3)
    out = list(embed_local(jobs, enc, k, seed))
    assert [rid for rid, _ in out] == [j.reference_id for j in jobs]  # job order
    for job, (_rid, vecs) in zip(jobs, out):
        expected = prepare_reference(job.path, "sku", None, enc, k, seed, cat.snapshot().encoder_id).vectors
        assert vecs.dtype == np.float32 and vecs.shape == (k, enc.dim)
        assert np.array_equal(vecs, expected)
        np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    # views 1.. depend on the seed, view 0 (the image itself) does not
    other = dict(embed_local(jobs[:1], enc, k, seed + 1))[jobs[0].reference_id]
    assert np.array_equal(other[0], out[0][1][0]) and not np.array_equal(other[1:], out[0][1][1:])


def test_embed_local_unreadable_image_names_reference_and_path(tmp_path, iconic, mobilenet_encoder):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(iconic[0][2].read_bytes()[:300])
    for rid, path in ((7, empty), (8, corrupt), (9, tmp_path / "gone.jpg")):
        jobs = [*_jobs(iconic, 1), EmbedJob(rid, str(path))]
        it = embed_local(jobs, mobilenet_encoder, 1, 0)
        assert next(it)[0] == 100  # references before the bad one are yielded
        with pytest.raises(InvalidImageError) as e:
            next(it)
        msg = str(e.value)
        assert f"reference image {rid}" in msg and str(path) in msg and "\n" not in msg


def test_embed_local_rejects_bad_arguments(iconic, mobilenet_encoder):
    for k in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="augmentations"):
            next(embed_local(_jobs(iconic, 1), mobilenet_encoder, k, 0))
    assert list(embed_local([], mobilenet_encoder, 2, 0)) == []


@pytest.mark.slow
def test_embed_ray_equals_embed_local(tmp_path, iconic, mobilenet_weights):
    """12 real packshots, K = 2, on a local 2-CPU Ray cluster with 2 actors: the same vectors as
    embed_local -- bitwise at the same torch thread count (1 per actor), within 1e-6 otherwise.
    The cluster runs in a spawned process (tests/isolated.py says why)."""
    k, seed = 2, 3
    rng = np.random.default_rng(0)
    center = np.abs(rng.standard_normal(1280)).astype(np.float32)  # exercises a numpy kwarg on the wire
    kw = dict(spec=MOBILENET_SPEC, weights=str(mobilenet_weights), center=center, **MOBILENET_OPTIONS)
    enc = create_encoder(**kw)
    jobs = _jobs(iconic, 12)
    threads = torch.get_num_threads()
    local_default = dict(embed_local(jobs[:4], enc, k, seed))  # as Catalog.add computes (all threads)
    try:
        torch.set_num_threads(1)
        local_1 = dict(embed_local(jobs, enc, k, seed))
    finally:
        torch.set_num_threads(threads)

    res = run_isolated(embed_on_ray, jobs, kw, k, seed, enc.identity)
    got = res["got"]
    assert all(res["writeable"])  # as embed_ray yielded them, before pickling
    assert sorted(rid for rid, _ in got) == sorted(local_1)  # each job exactly once
    for rid, vecs in got:
        assert vecs.dtype == np.float32 and vecs.shape == (k, 1280)
        assert np.array_equal(vecs, local_1[rid])
        if rid in local_default:
            assert float(np.abs(vecs - local_default[rid]).max()) <= 1e-6
    assert res["still_connected"]  # a connection made by the caller is left alone


def test_ray_worker_unreadable_image_names_reference_path_and_node(tmp_path, iconic, mobilenet_weights):
    """The actor class in-process (no cluster): a bad image comes back as an error row, which
    the driver raises as the worker's own error type, in one line."""
    from catalog.embedding import RayEmbedder, raise_worker_error

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    kw = dict(spec=MOBILENET_SPEC, weights=str(mobilenet_weights), **MOBILENET_OPTIONS)
    worker = RayEmbedder(kw, 2, 0, None, None)
    out = worker({"reference_id": np.array([100, 77]), "path": np.array([str(iconic[0][2]), str(bad)], dtype=object)})
    assert list(out["reference_id"]) == [100, 77] and out["error"][0] == "" and out["dim"][0] == 1280
    assert np.frombuffer(out["vectors"][0], np.float32).shape == (2 * 1280,)
    with pytest.raises(InvalidImageError) as e:
        raise_worker_error(out["error"][1])
    msg = str(e.value)
    assert "reference image 77" in msg and str(bad) in msg and "Ray node" in msg and "\n" not in msg

    # an encoder that cannot be built on a node (weights file not there): every row says so
    missing = dict(kw, weights=str(tmp_path / "nowhere.safetensors"))
    batch = {"reference_id": np.array([5]), "path": np.array([str(bad)], dtype=object)}
    out = RayEmbedder(missing, 1, 0, None, None)(batch)
    with pytest.raises(WeightsError) as e:
        raise_worker_error(out["error"][0])
    assert "cannot build the encoder on Ray node" in str(e.value) and "nowhere.safetensors" in str(e.value)
    # any other failure to build it (here Encoder's ValueError) comes back as a CatalogError
    out = RayEmbedder(dict(kw, batch_size=0), 1, 0, None, None)(batch)
    with pytest.raises(CatalogError, match="cannot build the encoder on Ray node .*ValueError: batch_size"):
        raise_worker_error(out["error"][0])


def test_ray_worker_names_an_outlier_an_outlier_reference(tmp_path, iconic, mobilenet_weights):
    """An outlier job (EmbedJob noun "outlier reference") keeps its noun through the Ray actor:
    its error says "outlier reference N", an SKU reference's still "reference image N"."""
    from catalog.embedding import RayEmbedder, jobs_noun, raise_worker_error

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    kw = dict(spec=MOBILENET_SPEC, weights=str(mobilenet_weights), **MOBILENET_OPTIONS)
    worker = RayEmbedder(kw, 1, 0, None, None)
    out = worker({"reference_id": np.array([3, 4]), "path": np.array([str(bad), str(bad)], dtype=object),
                  "noun": np.array(["outlier reference", "reference image"], dtype=object)})
    assert list(out["noun"]) == ["outlier reference", "reference image"]
    for err, want in zip(out["error"], ("outlier reference 3", "reference image 4")):
        with pytest.raises(InvalidImageError) as e:
            raise_worker_error(err)
        assert str(e.value).startswith(f"{want}: ") and str(bad) in str(e.value) and "Ray node" in str(e.value)
    # the summary messages ("after N of M ...") count outliers as outlier references
    assert jobs_noun(["outlier reference"] * 2) == "outlier references"
    assert jobs_noun(["reference image"] * 2) == "references"
    assert jobs_noun(["reference image", "outlier reference"]) == "references"


def test_embed_ray_bad_address_is_a_catalog_error(iconic, mobilenet_weights):
    import ray

    assert not ray.is_initialized()
    kw = dict(spec=MOBILENET_SPEC, weights=str(mobilenet_weights), **MOBILENET_OPTIONS)
    for address in ("127.0.0.1:1", "ray://127.0.0.1:1", "no-port-here"):
        with pytest.raises(CatalogError) as e:
            list(embed_ray(_jobs(iconic, 1), kw, 1, 0, address=address))
        assert address in str(e.value) and "\n" not in str(e.value)
    assert not ray.is_initialized()


def test_embed_ray_without_ray_installed(monkeypatch, iconic, mobilenet_weights):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    kw = dict(spec=MOBILENET_SPEC, weights=str(mobilenet_weights))
    with pytest.raises(CatalogError, match=r"pip install 'retailklip\[ray\]'"):
        list(embed_ray(_jobs(iconic, 1), kw, 1, 0))


def test_embed_ray_rejects_bad_arguments(iconic):
    kw = dict(spec=MOBILENET_SPEC)
    for bad in (dict(batch_size=0), dict(num_workers=0), dict(threads_per_worker=0)):
        with pytest.raises(ValueError):
            embed_ray(_jobs(iconic, 1), kw, 1, 0, **bad)
    with pytest.raises(ValueError, match="spec"):
        embed_ray(_jobs(iconic, 1), {}, 1, 0)
    assert list(embed_ray([], kw, 1, 0, address="127.0.0.1:1")) == []  # nothing to do: no connection

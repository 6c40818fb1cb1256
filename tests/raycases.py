"""The Ray parts of the Ray tests, run in a spawned process by ``isolated.run_isolated`` (see
there why).  Each starts a local cluster, does its work, shuts the cluster down and returns
plain data for the test to check in its own process."""

from __future__ import annotations

from pathlib import Path


def embed_on_ray(jobs: list, encoder_kwargs: dict, k: int, seed: int, identity) -> dict:
    """``embed_ray`` on a local 2-CPU cluster with 2 actors, connected by the caller."""
    import ray

    from catalog.embedding import embed_ray

    assert not ray.is_initialized()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        got = list(embed_ray(jobs, encoder_kwargs, k, seed, num_workers=2, batch_size=4, identity=identity))
        return {"got": got, "writeable": [bool(v.flags.writeable) for _, v in got],
                "still_connected": ray.is_initialized()}  # the caller's connection is left alone
    finally:
        ray.shutdown()


def rebuild_on_ray(root: Path, rebuild_kwargs: dict) -> dict:
    """``Catalog.rebuild(ray="local", ...)`` of the catalog at ``root``: ``{"version": ...}`` (the
    new version's fields) when it succeeds, ``{"error": ...}`` (the names of the error's class
    and its bases, and its message) when it raises; either way ``"ray_inits"``, how many times
    the rebuild called ``ray.init`` (each call started a local cluster), and
    ``"connected_after"``, whether Ray was still connected when the rebuild returned."""
    import ray

    from catalog import Catalog

    inits = []
    real_init = ray.init

    def counting_init(*args, **kwargs):
        inits.append(kwargs.get("address"))
        return real_init(*args, **kwargs)

    ray.init = counting_init
    cat = Catalog.open(root)
    try:
        try:
            v = cat.rebuild(ray="local", **rebuild_kwargs)
            out = {"version": {"encoder_key": v.encoder_key, "vectors": v.vectors, "note": v.note, "dim": v.dim}}
        except Exception as e:  # noqa: BLE001 - returned for the test to check
            out = {"error": {"types": [c.__name__ for c in type(e).__mro__], "message": str(e)}}
        # the rebuild disconnects (stopping its local cluster) whether it succeeded or not
        return {**out, "ray_inits": len(inits), "connected_after": ray.is_initialized()}
    finally:
        ray.init = real_init
        ray.shutdown()
        cat.close()

"""Disk-full driver of tests/test_reliability2.py: run ``catalog`` commands on a copy of a catalog
on a tiny tmpfs that is nearly full, and report what they did.

Run inside a private mount namespace (``unshare -m python3 tests/diskfull_driver.py SPEC.json``),
so the tmpfs vanishes with the process.  For each case of the spec: a fresh copy of the catalog
on the tmpfs, a filler file that leaves ``free`` bytes, one command through ``catalog.cli.main``
(in this process: no re-import per case), then the filler is removed and the catalog's content
is compared with the copy's before the command (database rows, every file).  Prints one JSON
list: per case ``rc``, ``stderr`` lines, whether anything changed, and the files added/removed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import catalogcheck  # noqa: E402

from catalog.cli import main as catalog_main  # noqa: E402


def _fill(mount: Path, free: int) -> Path:
    filler = mount / "filler"
    st = os.statvfs(mount)
    size = st.f_bavail * st.f_frsize - free
    with open(filler, "wb") as f:
        if size > 0:
            f.write(b"\0" * size)  # tmpfs: written pages are allocated (no sparse fallocate)
    return filler


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    mount = Path(spec["mount"])
    mount.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={spec['size']}", "tmpfs", str(mount)], check=True)
    results = []
    for case in spec["cases"]:
        for p in mount.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        cat = mount / "cat"
        shutil.copytree(spec["catalog"], cat)
        if case.get("new"):  # `init` of a new catalog beside the copy
            cat = mount / "new"
        before = catalogcheck.snapshot(cat)
        filler = _fill(mount, case["free"])
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = catalog_main(["--catalog", str(cat)] + case["argv"])
            except SystemExit as e:  # argparse
                rc = e.code
        filler.unlink()
        after = catalogcheck.snapshot(cat)
        for snap in (before, after):  # the rebuild lock file (empty, kept between rebuilds) is no content
            snap.get("tree", {}).pop("rebuild.lock", None)
        try:
            consistent = catalogcheck.check_consistent(cat) if (cat / "catalog.db").exists() else {"orphans": [], "tmp_files": []}
        except AssertionError as e:
            consistent = {"problems": str(e)}
        results.append({
            "case": case, "rc": rc, "stderr": [ln for ln in err.getvalue().splitlines() if ln.strip()],
            "changed": catalogcheck.diff(before, after), "consistent": consistent,
        })
    print(json.dumps(results))


if __name__ == "__main__":
    main()

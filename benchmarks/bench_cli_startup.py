"""Start-up cost of ``catalog`` commands: wall time of each command (minimum of N interleaved
runs) as a ratio against ``python3 -c "import torch, torchvision, timm"`` measured in the same
run (what every command paid before imports were moved to where they are needed), and whether
the command imported torch.

    python3 benchmarks/bench_cli_startup.py [--shared ../shared] [--repeats 5]

Builds a MobileNetV2 catalog of 3 GroceryStore packshots in a temporary directory.  Commands
that need no model (``list``, ``info``, ``versions``, ``check --quick``) should stay well under
the baseline and never import torch; ``add`` needs the encoder and so pays for it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = ("import sys\nimport catalog.cli as c\n"
         "try:\n    rc = c.main(sys.argv[1:])\nfinally:\n    print('TORCH', 'torch' in sys.modules, file=sys.stderr)\n"
         "sys.exit(rc)\n")


def _run(argv: list[str]) -> tuple[float, bool | None]:
    t = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{argv}: exit {r.returncode}: {r.stderr[-500:]}")
    torch_line = [ln for ln in r.stderr.splitlines() if ln.startswith("TORCH ")]
    return wall, (torch_line[-1].endswith("True") if torch_line else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    weights = args.shared / "models" / "mobilenetv2_100.imagenet.safetensors"
    data = args.shared / "data" / "grocery-store" / "dataset" / "iconic-images-and-descriptions" / "Fruit" / "Apple"
    packshots = sorted(data.glob("*/*_Iconic.jpg"))
    with tempfile.TemporaryDirectory() as tmp:
        cat = Path(tmp) / "cat"
        base = [sys.executable, "-c", PROBE, "--catalog", str(cat)]
        _run(base + ["init", "--encoder", "timm:mobilenetv2_100", "--weights", str(weights),
                     "--encoder-option", "interpolation=bilinear"])
        for n, p in enumerate(packshots[:3]):
            _run(base + ["add", str(p), "--sku", f"s{n}"])
        rows = {
            "baseline: python -c 'import torch, torchvision, timm'": [sys.executable, "-c", "import torch, torchvision, timm"],
            "python -c pass": [sys.executable, "-c", "pass"],
            "catalog list": base + ["list"],
            "catalog info": base + ["info"],
            "catalog versions": base + ["versions"],
            "catalog check --quick": base + ["check", "--quick"],
            "catalog add + remove (one SKU)": None,
        }
        times: dict[str, list[float]] = {k: [] for k in rows}
        imported: dict[str, bool | None] = {}
        for _ in range(args.repeats):  # interleaved: every row once per round
            for name, argv in rows.items():
                if argv is None:
                    wall, imported[name] = _run(base + ["add", str(packshots[3]), "--sku", "new"])
                    _run(base + ["remove", "new"])
                else:
                    wall, imported[name] = _run(argv)
                times[name].append(wall)
        ref = min(times["baseline: python -c 'import torch, torchvision, timm'"])
        print(f"{'command':58} {'min s':>7} {'median s':>9} {'ratio':>6}  torch imported")
        for name, ts in times.items():
            ts = sorted(ts)
            tflag = {None: "-", True: "yes", False: "no"}[imported.get(name)]
            print(f"{name:58} {ts[0]:7.2f} {ts[len(ts) // 2]:9.2f} {ts[0] / ref:6.2f}  {tflag}")


if __name__ == "__main__":
    main()

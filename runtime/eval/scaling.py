"""python -m runtime.eval.scaling: samples/s of runtime.eval --ray with 1 and with N replicas, side by side
in one local Ray session, and Ray's own overhead per sample (the driver's round trip beyond the replica's
own time for the sample). The bundled sample set, repeated --copies times (so that each replica's first,
slower answers weigh as little as in a real evaluation), on the given engine; replicas take one core each.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

from models import checks
from models.errors import run_cli


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.eval.scaling", description=checks.description(__doc__),
                                 formatter_class=checks.HelpFormatter)
    ap.add_argument("--engine", required=True, help="export directory (the tiny one from runtime.demo will do)")
    ap.add_argument("--replicas", type=int, default=2, help="the replica count compared with one replica")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="answer length limit")
    ap.add_argument("--method", default="base", choices=("base", "vreason", "vreason-lite"), help="method")
    ap.add_argument("--copies", type=int, default=4, help="copies of the 14-sample set")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    return run_cli(lambda a: report(a), ap.parse_args(argv))


def report(args) -> int:
    from runtime.eval import distributed
    from runtime.eval.__main__ import main as eval_main

    checks.input_dir(args.engine, "--engine")
    checks.check_number("--replicas", args.replicas, lo=2, integer=True)
    ray = distributed.import_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=args.replicas, include_dashboard=False, log_to_driver=False, configure_logging=False)
    rows = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            data = copies(Path(tmp) / "set", args.copies)
            for n in (1, args.replicas):
                with contextlib.redirect_stdout(io.StringIO()):  # the eval's own tables are not this report
                    code = eval_main(["--engine", args.engine, "--data", str(data), "--out",
                                      str(Path(tmp) / f"r{n}"), "--method", args.method, "--max-new-tokens",
                                      str(args.max_new_tokens), "--ray", "--replicas", str(n),
                                      "--cpus-per-replica", "1"])
                if code:
                    return code
                rows[n] = dict(distributed.LAST_RUN)
    finally:
        if started:
            ray.shutdown()
    one, many = rows[1], rows[args.replicas]
    rep = {"replicas": rows, "speedup": many["samples_per_s"] / one["samples_per_s"],
           "overhead_fraction": max(one["overhead_fraction"], many["overhead_fraction"])}
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        for n, r in rows.items():
            print(f"{n} replica(s): {r['samples_per_s']:.2f} samples/s ({r['samples']} samples in {r['wall_s']:.1f} s);"
                  f" a sample {1e3 * r['sample_s']:.0f} ms in the replica, driver round trip "
                  f"+{1e3 * r['overhead_s']:.1f} ms ({100 * r['overhead_fraction']:.1f}%)")
        print(f"{args.replicas} replicas vs 1: x{rep['speedup']:.2f} samples/s")
    return 0


def copies(root: Path, n: int) -> Path:
    """The bundled sample set written under ``root`` and listed ``n`` times (distinct ids, the same media)."""
    from runtime.eval.samples import write_sample_set

    base = write_sample_set(root)
    rows = json.loads(base.read_text())
    out = root / f"shapes-x{n}.json"
    out.write_text(json.dumps([dict(r, problem_id=f"{k}-{r['problem_id']}") for k in range(n) for r in rows]))
    return out


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Write a simulated survey in the Rubin formats (thin wrapper of streamstars.simulate).

Example::

    python scripts/simulate.py /tmp/sim --visits 20 --seed 1 --sources-per-visit 5000
"""

from __future__ import annotations

import argparse
import sys
import time

from streamstars.simulate import simulate_survey


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, simulate, print a one-line summary; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="output directory")
    parser.add_argument("--visits", type=int, required=True, help="number of visits")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument("--sources-per-visit", type=int, default=5000,
                        help="approximate sources per visit (default 5000)")
    parser.add_argument("--bands", default="g,r,i,z", help="comma-separated bands (g,r,i,z)")
    parser.add_argument("--ra", type=float, default=150.0, help="field centre RA [deg]")
    parser.add_argument("--dec", type=float, default=2.0, help="field centre Dec [deg]")
    parser.add_argument("--radius", type=float, default=1.0, help="field radius [deg]")
    parser.add_argument("--detectors", type=int, default=None,
                        help="number of CCDs (9 for the grid camera, 189 for lsstcam)")
    parser.add_argument("--camera", choices=("grid", "lsstcam"), default="grid",
                        help="CCD grid shrunk to fit the field (default) or LSSTCam's layout")
    parser.add_argument("--survey-radius", type=float, default=None,
                        help="wide survey: true objects over this cap [deg], visits tiled over it")
    parser.add_argument("--border-nside", type=int, default=None,
                        help="stars on the boundaries of the HEALPix nest pixels at this nside")
    parser.add_argument("--first-visit", type=int, default=0,
                        help="write visits N.. of the same survey (default 0)")
    parser.add_argument("--crowded", action="store_true",
                        help="many close pairs, chains and deblends")
    parser.add_argument("--no-refcat", action="store_true", help="skip the reference catalog")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    bands = tuple(b.strip() for b in args.bands.split(",") if b.strip())
    start = time.perf_counter()
    try:
        survey = simulate_survey(args.out, args.visits, args.seed,
                                 sources_per_visit=args.sources_per_visit, bands=bands,
                                 ra_center=args.ra, dec_center=args.dec,
                                 field_radius_deg=args.radius, n_detectors=args.detectors,
                                 crowded=args.crowded, write_refcat=not args.no_refcat,
                                 progress=not args.quiet, camera=args.camera,
                                 survey_radius_deg=args.survey_radius,
                                 border_nside=args.border_nside, first_visit=args.first_visit)
    except ValueError as exc:
        print(f"simulate.py: error: {exc}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    print(f"wrote {len(survey.visits)} visits, {survey.n_sources} sources, "
          f"{survey.n_objects} true objects, {survey.n_refcat} reference stars "
          f"to {survey.out_dir} in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

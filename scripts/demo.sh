#!/usr/bin/env bash
# The main job on an embedded default: no Kafka, a small simulated survey.
# Makes a virtualenv, installs streamstars, simulates a survey in the Rubin formats
# (sourceTable_visit parquet + visitTable/ccdVisitTable + an HTM reference catalog),
# backfills it into an LMDB store (matching the simulated reference catalog), writes a snapshot
# of the fgcm catalogs (fgcmReferenceStars included) and prints a summary.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${STREAMSTARS_VENV:-.venv}"
OUT="${1:-demo-output}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e .
SS="$VENV/bin/streamstars"
rm -rf "$OUT"
"$SS" simulate "$OUT/repo" --visits 24 --seed 1 --sources-per-visit 5000
# match to the simulated HTM reference catalog (fgcmcal's [fgcmLoadReferenceCatalog] table)
cat > "$OUT/demo.toml" <<TOML
[fgcmLoadReferenceCatalog]
path = "$OUT/repo/refcat"
filterMap = { "g_6" = "g", "r_57" = "r", "i_39" = "i", "z_20" = "z" }
TOML
"$SS" backfill "$OUT/repo" --state "$OUT/state" --config "$OUT/demo.toml"
"$SS" snapshot "$OUT/snapshot" --state "$OUT/state"
"$SS" status --state "$OUT/state"
echo "snapshot files:"
ls -l "$OUT/snapshot"

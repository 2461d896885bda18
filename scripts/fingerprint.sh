#!/usr/bin/env bash
# Small, seeded runs of every method family, for "same numbers before and after" checks of a
# refactoring: train each briefly with fixed arithmetic (no timing-dependent choice), evaluate,
# and print every number the evaluations wrote. Compare two checkouts with
#   bash scripts/fingerprint.sh OUT_A > a.txt; (other checkout) bash scripts/fingerprint.sh OUT_B > b.txt; diff a.txt b.txt
# About 15 minutes on 2 cores. Needs METALAB_DATA (Omniglot, MNIST).
set -euo pipefail
OUT=${1:?usage: fingerprint.sh OUT_DIR}
mkdir -p "$OUT"
RUNS="$METALAB_DATA/omniglot/all_runs.zip"
M="python -m metalab"
q() { "$@" --no-progress > "$OUT/log.txt" 2>&1 || { cat "$OUT/log.txt" >&2; exit 1; }; }

q $M train protonet --recipe lake --episodes 150 --val-every 50 --val-episodes 20 \
    --bf16 on --channels-last on --run-dir "$OUT/protonet"
q $M eval "$OUT/protonet" --episodes 100
q $M eval "$OUT/protonet" --lake-runs "$RUNS"
q $M train maml --recipe sinusoid --episodes 200 --backend vmap --run-dir "$OUT/maml-sine"
q $M eval "$OUT/maml-sine" --episodes 100
q $M train maml --recipe omniglot-5w1s --episodes 12 --meta-batch 4 --val-every 6 \
    --val-episodes 10 --backend vmap --channels-last off --run-dir "$OUT/maml"
q $M eval "$OUT/maml" --episodes 100
q $M train matching --recipe omniglot-5w1s --episodes 100 --val-every 50 --val-episodes 20 \
    --channels-last off --run-dir "$OUT/matching"
q $M eval "$OUT/matching" --episodes 100
q $M eval "$OUT/matching" --data mnist --episodes 100
q $M train siamese --split lake --episodes 60 --val-every 30 --val-episodes 10 \
    --channels-last off --run-dir "$OUT/siamese"
q $M eval "$OUT/siamese" --lake-runs "$RUNS" --within-alphabet --trials 40 --verification
q $M train gnn --recipe omniglot-5w1s --episodes 40 --val-every 20 --val-episodes 10 \
    --channels-last off --run-dir "$OUT/gnn"
q $M eval "$OUT/gnn" --episodes 50
q $M train l2o --recipe quadratic --episodes 10 --val-every 5 --val-episodes 8 --run-dir "$OUT/l2o"
q $M eval "$OUT/l2o" --episodes 8
q $M train meta-lstm --recipe omniglot-5w1s --episodes 10 --val-every 5 --val-episodes 10 \
    --run-dir "$OUT/meta-lstm"
q $M eval "$OUT/meta-lstm" --episodes 50
q $M train mann --recipe omniglot-onehot-5 --episodes 10 --val-every 5 --val-episodes 8 \
    --run-dir "$OUT/mann"
q $M eval "$OUT/mann" --episodes 20
q $M eval mhd --lake-runs "$RUNS"
cp "$OUT/log.txt" "$OUT/mhd.txt"

# Every number in every eval.json (protocol labels aside), one per line, sorted by path.
python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

def walk(prefix, value):
    if isinstance(value, dict):
        for k in sorted(value):
            if k not in ("protocol", "config", "source", "arithmetic"):
                yield from walk(f"{prefix}.{k}", value[k])
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from walk(f"{prefix}[{i}]", v)
    elif isinstance(value, float | int) and not isinstance(value, bool):
        yield f"{prefix} {value!r}"

out = Path(sys.argv[1])
for path in sorted(out.glob("*/eval.json")):
    for line in walk(path.parent.name, json.loads(path.read_text())):
        print(line)
for line in (out / "mhd.txt").read_text().splitlines():
    if "%" in line:
        print("mhd", line.strip())
EOF

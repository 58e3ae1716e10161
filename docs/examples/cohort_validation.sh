#!/usr/bin/env bash
# A cohort validation from end to end, on five synthetic phantoms with exact labels:
# generate, segment as a batch, spoil one prediction (an empty mask: a missed study), and
# write the cohort report. The empty case must show up as a failure, first in the report.
#
# Usage: docs/examples/cohort_validation.sh [WORK_DIR]      (default: out/cohort_example)
set -euo pipefail
cd "$(dirname "$0")/../.."
MEDSEG=${MEDSEG:-.venv/bin/medseg}
PY=${PY:-.venv/bin/python}
W=${1:-out/cohort_example}
rm -rf "$W" && mkdir -p "$W/refs"

# 1. five phantoms (DICOM + exact labels), seeds 100..104
"$MEDSEG" synth "$W/phantoms" --seed 100 --count 5 --quiet
for d in "$W"/phantoms/*/; do
  id=$(basename "$d")
  cp "$d/labels.nii.gz" "$W/refs/$id.nii.gz"
done

# 2. segment them all (resumable batch, one study per sub-folder)
"$MEDSEG" batch "$W/phantoms" -o "$W/pred" --quiet

# 3. spoil one prediction: an all-zero mask on the same grid (the model "missed" the lungs)
victim=$(ls "$W/refs" | head -n 3 | tail -n 1); victim=${victim%.nii.gz}
"$PY" - "$W/pred/$victim/lungs.nii.gz" <<'PYEOF'
import sys
import numpy as np
import medseg
m = medseg.load(sys.argv[1])
medseg.save(m.with_array(np.zeros_like(m.array)), sys.argv[1])
PYEOF
echo "emptied the prediction of $victim"

# 4. the cohort report; --fail-on-failure makes the exit status say a lung was missed
set +e
"$MEDSEG" evaluate --pred-dir "$W/pred" --ref-dir "$W/refs" -o "$W/report" --fail-on-failure
rc=$?
set -e
echo "medseg evaluate exit status: $rc (1 = at least one case failed)"
head -n 3 "$W/report/cohort_cases.csv"

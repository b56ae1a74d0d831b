#!/usr/bin/env bash
# Regenerate docs/results/frontier/ from scratch (run from the repository root, KDP_GLUE_DIR set):
# train the students (the quickstart file with the overrides below), bench them, write the report.
#   bash docs/results/frontier/regenerate.sh [STORE_URI]
set -euo pipefail
STORE=${1:-sqlite:///$PWD/frontier-study.db}
HERE=docs/results/frontier
kdplatform run sweeps/quickstart.yaml 'grid.method=[kd]' 'grid.student.layers=[2,6]' 'grid.bits=[32,2]' \
  'overrides=[{when: {bits: 2}, set: {act_bits: 8}}]' data.max_train_examples=400 data.max_dev_examples=256 \
  teacher.finetune.epochs=1 'train=[{name: pred, epochs: 1, lr: 5.0e-4, batch_size: 32, eval_every: 13}]' \
  --tracking-uri "$STORE"
ids=$(python - "$STORE" <<'PY'
import sys
from mlflow.tracking import MlflowClient
c = MlflowClient(sys.argv[1])
exp = c.get_experiment_by_name("quickstart").experiment_id
runs = c.search_runs([exp], "tags.`kdp.role` = 'student' and params.`train.pred.epochs` = '1' and attributes.status = 'FINISHED'")
print(" ".join(r.info.run_id for r in runs))
PY
)
kdplatform bench $ids --threads 1 --iters 30 --batch-iters 3 --tracking-uri "$STORE"
kdplatform report --experiment quickstart --dashboard $HERE/frontier_study.yaml --out $HERE/report \
  --format png,md,csv --tracking-uri "$STORE"

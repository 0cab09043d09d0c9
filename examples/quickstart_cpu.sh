#!/usr/bin/env bash
# The main job on a CPU machine, end to end on the real code path: the embedded toy teacher and
# student (HF checkpoints in examples/toy, trained on the built-in addition task) are converted to
# Megatron at TP=2, evaluated on held-out problems, the student is distilled with TrOPD on two CPU
# processes (gloo, TP=2) with TensorBoard logs and checkpoints, evaluated again and exported to HF.
# The last line printed is `student_pass@1 before=<a> after=<b> teacher=<c>`.
#
# Environment overrides: OUT (run directory, default runs/quickstart), ITERS (TrOPD iterations),
# EVAL_PROBLEMS (held-out problems evaluated), LR, TOY (directory of the HF teacher/ and
# student/, default examples/toy), SETUP=0 (skip the venv set-up and use the
# python/torchrun on PATH). Extra arguments go to `python -m megatron_tropd.train`.
set -euo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
step() { echo; echo "[quickstart $((SECONDS - START))s] $*"; }

if [ "${SETUP:-1}" = 1 ]; then
  step "set-up (idempotent)"
  bash scripts/setup_env.sh
  # shellcheck disable=SC1091
  . "${VENV:-.venv}/bin/activate"
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OUT=${OUT:-runs/quickstart}
ITERS=${ITERS:-150}
EVAL_PROBLEMS=${EVAL_PROBLEMS:-500}
# LR warm-up: a fresh Adam's first steps move every weight by about lr; short runs (tests) warm up
# over half their iterations, as the schedule needs fewer warm-up than training iterations.
WARMUP=$(( ITERS < 40 ? ITERS / 2 : 20 ))
TOY=${TOY:-examples/toy}
DISTRIBUTED_ARGS=(--standalone --nproc-per-node 2)
TORCHRUN=(torchrun "${DISTRIBUTED_ARGS[@]}")
rm -rf "$OUT" && mkdir -p "$OUT"

step "1/6 task data: train prompts and held-out problems (seeded, never overlapping)"
python -m megatron_tropd.tasks.splits --output-dir "$OUT/data" --train 5000 --heldout 500

step "2/6 convert the HF teacher and student to Megatron at TP=2"
for model in teacher student; do
  "${TORCHRUN[@]}" tools/convert_checkpoint.py hf-to-megatron --hf-dir "$TOY/$model" \
    --output-dir "$OUT/$model" --tensor-model-parallel-size 2
done

EVAL_ARGS=(--data "$OUT/data/heldout.jsonl" --limit "$EVAL_PROBLEMS" --max-new-tokens 64
           --tensor-model-parallel-size 2)
step "3/6 held-out pass@1 of the student and the teacher before distillation"
"${TORCHRUN[@]}" -m megatron_tropd.evaluate --load "$OUT/student" "$OUT/teacher" \
  --label student teacher "${EVAL_ARGS[@]}" --output "$OUT/eval_before.json"

step "4/6 TrOPD: $ITERS iterations, 2 processes, TP=2 (TensorBoard: $OUT/tropd/tensorboard)"
MODEL_ARGS=(--student-load "$OUT/student" --teacher-load "$OUT/teacher")
MODEL_PARALLEL_ARGS=(--tensor-model-parallel-size 2)
DISTILL_ARGS=(--distill-method tropd --outlier-mode fkl)
ROLLOUT_ARGS=(--samples-per-prompt 4 --max-new-tokens 64 --temperature 1.0 --teacher-topk 8)
TRAINING_ARGS=(--train-iters "$ITERS" --prompts-per-iteration 8 --micro-batch-size 32
               --lr "${LR:-5e-4}" --lr-warmup-iters "$WARMUP" --weight-decay 0.0 --seed 1)
DATA_ARGS=(--prompts "$OUT/data/train_prompts.jsonl" --prompt-template plain --max-prompt-length 16
           --verifier addition)
CHECKPOINT_ARGS=(--save "$OUT/tropd" --save-interval "$ITERS")
LOGGING_ARGS=(--log-interval 10)
"${TORCHRUN[@]}" -m megatron_tropd.train "${MODEL_ARGS[@]}" "${MODEL_PARALLEL_ARGS[@]}" \
  "${DISTILL_ARGS[@]}" "${ROLLOUT_ARGS[@]}" "${TRAINING_ARGS[@]}" "${DATA_ARGS[@]}" \
  "${CHECKPOINT_ARGS[@]}" "${LOGGING_ARGS[@]}" "$@"
TRAINED=$(printf "%s/iter_%07d" "$OUT/tropd" "$(cat "$OUT/tropd/latest")")

step "5/6 held-out pass@1 of the distilled student"
"${TORCHRUN[@]}" -m megatron_tropd.evaluate --load "$TRAINED" --label student-tropd \
  "${EVAL_ARGS[@]}" --output "$OUT/eval_after.json"

step "6/6 export the distilled student to HF: $OUT/student-tropd-hf"
python tools/convert_checkpoint.py megatron-to-hf --megatron-dir "$TRAINED" \
  --output-dir "$OUT/student-tropd-hf"

step "done in $((SECONDS - START)) s"
python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
before = json.load(open(f"{out}/eval_before.json"))
after = json.load(open(f"{out}/eval_after.json"))["student-tropd"]
rows = [("student (before)", before["student"]), ("student (after TrOPD)", after),
        ("teacher", before["teacher"])]
print(f"held-out problems: {after['problems']}")
for name, r in rows:
    print(f"{name:24s} pass@1 {r['pass@1']:.3f}  (correct {r['greedy']['correct']}, wrong "
          f"{r['greedy']['wrong']}, malformed {r['greedy']['malformed']})")
print(f"student_pass@1 before={before['student']['pass@1']:.3f} after={after['pass@1']:.3f} "
      f"teacher={before['teacher']['pass@1']:.3f}")
PY

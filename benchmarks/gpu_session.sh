#!/usr/bin/env bash
# The prepared GPU session: every figure of the README that needs a GPU, in one script.
#
#   DATA=../shared/data/wbc-seg-d1 OUT=gpu-out bash benchmarks/gpu_session.sh
#
# Two chains share the GPU:
#   A  ResNet18 standard, PGD-AT and TRADES on DATA (train.py defaults), then their sweeps:
#      PGD-10 at 0..16/255 (+ AutoAttack on the standard model, the checklist on all), and
#      AutoAttack at 4/255 and 8/255 on the robust ones (issues 8 and 11);
#   B  UResNet18 standard and PGD-AT, their SegPGD/CosPGD sweeps (issue 11), then ResNet50 and
#      UResNet50 trained under torchrun --nproc_per_node <GPUs> with --amp, and
#      benchmarks/sweep_speed.py on both (issues 9 and 10).
# Each stage runs under `timeout` against one deadline (DEADLINE seconds); whatever finished is
# packed into OUT (logs, results, reports, figures; never checkpoints). SMOKE=1 shrinks every
# stage to seconds, to check the script on a CPU before a GPU is spent on it.
set -u
PY=${PY:-python3}
DATA=${DATA:-../shared/data/wbc-seg-d1}
OUT=${OUT:-gpu-out}
RUNS=${RUNS:-$(mktemp -d)}
DEADLINE=${DEADLINE:-480}
NGPU=${NGPU:-$($PY -c "import torch; print(max(1, torch.cuda.device_count()))")}
START=$(date +%s)
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$RUNS"

EPS="0 1/255 2/255 4/255 8/255 16/255"
if [ "${SMOKE:-0}" = 1 ]; then
    TRAIN_X="--epochs 1 --limit 12 --image-size 32 --adv-val-limit 4"
    TRAIN50_X="--epochs 1 --limit 12 --image-size 32"
    SWEEP_X="--limit 6 --check-limit 4"
    EPS="0 8/255"
    BENCH_X="--eps-list 0 8/255 --steps 2"
else
    TRAIN_X=""
    TRAIN50_X="--epochs 8 --image-size 128 --amp"
    SWEEP_X=""
    BENCH_X=""
fi

log() { echo "[$(( $(date +%s) - START )) s] $*"; }
left() { echo $(( DEADLINE - ($(date +%s) - START) )); }

# stage NAME CMD...: run CMD with the time left, its output in RUNS/NAME.log
stage() {
    local name=$1 rc
    shift
    if [ "$(left)" -le 5 ]; then log "skip $name: deadline"; return 1; fi
    log "start $name"
    timeout "$(left)" "$@" > "$RUNS/$name.log" 2>&1
    rc=$?
    log "end $name rc=$rc ($(tail -n 1 "$RUNS/$name.log" | cut -c1-150))"
    return $rc
}

train() {  # train NAME ARGS...
    local name=$1
    shift
    stage "train-$name" $PY train.py --data "$DATA" --depth 18 --out "$RUNS/$name" --seed 0 $TRAIN_X "$@"
}

sweep() {  # sweep RUN OUTNAME ARGS...
    local run=$1 name=$2
    shift 2
    stage "sweep-$name" $PY main.py --checkpoint "$RUNS/$run/checkpoints/best.pt" --out "$RUNS/$name" $SWEEP_X "$@"
}

chain_a() {
    train cls-standard --task classification
    train cls-pgdat --task classification --adv pgd --adv-eps 8/255 --adv-steps 7
    train cls-trades --task classification --adv trades --adv-eps 8/255 --adv-steps 7 --trades-beta 6
    sweep cls-standard sweep-cls-standard --attack pgd,autoattack --eps-list $EPS &
    sweep cls-pgdat sweep-cls-pgdat --attack pgd --eps-list $EPS &
    sweep cls-trades sweep-cls-trades --attack pgd --eps-list $EPS &
    wait
    sweep cls-pgdat aa-cls-pgdat --attack autoattack --eps-list 0 4/255 8/255 --splits test --no-checks &
    sweep cls-trades aa-cls-trades --attack autoattack --eps-list 0 4/255 8/255 --splits test --no-checks &
    wait
}

chain_b() {
    train seg-standard --task segmentation
    train seg-pgdat --task segmentation --adv pgd --adv-eps 8/255 --adv-steps 7
    sweep seg-standard sweep-seg-standard --task segmentation --attack pgd,segpgd,cospgd --eps-list $EPS &
    sweep seg-pgdat sweep-seg-pgdat --task segmentation --attack pgd,segpgd,cospgd --eps-list $EPS &
    wait
    for task in classification segmentation; do
        stage "train-$task-50-ddp" $PY -m torch.distributed.run --standalone --nproc_per_node "$NGPU" train.py \
            --task "$task" --depth 50 --data "$DATA" --out "$RUNS/$task-50" $TRAIN50_X
        stage "bench-$task-50" $PY benchmarks/sweep_speed.py --checkpoint "$RUNS/$task-50/checkpoints/best.pt" \
            --out "$RUNS/bench-$task-50.json" $BENCH_X
    done
}

log "GPUs: $NGPU; $($PY -c 'import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")')"
chain_a > "$RUNS/chain-a.log" 2>&1 &
chain_b > "$RUNS/chain-b.log" 2>&1 &
wait
cat "$RUNS/chain-a.log" "$RUNS/chain-b.log"
cp "$RUNS"/bench-*.json "$OUT"/ 2>/dev/null
tar -czf "$OUT/runs.tar.gz" -C "$RUNS" --exclude='*.pt' --exclude='*.tmp' . && log "packed $(du -h "$OUT/runs.tar.gz" | cut -f1)"

#!/usr/bin/env bash
# Issue 16's evaluation on one GPU, fixed seeds, one command per stage; docs/evaluation.md says what each does.
#
#   bash examples/run_evaluation.sh STAGE [WORKDIR]        (WORKDIR: runs/paper)
#
# Stages, in order (times on one H200 or H100: backbone and probe measured, the rest estimates; docs/evaluation.md):
#   backbone  train the paper-layout backbone (16 layers, 7 CSA) in six stages, each from the one before:
#             associative recall at 64 tokens (it learns to copy there, and only there from fresh weights),
#             the copy tasks and small long tasks at 64-512 tokens, the long mix up to 2K, more of it at 1-2K
#             (all four with a 64-token sliding window, which forces answers through the compressed branches),
#             the fifth at 1-2K with V4's own 128-token window (qa_block's next key is a lookup the model
#             makes only inside the window: docs/evaluation.md, eighth run), then the sixth under LSA's
#             restriction (departs from the paper: most long-task answers pick only among their evidence, a
#             tail, the sink and a random share of the chunks; docs/evaluation.md, sixth stage). A session's
#             device time holds the first three, or one later stage; checkpoints/backbone-bf16 is the newest
#             stage's export.                      ~4 + ~6 + ~12 + 16 + ~10 + ~4 min, each + ~2 min eval
#   probe     before any indexer: the oracle lookahead at budgets and the evidence oracle (alone and with filler,
#             other statements or the most picked beside it) on 4 examples a task at
#             2048 (probe_resident_sets.py): can a small resident set keep this backbone's answers at all?
#                                                          6.4 min (measured, H100; CPU: 10 min)
#   dump      label 5,600 question documents with the frozen backbone (train/validation/test), 32 a forward
#                                                          4.2 min (measured, H100: 53K tokens/s)
#   indexer   per tau (64, 16): select the labels at votes 1-3 and two evidence label sets, the question's and
#             the window's (both depart from the paper; one dump serves all), train an indexer per label set and
#             learning rate (10), choose on validation, gate on test; in 8-min runs, 35-45 s a candidate with its
#             validation gate, ~6.5 min per tau (measured, H100) (SMOKE also starts each from the native indexer:
#             --starts)
#   tune      per tau: the recency tails (uncapped LSA's; the budgeted rows', with their threshold) chosen on a
#             validation draw (seed 0)                              2.3 min per tau (measured, H200)
#   compare   per tau, length (2048, 4096, 8192) and task: 200 examples on draw seed 1, every row but native
#             paging, in parts of 50 examples (72 parts; a call starts a part only if the last one it ran, scaled
#             to the part's length, would still fit)   34 s a part of 50, 52-110 s one of 150 (measured, H100)
#   paging    per tau, length and task: the native-paging rows on 200 examples (PAGING_EXAMPLES), parts of their
#             own (whole-history scoring at every step)   60-124 s a part of 150 or 200 (measured, H100), ~15 min a tau
#   report    join the parts per tau: WORKDIR/tau{64,16}.json, .png, and the printed table   seconds
# A stage that stops at its time limit exits with status 75: run the same command again (finished work is kept
# and skipped). `all` runs every stage to its end. SMOKE=1 runs them all at CPU sizes (one tau, one length), about
# 2.5 minutes for `SMOKE=1 bash examples/run_evaluation.sh all /tmp/smoke` on 2 cores. COMPILE=1 trains the
# backbone's stages through torch.compile (one graph for every context length; on an H200 compiling stage 4's step
# took over 300 s, a third of the stage's eager time, before the first step: off by default). MINUTES=N (whole
# minutes, default 8) is what one call of a resumable stage may take: a device call is at most 10.
# TAUS=64 (or 16) runs the stages after the dump for that tau alone (default: both). EXAMPLES=50 compares the first
# 50 examples of every task and length (default 200: the same draw, so a later run with more adds the parts after).
# PART_EXAMPLES=150 makes the parts not yet run 150 examples each (default 50), in batches of at most
# BATCH_TOKENS / length examples (default 614400: 150 at 4096, 75 at 8192); a GPU step is mostly launch overhead,
# so a bigger batch costs little more time (the allocator's peaks per example, the batch's over its size, then
# include less of the weights). The native-paging rows run on the first PAGING_EXAMPLES examples of each task and
# length (default 200; 0: none) and are read against full's same examples.
set -euo pipefail
stage=${1:?usage: bash examples/run_evaluation.sh backbone|probe|dump|indexer|tune|compare|paging|report|all [WORKDIR]}
work=${2:-runs/paper}
STOPPED=75
mkdir -p "$work"

if [[ "${SMOKE:-0}" == 1 ]]; then
    device=cpu
    export OMP_NUM_THREADS=1
    taus="4"; lengths="320"; parts="long"
    recall_flags=(--size paper-smoke --steps 2 --dense-steps 2 --min-length 64 --max-length 64 --ramp-steps 0
                  --tokens-per-step 128 --eval-lengths 64 --eval-examples 1 --answer-tokens 4)
    copy_flags=(--size paper-smoke --steps 2 --dense-steps 1 --min-length 64 --max-length 64 --ramp-steps 0
                --tokens-per-step 128 --eval-lengths 64 --eval-examples 1 --answer-tokens 4)
    long_flags=(--size paper-smoke --steps 2 --dense-steps 1 --min-length 320 --max-length 320 --ramp-steps 0
                --tokens-per-step 640 --eval-lengths 320 --eval-examples 1 --answer-tokens 16)
    long2_flags=("${long_flags[@]}" --lr 5e-4)
    window_flags=("${long2_flags[@]}" --sliding-window 16)
    backbone_flags=("${window_flags[@]}" --restricted-share 0.75 --extra-tasks long_needle,qa_block,long_chain)
    data_flags=(--length 320 --spacing 128 --align 8 --train-docs 6 --validation-docs 3 --test-docs 3 --dump-tau 4
                --block-size 6 --recency-chunks 2)
    indexer_flags=(--steps 20 --batch-size 8 --num-heads 2 --rank 8 --lrs 3e-3 --votes 1,2 --evidence-labels
                   --window-evidence-labels --starts random,native)
    compare_flags=(--answer-tokens 16)
    tune_flags=(--lengths 320 --examples 1 --tails 2,4 --thresholds 0 --batch-size 4)
    probe_flags=(--length 320 --answer-tokens 16 --tau 4 --examples 1 --budgets 0.5,none --tails 2)
    examples=1; part_examples=1; paging_examples=1; batch_tokens=1280; minutes=1; eval_seconds=0
else
    device=cuda
    taus=${TAUS:-64 16}; lengths="2048 4096 8192"; parts="long_needle qa_block long_chain"
    recall_flags=(--size paper --min-length 64 --max-length 64 --steps 600 --dense-steps 600 --ramp-steps 0
                  --tokens-per-step 16384 --eval-lengths 64 --eval-examples 20 --answer-tokens 4)
    copy_flags=(--size paper --min-length 64 --max-length 512 --steps 800 --dense-steps 200 --ramp-steps 600
                --tokens-per-step 16384 --eval-lengths 512 --eval-examples 50 --answer-tokens 16)
    long_flags=(--size paper --min-length 256 --max-length 2048 --steps 1600 --dense-steps 500
                --ramp-steps 1000 --tokens-per-step 16384 --eval-lengths 2048 --eval-examples 20)
    long2_flags=(--size paper --min-length 1024 --max-length 2048 --steps 2000 --dense-steps 0 --ramp-steps 0
                 --lr 5e-4 --tokens-per-step 16384 --eval-lengths 2048 --eval-examples 20)
    window_flags=(--size paper --min-length 1024 --max-length 2048 --steps 1200 --dense-steps 0 --ramp-steps 0
                  --lr 5e-4 --tokens-per-step 16384 --eval-lengths 2048 --eval-examples 20 --sliding-window 128)
    backbone_flags=(--size paper --min-length 1024 --max-length 2048 --steps 500 --dense-steps 0 --ramp-steps 0
                    --lr 5e-4 --tokens-per-step 16384 --eval-lengths 2048 --eval-examples 20 --sliding-window 128
                    --restricted-share 0.75 --restricted-random 0.2 --extra-tasks long_needle,qa_block,long_chain)
    data_flags=(--length 2048 --train-docs 5000 --validation-docs 300 --test-docs 300 --dump-tau 16
                --dump-batch-size 32)
    indexer_flags=(--steps 3000 --batch-size 256 --num-heads 16 --rank 256 --lrs 1e-3,3e-3 --votes 1,2,3
                   --evidence-labels --window-evidence-labels)
    compare_flags=()
    tune_flags=(--lengths 2048 --examples 40 --batch-size 50)
    probe_flags=(--length 2048 --examples 4)
    examples=${EXAMPLES:-200}; part_examples=${PART_EXAMPLES:-50}; paging_examples=${PAGING_EXAMPLES:-200}
    batch_tokens=${BATCH_TOKENS:-614400}; minutes=${MINUTES:-8}
    eval_seconds=150  # a backbone stage's evaluation after its last step: ~2 min on an H200
fi
backbone="$work/backbone-bf16"
compile=(); [[ "${COMPILE:-0}" == 1 ]] && compile=(--compile)
indexer_args=(--backbone "$backbone" --workdir "$work/indexer" --device "$device" "${data_flags[@]}")

# The minutes a stage may run in what is left of this call, RESERVE seconds kept back (minutes_left RESERVE);
# fails when under 30 s are left.
minutes_left() {
    local left=$(( 60 * minutes - SECONDS - $1 ))
    (( left >= 30 )) && awk -v s="$left" 'BEGIN { printf "%.2f", s / 60 }'
}

stop_for_now() {  # a stage out of this call's time: status 75, the same command goes on
    echo "time limit: run again to go on"
    return "$STOPPED"
}

repeat_until_done() {  # `all`: run a resumable stage again while it stops at its time limit
    local status=0
    while true; do SECONDS=0; "$@" && return 0 || status=$?; [[ $status == "$STOPPED" ]] || return "$status"; done
}

# The backbone's stages in order as NAME:MIX, each from the bf16 export of the one before (NAME-bf16, small enough
# to travel between device calls), with NAME_flags: recall, copy, the long mix up to 2K, more of it at 1-2K, at
# V4's window, then under LSA's restriction.
backbone_stages=(recall:recall copy:copy long:long long2:long window:long backbone:long)

# The I-th backbone stage (train_stage I) in the seconds this call has left, its evaluation after the last step
# included, so that the stages run by one call stay within a device call's 10 minutes together. Done once a later
# stage's export exists, or its own without a checkpoint that still lacks its evaluation (a call cut short while
# evaluating: run again, it resumes at the last step and evaluates): a fresh machine given only the newest export
# goes on from there.
train_stage() {
    local i=$1 name=${backbone_stages[$1]%%:*} mix=${backbone_stages[$1]#*:} flags budget from=() later
    flags="${name}_flags[@]"
    for later in "${backbone_stages[@]:i+1}"; do [[ -f "$work/${later%%:*}-bf16/config.json" ]] && return 0; done
    if [[ -f "$work/$name-bf16/config.json" && ( -f "$work/$name/eval.json" || ! -f "$work/$name/checkpoint.pt" ) ]]
    then return 0; fi
    budget=$(minutes_left "$eval_seconds") || { stop_for_now; return; }
    (( i > 0 )) && from=(--init-from "$work/${backbone_stages[i - 1]%%:*}-bf16")
    python examples/train_eval_backbone.py --device "$device" --mix "$mix" --seed 0 --output-dir "$work/$name" \
        ${from[@]+"${from[@]}"} ${compile[@]+"${compile[@]}"} --export-bf16 "$work/$name-bf16" --resume \
        --max-minutes "$budget" "${!flags}"
}

run_backbone() {
    local i
    for i in "${!backbone_stages[@]}"; do train_stage "$i" || return; done
}

run_probe() {
    [[ -f "$work/probe.json" ]] && return 0
    python examples/probe_resident_sets.py "$backbone" --device "$device" "${probe_flags[@]}" --out "$work/probe.json"
}

run_dump() {
    local budget
    budget=$(minutes_left 0) || { stop_for_now; return; }
    python examples/train_eval_indexer.py "${indexer_args[@]}" --stage dump --max-minutes "$budget"
}

run_indexer() {  # each tau in what is left of the call; a candidate not begun waits for the next run
    local budget
    for tau in $taus; do
        [[ -f "$work/indexer/tau$tau/gate.json" ]] && continue
        budget=$(minutes_left 0) || { stop_for_now; return; }
        python examples/train_eval_indexer.py "${indexer_args[@]}" --stage train --tau "$tau" "${indexer_flags[@]}" \
            --max-minutes "$budget" || return
    done
}

compare() {  # compare TAU OUT FLAGS...: one run of compare_methods.py with the tau's indexer
    local tau=$1 out=$2; shift 2
    python examples/compare_methods.py --backbone "$backbone" --indexer "$work/indexer/tau$tau/indexer" --device "$device" \
        --tau "$tau" ${compare_flags[@]+"${compare_flags[@]}"} --out "$out" "$@"
}

run_tune() {
    for tau in $taus; do
        [[ -f "$work/tuned$tau.json" ]] && continue
        compare "$tau" "$work/tuned$tau.json" --tune --seed 0 "${tune_flags[@]}"
    done
}

examples_in() {  # the examples a part file holds
    python -c 'import json, sys; runs = json.load(open(sys.argv[1]))["records"].values()
print(len(next(iter(next(iter(runs)).values()))))' "$1"
}

# run_parts KIND: KIND compare (every row but native paging, parts of part_examples up to `examples`) or paging
# (the native-paging rows alone on the first paging_examples, in parts as compare's). A call starts a part only if
# the last one it ran, scaled to this part's context (prefill and attention grow with it), would still fit.
run_parts() {
    local kind=$1 last=0 last_length=1 started first count out limit=$examples rows=(--no-paging) tag=""
    [[ $kind == paging ]] && limit=$paging_examples rows=(--paging-only) tag="paging-"
    mkdir -p "$work/compare"
    for tau in $taus; do for length in $lengths; do for tasks in $parts; do
        first=0
        while (( first < limit )); do
            out="$work/compare/tau$tau-$length-$tasks-$tag$first.json"
            if [[ -f "$out" ]]; then first=$(( first + $(examples_in "$out") )); continue; fi
            if (( SECONDS + last * length / last_length > 60 * minutes )); then stop_for_now; return; fi
            count=$(( limit - first < part_examples ? limit - first : part_examples ))
            started=$SECONDS
            compare "$tau" "$out.tmp" --settings "$work/tuned$tau.json" --seed 1 --lengths "$length" --tasks "$tasks" \
                --first "$first" --examples "$count" "${rows[@]}" --batch-size "$(batch_size "$count" "$length")" \
                || return
            mv "$out.tmp" "$out" || return
            last=$(( SECONDS - started )) last_length=$length first=$(( first + count ))
        done
    done; done; done
}

batch_size() {  # batch_size COUNT LENGTH: a part's examples per batch, at most batch_tokens / LENGTH, at least 1
    local most=$(( $2 > batch_tokens ? 1 : batch_tokens / $2 ))
    echo $(( $1 < most ? $1 : most ))
}

run_report() {
    for tau in $taus; do
        python examples/compare_methods.py --merge "$work"/compare/tau"$tau"-*.json --out "$work/tau$tau.json" --plot "$work/tau$tau.png"
    done
}

case "$stage" in
    backbone) run_backbone ;;
    probe) run_probe ;;
    dump) run_dump ;;
    indexer) run_indexer ;;
    tune) run_tune ;;
    compare) run_parts compare ;;
    paging) run_parts paging ;;
    report) run_report ;;
    all)
        repeat_until_done run_backbone
        run_probe
        repeat_until_done run_dump
        repeat_until_done run_indexer
        run_tune
        repeat_until_done run_parts compare
        repeat_until_done run_parts paging
        run_report ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
esac

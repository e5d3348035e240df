#!/usr/bin/env bash
# The GPU runs behind the figures in docs/benchmarks/. Run from the repo root on a GPU machine with the project importable
# (pip install -e . or PYTHONPATH=$PWD) and, offline, the MiniLM bf16 copy in .data/minilm and SST-2 in .data/sst2.
#   bash benchmarks/gpu_checks.sh parity  OUTDIR   # Trainer vs loop, fp32 and bf16, GPT-2 124M and MiniLM (BERT-class)
#   bash benchmarks/gpu_checks.sh sst2    OUTDIR   # SST-2 acceptance run (loop train) 
#   bash benchmarks/gpu_checks.sh sst2cmp OUTDIR   # loop compare on the full SST-2 job
#   bash benchmarks/gpu_checks.sh gpt2    OUTDIR   # GPT-2 124M pre-training, bf16: tokens/s (loop vs Trainer)
set -euo pipefail
what=$1; out=$2; mkdir -p "$out"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
SST2=(--config tasks/configs/sst2_minilm.yaml --model_name_or_path .data/minilm
      --train_file .data/sst2/train.tsv --validation_file .data/sst2/validation.tsv --disable_tqdm)
GPT2=(--config tasks/configs/gpt2_124m.yaml --disable_tqdm)
case $what in
parity)
  for prec in fp32 bf16; do
    bf=$([ $prec = bf16 ] && echo true || echo false)
    python -m loop compare "${GPT2[@]}" --max_steps 30 --logging_steps 1 --eval_strategy no --warmup_steps 3 \
      --per_device_train_batch_size 8 --gradient_accumulation_steps 1 --bf16 $bf --trainer_runs 2 \
      --output_dir "$out/gpt2_$prec" 2>&1 | grep -v "^{" | tail -22
    python -m loop compare "${SST2[@]}" --max_steps 30 --logging_steps 1 --eval_strategy no --save_strategy no \
      --load_best_model_at_end false --bf16 $bf --trainer_runs 2 --output_dir "$out/minilm_$prec" \
      2>&1 | grep -v "^{" | tail -22
  done ;;
sst2)
  /usr/bin/time -v python -m loop train "${SST2[@]}" --output_dir "$out/sst2" 2>&1 | grep -v "^{" | tail -30 ;;
sst2cmp)
  python -m loop compare "${SST2[@]}" --output_dir "$out/sst2cmp" 2>&1 | grep -v "^{" | tail -25 ;;
gpt2)
  python -m loop compare "${GPT2[@]}" --max_steps 100 --eval_steps 100 --output_dir "$out/gpt2" 2>&1 | grep -v "^{" | tail -25 ;;
esac

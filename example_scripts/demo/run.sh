#!/usr/bin/env bash
# The offline demo with Atlas's recipe: a world of fictional people (no model can know them without retrieval); a
# T5 reader from random weights is pretrained with MLM on the train people's facts while retrieving, then finetuned
# on QA, with query-side retriever training; a closed-book T5 gets the same steps closed-book. About 13 minutes on
# 2 CPU cores.
#   bash example_scripts/demo/run.sh [DIR]     (DIR defaults to ./demo_out)
# Shorter tries: DEMO_PRETRAIN_STEPS (300 MLM steps), DEMO_STEPS (1,100 QA steps, the first DEMO_RETRIEVER_AT=200
# of them before the retriever is trained, in their last DEMO_RETRIEVER_STEPS=50).
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR=${1:-demo_out}
DATA=$DIR/data
RUNS=$DIR/runs
PRETRAIN=${DEMO_PRETRAIN_STEPS:-300}
STEPS=${DEMO_STEPS:-1100}
AT=${DEMO_RETRIEVER_AT:-200}
RETRIEVER_STEPS=${DEMO_RETRIEVER_STEPS:-50}
export TOKENIZERS_PARALLELISM=false
if ((STEPS <= AT || AT <= RETRIEVER_STEPS)); then
  echo "error: need DEMO_STEPS > DEMO_RETRIEVER_AT > DEMO_RETRIEVER_STEPS (got $STEPS, $AT, $RETRIEVER_STEPS)" >&2
  exit 2
fi

python preprocessing/prepare_demo.py --output_directory "$DIR" --layout facts

# Batch 32: for the same number of questions read, this reader learns to copy about twice as fast as with 16
# (BENCHMARKS.md).
COMMON=(--reader_model_type "$DIR/models/reader" --checkpoint_dir "$RUNS" --text_maxlength 64 --per_gpu_batch_size 32
  --dropout 0.0 --seed 0)
TRAIN=(--warmup_steps 50 --lr 1e-3 --scheduler linear --weight_decay 0.01 --log_freq 100 --eval_freq 100000
  --save_freq 100000)
# MLM on one fact a row: the noise (30%, one span) is the end of the sentence, i.e. the fact's value; its copy in
# the index has another id, so retrieval keeps it (Atlas filters only the row's own passage).
MLM=(--task mlm --train_data "$DATA/pretrain.jsonl" --mlm_noise_density 0.3 --mlm_mean_noise_span_length 3
  --target_maxlength 16 --total_steps "$PRETRAIN")
QA=(--task qa --train_data "$DATA/train.jsonl" --target_maxlength 16 --generation_max_length 12)
RETRIEVER=(--retriever_model_path "$DIR/models/retriever" --n_context 1 --per_gpu_embedder_batch_size 64)
INDEX=(--load_index_path "$RUNS/index")

metric() {  # metric NAME < evaluate.py output  ->  the value printed as "dev/NAME: value"
  grep "^dev/$1:" | awk '{print $2}'
}

closed_book() {  # the baseline: the same MLM and QA steps, closed-book; prints its dev exact match
  python train.py "${COMMON[@]}" "${TRAIN[@]}" "${MLM[@]}" --closed_book --name closed_book_mlm >&2
  python train.py "${COMMON[@]}" "${TRAIN[@]}" "${QA[@]}" --closed_book --total_steps "$AT" --name closed_book_qa1 \
    --model_path "$RUNS/closed_book_mlm/checkpoint/latest" >&2
  python train.py "${COMMON[@]}" "${TRAIN[@]}" "${QA[@]}" --closed_book --total_steps $((STEPS - AT)) \
    --name closed_book --model_path "$RUNS/closed_book_qa1/checkpoint/latest" >&2
  python evaluate.py "${COMMON[@]}" "${QA[@]}" --closed_book --name closed_book_eval \
    --model_path "$RUNS/closed_book/checkpoint/latest" --eval_data "$DATA/dev.jsonl" | metric exact_match
}

# The baseline runs beside Atlas (its log: $RUNS/closed_book.log): one run alone keeps ~1.4 of 2 cores busy, and a
# run's results do not depend on what else runs (the same thread counts, so the same arithmetic).
echo "== closed-book baseline (T5 alone) in the background: the same MLM and QA steps, without passages"
mkdir -p "$RUNS"
closed_book > "$RUNS/closed_book.em" 2> "$RUNS/closed_book.log" &
BASELINE=$!
trap 'pkill -P "$BASELINE" 2>/dev/null || true; kill "$BASELINE" 2>/dev/null || true' EXIT

echo "== Atlas: MLM pretraining of the reader, retrieving (the index is embedded once and saved)"
python train.py "${COMMON[@]}" "${TRAIN[@]}" "${MLM[@]}" "${RETRIEVER[@]}" --retriever_n_context 1 --name atlas_mlm \
  --passages "$DATA/passages.jsonl" --save_index_path "$RUNS/index"
echo "== Atlas: QA; the reader teaches the query encoder once it copies (pdist), then trains on what it retrieves"
# The passage encoder stays frozen (query-side training), so the saved index stays valid throughout.
python train.py "${COMMON[@]}" "${TRAIN[@]}" "${QA[@]}" "${RETRIEVER[@]}" "${INDEX[@]}" --total_steps "$AT" \
  --name atlas_qa1 --model_path "$RUNS/atlas_mlm/checkpoint/latest" --train_retriever --query_side_retriever_training \
  --freeze_retriever_steps $((AT - RETRIEVER_STEPS)) --retriever_n_context 5 --lr_retriever 5e-5 \
  --gold_score_mode pdist --temperature_gold 0.1 --temperature_score 0.1
python train.py "${COMMON[@]}" "${TRAIN[@]}" "${QA[@]}" "${RETRIEVER[@]}" "${INDEX[@]}" --total_steps $((STEPS - AT)) \
  --name atlas --model_path "$RUNS/atlas_qa1/checkpoint/latest"
EM=$(python evaluate.py "${COMMON[@]}" "${QA[@]}" "${RETRIEVER[@]}" "${INDEX[@]}" --name atlas_eval --write_results \
  --model_path "$RUNS/atlas/checkpoint/latest" --eval_data "$DATA/dev.jsonl" | metric exact_match)
RECALL=$(python evaluate.py --task qa --retrieve_only --checkpoint_dir "$RUNS" --name atlas_retrieval \
  --retriever_model_path "$DIR/models/retriever" --model_path "$RUNS/atlas/checkpoint/latest" "${INDEX[@]}" \
  --n_context 5 --eval_data "$DATA/dev.jsonl" | metric gold_recall@5)
if ! wait "$BASELINE"; then
  echo "error: the closed-book baseline failed; see $RUNS/closed_book.log" >&2
  exit 1
fi
CB=$(cat "$RUNS/closed_book.em")
echo "== done in $((SECONDS / 60)) min $((SECONDS % 60)) s"
echo "demo: closed-book EM $CB | atlas EM $EM | recall@5 $RECALL"

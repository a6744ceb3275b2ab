#!/usr/bin/env bash
# The offline demo: a world of fictional people (no model can know them without retrieval), a closed-book T5
# baseline, Atlas trained with retriever training, evaluation. Needs only PyPI packages; ~10 minutes on 2 CPU cores.
#   bash example_scripts/demo/run.sh [DIR]        (DIR defaults to ./demo_out)
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR=${1:-demo_out}
DATA=$DIR/data
RUNS=$DIR/runs
STEPS=${DEMO_STEPS:-600}
export TOKENIZERS_PARALLELISM=false

python preprocessing/prepare_demo.py --output_directory "$DIR"

COMMON=(--task qa --reader_model_type "$DIR/models/reader" --checkpoint_dir "$RUNS"
  --text_maxlength 96 --target_maxlength 16 --generation_max_length 12
  --per_gpu_batch_size 8 --dropout 0.0 --seed 0)
TRAIN=(--train_data "$DATA/train.jsonl" --total_steps "$STEPS" --warmup_steps 50 --lr 1e-3
  --scheduler linear --weight_decay 0.01 --log_freq 50 --eval_freq 100000 --save_freq 100000)
RETRIEVAL=(--retriever_model_path "$DIR/models/retriever" --passages "$DATA/passages.jsonl"
  --n_context 4 --retriever_n_context 4 --per_gpu_embedder_batch_size 64)

echo "== closed-book baseline"
python train.py "${COMMON[@]}" "${TRAIN[@]}" --closed_book --name closed_book
CB=$(python evaluate.py "${COMMON[@]}" --closed_book --name closed_book_eval \
  --model_path "$RUNS/closed_book/checkpoint/latest" --eval_data "$DATA/dev.jsonl" | grep "dev/exact_match" | awk '{print $2}')

echo "== Atlas (reader + retriever training)"
python train.py "${COMMON[@]}" "${TRAIN[@]}" "${RETRIEVAL[@]}" --train_retriever --lr_retriever 1e-5 \
  --gold_score_mode pdist --temperature_gold 0.1 --temperature_score 0.1 --name atlas \
  --save_index_path "$RUNS/atlas_index"
OUT=$(python evaluate.py "${COMMON[@]}" "${RETRIEVAL[@]}" --name atlas_eval --model_path "$RUNS/atlas/checkpoint/latest" \
  --eval_data "$DATA/dev.jsonl" --write_results)
EM=$(echo "$OUT" | grep "dev/exact_match" | awk '{print $2}')
RECALL=$(python evaluate.py --task qa --retrieve_only --checkpoint_dir "$RUNS" --name atlas_retrieval \
  --retriever_model_path "$DIR/models/retriever" --model_path "$RUNS/atlas/checkpoint/latest" \
  --passages "$DATA/passages.jsonl" --n_context 5 --eval_data "$DATA/dev.jsonl" \
  | grep "dev/gold_recall@5" | awk '{print $2}')
echo "demo: closed-book EM $CB | atlas EM $EM | recall@5 $RECALL"

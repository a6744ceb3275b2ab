#!/usr/bin/env bash
# The offline demo: a world of fictional people (no model can know them without retrieval), a closed-book T5
# baseline, Atlas trained with query-side retriever training, evaluation. Needs only PyPI packages; about 10 minutes
# on 2 CPU cores.
#   bash example_scripts/demo/run.sh [DIR]        (DIR defaults to ./demo_out; DEMO_STEPS overrides 1200 steps)
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR=${1:-demo_out}
DATA=$DIR/data
RUNS=$DIR/runs
STEPS=${DEMO_STEPS:-1200}
export TOKENIZERS_PARALLELISM=false

python preprocessing/prepare_demo.py --output_directory "$DIR" --layout facts

COMMON=(--task qa --reader_model_type "$DIR/models/reader" --checkpoint_dir "$RUNS" --text_maxlength 64
  --target_maxlength 16 --generation_max_length 12 --per_gpu_batch_size 16 --dropout 0.0 --seed 0)
TRAIN=(--train_data "$DATA/train.jsonl" --warmup_steps 50 --lr 1e-3 --scheduler linear --weight_decay 0.01
  --log_freq 100 --eval_freq 100000 --save_freq 100000)
RETRIEVER=(--retriever_model_path "$DIR/models/retriever" --n_context 1 --retriever_n_context 5
  --per_gpu_embedder_batch_size 64)

metric() {  # metric NAME < evaluate.py output  ->  the value printed as "dev/NAME: value"
  grep "^dev/$1:" | awk '{print $2}'
}

echo "== closed-book baseline (T5 alone)"
python train.py "${COMMON[@]}" "${TRAIN[@]}" --closed_book --total_steps "$STEPS" --name closed_book
CB=$(python evaluate.py "${COMMON[@]}" --closed_book --name closed_book_eval \
  --model_path "$RUNS/closed_book/checkpoint/latest" --eval_data "$DATA/dev.jsonl" | metric exact_match)

echo "== Atlas: reader + query-side retriever training (the passage encoder stays frozen, so the index stays valid)"
python train.py "${COMMON[@]}" "${TRAIN[@]}" "${RETRIEVER[@]}" --total_steps "$STEPS" --name atlas \
  --passages "$DATA/passages.jsonl" --save_index_path "$RUNS/atlas_index" \
  --train_retriever --query_side_retriever_training --freeze_retriever_steps $((STEPS - 200)) \
  --lr_retriever 1e-5 --gold_score_mode pdist --temperature_gold 0.1 --temperature_score 0.1
EM=$(python evaluate.py "${COMMON[@]}" "${RETRIEVER[@]}" --name atlas_eval --write_results \
  --model_path "$RUNS/atlas/checkpoint/latest" --load_index_path "$RUNS/atlas_index" \
  --eval_data "$DATA/dev.jsonl" | metric exact_match)
RECALL=$(python evaluate.py --task qa --retrieve_only --checkpoint_dir "$RUNS" --name atlas_retrieval \
  --retriever_model_path "$DIR/models/retriever" --model_path "$RUNS/atlas/checkpoint/latest" \
  --load_index_path "$RUNS/atlas_index" --n_context 5 --eval_data "$DATA/dev.jsonl" | metric gold_recall@5)
echo "demo: closed-book EM $CB | atlas EM $EM | recall@5 $RECALL"

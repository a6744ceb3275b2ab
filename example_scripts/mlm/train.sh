#!/bin/bash
#SBATCH --cpus-per-task=10
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --time=72:00:00
#SBATCH --job-name=mlm
#SBATCH --output=run_dir/%A.out
#SBATCH --error=run_dir/%A.err
#SBATCH --signal=USR1@140
#SBATCH --open-mode=append
#SBATCH --mem=480GB
# Site-specific in the original (FAIR cluster); enable with your cluster's values:
##SBATCH --partition=learnlab
##SBATCH --constraint=volta32gb

# Atlas-style MLM pretraining (T5 span corruption) on Wikipedia 2018 from T5 + Contriever (--model_path none).
# The script first downloads the corpus and shuffles it into train/valid/test files (skipped when they exist).
# Note how the training data is the data to train on AND the corpus to retrieve from: the task filters out the
# passage being trained on (same id) from the retrieved ones.
# Run:  bash example_scripts/mlm/train.sh                            (torchrun, NGPU=8 processes here)
#       mkdir -p run_dir && sbatch example_scripts/mlm/train.sh
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
[[ -f "$ROOT/train.py" ]] || ROOT=${SLURM_SUBMIT_DIR:-$PWD}  # sbatch runs a copy of the script from a spool dir
source "$ROOT/example_scripts/launcher.sh"  # LAUNCH (srun or torchrun), JOB_ID, port; cd to the repository root

size=${SIZE:-xl}
DATA_DIR=${DATA_DIR:-./atlas_data}

# Prepare train/dev/test data from the corpus, once (with multi-node torchrun, run it on one node first):
TEXTS="${DATA_DIR}/corpora/wiki/enwiki-dec2018/text-list-100-sec.jsonl"
INFOBOXES="${DATA_DIR}/corpora/wiki/enwiki-dec2018/infobox.jsonl"
if [[ ! -f "${TEXTS}.shuf.train" || ! -f "${INFOBOXES}.shuf.train" ]]; then
    python preprocessing/download_corpus.py --corpus corpora/wiki/enwiki-dec2018 --output_directory ${DATA_DIR}
    for FILE in "${TEXTS}" "${INFOBOXES}"; do
        shuf "${FILE}" > "${FILE}.shuf"
        head -n 2000 "${FILE}.shuf" | head -n 1000 > "${FILE}.shuf.test"
        head -n 2000 "${FILE}.shuf" | tail -n 1000 > "${FILE}.shuf.valid"
        tail -n +2001 "${FILE}.shuf" > "${FILE}.shuf.train"  # the original's +2000 put line 2000 in valid and train
    done
fi

TRAIN_FILES="${TEXTS}.shuf.train ${INFOBOXES}.shuf.train"
EVAL_FILES="${TEXTS}.shuf.valid ${INFOBOXES}.shuf.valid ${TEXTS}.shuf.test ${INFOBOXES}.shuf.test"
SAVE_DIR=${DATA_DIR}/experiments/
EXPERIMENT_NAME=${JOB_ID}-${size}-wiki-mlm-pretrain
PRECISION="fp32" # "bf16"

"${LAUNCH[@]}" train.py \
    --retrieve_with_rerank --n_to_rerank_with_retrieve_with_rerank 100 \
    --train_retriever --gold_score_mode "pdist" \
    --use_gradient_checkpoint_reader --use_gradient_checkpoint_retriever \
    --shard_grads --shard_optim \
    --precision ${PRECISION} \
    --temperature_gold 0.01 --temperature_score 0.01 \
    --refresh_index 1000 \
    --reader_model_type google/t5-${size}-lm-adapt \
    --passages ${TRAIN_FILES} \
    --target_maxlength 64 \
    --dropout 0.1 \
    --lr 1e-4 --lr_retriever 1e-5 \
    --scheduler linear \
    --weight_decay 0.01 \
    --text_maxlength 384 \
    --model_path none \
    --train_data ${TRAIN_FILES} --eval_data ${EVAL_FILES} \
    --per_gpu_batch_size 2 \
    --n_context 20 --retriever_n_context 20 \
    --name ${EXPERIMENT_NAME} \
    --checkpoint_dir ${SAVE_DIR} \
    --save_freq 5000 --eval_freq 1000 --log_freq 100 \
    --total_steps 10000 \
    --warmup_steps 1000 \
    --main_port $port \
    --min_words_per_lm_instance 10 \
    --task "mlm" \
    --mlm_noise_density 0.15 \
    --mlm_mean_noise_span_length 3

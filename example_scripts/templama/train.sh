#!/bin/bash
#SBATCH --cpus-per-task=10
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --time=8:00:00
#SBATCH --job-name=templama
#SBATCH --output=run_dir/%A.out
#SBATCH --error=run_dir/%A.err
#SBATCH --signal=USR1@140
#SBATCH --open-mode=append
# Site-specific in the original (FAIR cluster); enable with your cluster's values:
##SBATCH --partition=learnlab
##SBATCH --constraint=volta32gb

# TempLAMA: finetune pretrained Atlas-xl on the YEAR (2017 or 2020) cloze questions, retrieving from the Wikipedia
# dump of Dec YEAR (the index is built from the passages at startup), and evaluate on that year's valid and test sets.
# --qa_prompt_format "{question}" switches off the "question: ... answer:" prompt used for NQ and TriviaQA.
# Prepare once (DATA_DIR defaults to ./atlas_data):
#   python preprocessing/prepare_templama.py --output_directory ${DATA_DIR}
#   python preprocessing/download_corpus.py --corpus corpora/wiki/enwiki-dec${YEAR} --output_directory ${DATA_DIR}
#   python preprocessing/download_model.py --model models/atlas/xl --output_directory ${DATA_DIR}
# Run:  bash example_scripts/templama/train.sh [YEAR]               (torchrun, NGPU=8 processes here; YEAR=2017)
#       mkdir -p run_dir && sbatch example_scripts/templama/train.sh [YEAR]
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
[[ -f "$ROOT/train.py" ]] || ROOT=${SLURM_SUBMIT_DIR:-$PWD}  # sbatch runs a copy of the script from a spool dir
source "$ROOT/example_scripts/launcher.sh"  # LAUNCH (srun or torchrun), JOB_ID, port; cd to the repository root

size=${SIZE:-xl}
DATA_DIR=${DATA_DIR:-./atlas_data}
YEAR=${1:-"2017"}

TRAIN_FILE="${DATA_DIR}/data/templama_data/temp_lama.train.${YEAR}.jsonl"
EVAL_FILES="${DATA_DIR}/data/templama_data/temp_lama.valid.${YEAR}.jsonl ${DATA_DIR}/data/templama_data/temp_lama.test.${YEAR}.jsonl"
PRETRAINED_MODEL=${DATA_DIR}/models/atlas/${size}
PASSAGES="${DATA_DIR}/corpora/wiki/enwiki-dec${YEAR}/text-list-100-sec.jsonl ${DATA_DIR}/corpora/wiki/enwiki-dec${YEAR}/infobox.jsonl"
SAVE_DIR=${DATA_DIR}/experiments/
EXPERIMENT_NAME=${JOB_ID}-${size}-templama-${YEAR}
PRECISION="fp32" # "bf16"

"${LAUNCH[@]}" train.py \
    --shuffle \
    --train_retriever --query_side_retriever_training \
    --gold_score_mode ppmean \
    --use_gradient_checkpoint_reader \
    --use_gradient_checkpoint_retriever \
    --precision ${PRECISION} \
    --shard_optim --shard_grads \
    --temperature_gold 0.01 --temperature_score 0.01 \
    --refresh_index -1 \
    --target_maxlength 16 \
    --reader_model_type google/t5-${size}-lm-adapt \
    --dropout 0.1 \
    --lr 4e-5 --lr_retriever 4e-5 \
    --scheduler linear \
    --weight_decay 0.01 \
    --text_maxlength 512 \
    --model_path ${PRETRAINED_MODEL} \
    --train_data ${TRAIN_FILE} \
    --eval_data ${EVAL_FILES} \
    --per_gpu_batch_size 1 \
    --n_context 20 --retriever_n_context 20 \
    --name ${EXPERIMENT_NAME} \
    --checkpoint_dir ${SAVE_DIR} \
    --eval_freq 20 \
    --log_freq 4 \
    --total_steps 100 \
    --warmup_steps 20 \
    --save_freq 100 \
    --main_port $port \
    --write_results \
    --task qa \
    --index_mode flat \
    --passages ${PASSAGES} \
    --qa_prompt_format "{question}"

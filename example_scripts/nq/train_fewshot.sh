#!/bin/bash
#SBATCH --cpus-per-task=10
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --time=8:00:00
#SBATCH --job-name=nq
#SBATCH --output=run_dir/%A.out
#SBATCH --error=run_dir/%A.err
#SBATCH --signal=USR1@140
#SBATCH --open-mode=append
#SBATCH --mem=480GB
# Site-specific in the original (FAIR cluster); enable with your cluster's values:
##SBATCH --partition=devlab
##SBATCH --constraint=volta32gb

# NQ 64-shot: finetune pretrained Atlas-large for 30 steps (reader + query-side retriever finetuning, so the pre-built
# wiki-dec2018 index stays valid), then evaluate on NQ dev and test. The original ran on 4 nodes x 8 GPUs (batch
# 2 x 32 = 64 = the whole training set per step); with fewer GPUs the batch is smaller.
# Prepare once (DATA_DIR defaults to ./atlas_data):
#   python preprocessing/prepare_qa.py --output_directory ${DATA_DIR}/data
#   python preprocessing/download_model.py --model models/atlas/large --output_directory ${DATA_DIR}
#   python preprocessing/download_index.py --index indices/atlas/wiki/large --output_directory ${DATA_DIR} --convert
# Run:  bash example_scripts/nq/train_fewshot.sh                     (torchrun, NGPU=8 processes here)
#       mkdir -p run_dir && sbatch example_scripts/nq/train_fewshot.sh
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
[[ -f "$ROOT/train.py" ]] || ROOT=${SLURM_SUBMIT_DIR:-$PWD}  # sbatch runs a copy of the script from a spool dir
source "$ROOT/example_scripts/launcher.sh"  # LAUNCH (srun or torchrun), JOB_ID, port; cd to the repository root

size=${SIZE:-large}
DATA_DIR=${DATA_DIR:-./atlas_data}

TRAIN_FILE="${DATA_DIR}/data/nq_data/train.64-shot.jsonl"
EVAL_FILES="${DATA_DIR}/data/nq_data/dev.jsonl ${DATA_DIR}/data/nq_data/test.jsonl"
PRETRAINED_MODEL=${DATA_DIR}/models/atlas/${size}
PRETRAINED_INDEX=${DATA_DIR}/indices/atlas/wiki/${size}-converted  # made by download_index.py --convert
SAVE_DIR=${DATA_DIR}/experiments/
EXPERIMENT_NAME=${JOB_ID}-${size}-nq-64-shot
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
    --per_gpu_batch_size 2 \
    --n_context 40 --retriever_n_context 40 \
    --name ${EXPERIMENT_NAME} \
    --checkpoint_dir ${SAVE_DIR} \
    --eval_freq 30 \
    --log_freq 4 \
    --total_steps 30 \
    --warmup_steps 5 \
    --save_freq 30 \
    --main_port $port \
    --write_results \
    --task qa \
    --index_mode flat \
    --load_index_path ${PRETRAINED_INDEX}

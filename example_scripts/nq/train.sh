#!/bin/bash
#SBATCH --cpus-per-task=10
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --time=72:00:00
#SBATCH --job-name=nq
#SBATCH --output=run_dir/%A.out
#SBATCH --error=run_dir/%A.err
#SBATCH --signal=USR1@140
#SBATCH --open-mode=append
#SBATCH --mem=480GB
# Site-specific in the original (FAIR cluster); enable with your cluster's values:
##SBATCH --partition=learnlab
##SBATCH --constraint=volta32gb

# Full NQ finetuning of pretrained Atlas-xl (whole retriever trained; the index is refreshed every 500 steps for the
# first 1000 steps, then every 2000), evaluating on NQ dev and test every 500 steps. Original: 8 nodes x 8 GPUs.
# Prepare once (DATA_DIR defaults to ./atlas_data):
#   python preprocessing/prepare_qa.py --output_directory ${DATA_DIR}/data
#   python preprocessing/download_model.py --model models/atlas/xl --output_directory ${DATA_DIR}
#   python preprocessing/download_index.py --index indices/atlas/wiki/xl --output_directory ${DATA_DIR} --convert
# Run:  bash example_scripts/nq/train.sh                             (torchrun, NGPU=8 processes here)
#       mkdir -p run_dir && sbatch example_scripts/nq/train.sh
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
[[ -f "$ROOT/train.py" ]] || ROOT=${SLURM_SUBMIT_DIR:-$PWD}  # sbatch runs a copy of the script from a spool dir
source "$ROOT/example_scripts/launcher.sh"  # LAUNCH (srun or torchrun), JOB_ID, port; cd to the repository root

size=${SIZE:-xl}
DATA_DIR=${DATA_DIR:-./atlas_data}

TRAIN_FILE="${DATA_DIR}/data/nq_data/train.jsonl"
EVAL_FILES="${DATA_DIR}/data/nq_data/dev.jsonl ${DATA_DIR}/data/nq_data/test.jsonl"
PRETRAINED_MODEL=${DATA_DIR}/models/atlas/${size}
PRETRAINED_INDEX=${DATA_DIR}/indices/atlas/wiki/${size}-converted  # made by download_index.py --convert
SAVE_DIR=${DATA_DIR}/experiments/
EXPERIMENT_NAME=${JOB_ID}-${size}-nq
PRECISION="fp32" # "bf16"
if [[ "$size" == "xxl" ]] || [[ "$size" == "xl" ]] ; then
    TOTAL_STEPS=5000
else
    TOTAL_STEPS=10000
fi

"${LAUNCH[@]}" train.py \
    --shuffle \
    --train_retriever --gold_score_mode ppmean \
    --use_gradient_checkpoint_reader \
    --use_gradient_checkpoint_retriever \
    --precision ${PRECISION} \
    --shard_optim --shard_grads \
    --temperature_gold 0.01 --temperature_score 0.01 \
    --refresh_index 0-1000:500,1000-10000:2000 \
    --target_maxlength 16 \
    --reader_model_type google/t5-${size}-lm-adapt \
    --dropout 0.1 \
    --lr 4e-5 --lr_retriever 4e-5 \
    --scheduler cosine \
    --weight_decay 0.01 \
    --text_maxlength 512 \
    --model_path ${PRETRAINED_MODEL} \
    --train_data ${TRAIN_FILE} \
    --eval_data ${EVAL_FILES} \
    --per_gpu_batch_size 1 \
    --n_context 40 --retriever_n_context 40 \
    --name ${EXPERIMENT_NAME} \
    --checkpoint_dir ${SAVE_DIR} \
    --eval_freq 500 \
    --log_freq 50 \
    --total_steps ${TOTAL_STEPS} \
    --warmup_steps 100 \
    --save_freq 5000 \
    --main_port $port \
    --write_results \
    --task qa \
    --index_mode flat \
    --load_index_path ${PRETRAINED_INDEX}

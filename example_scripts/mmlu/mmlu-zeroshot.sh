#!/bin/bash
#SBATCH --cpus-per-task=10
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --time=8:00:00
#SBATCH --job-name=mmlu
#SBATCH --output=run_dir/%A.out
#SBATCH --error=run_dir/%A.err
#SBATCH --signal=USR1@140
#SBATCH --open-mode=append
# Site-specific in the original (FAIR cluster); enable with your cluster's values:
##SBATCH --partition=learnlab

# MMLU zero-shot: evaluate pretrained Atlas-xl, without finetuning, on the combined MMLU valid and test sets, with
# cyclic answer-order permutations for debiasing. See README_MMLU.md for scoring.
# Prepare once (DATA_DIR defaults to ./atlas_data):
#   python preprocessing/prepare_mmlu.py --output_directory ${DATA_DIR}
#   python preprocessing/download_model.py --model models/atlas/xl --output_directory ${DATA_DIR}
#   python preprocessing/download_index.py --index indices/atlas/wiki/xl --output_directory ${DATA_DIR} --convert
# Run:  bash example_scripts/mmlu/mmlu-zeroshot.sh                   (torchrun, NGPU=8 processes here)
#       mkdir -p run_dir && sbatch example_scripts/mmlu/mmlu-zeroshot.sh
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
[[ -f "$ROOT/train.py" ]] || ROOT=${SLURM_SUBMIT_DIR:-$PWD}  # sbatch runs a copy of the script from a spool dir
source "$ROOT/example_scripts/launcher.sh"  # LAUNCH (srun or torchrun), JOB_ID, port; cd to the repository root

size=${SIZE:-xl}
DATA_DIR=${DATA_DIR:-./atlas_data}

EVAL_FILES="${DATA_DIR}/data/mmlu_data/5-shot-multitask/combined_valid.jsonl ${DATA_DIR}/data/mmlu_data/5-shot-multitask/combined_test.jsonl"
PRETRAINED_MODEL=${DATA_DIR}/models/atlas/${size}
PRETRAINED_INDEX=${DATA_DIR}/indices/atlas/wiki/${size}-converted  # made by download_index.py --convert
SAVE_DIR=${DATA_DIR}/experiments/
EXPERIMENT_NAME=${JOB_ID}-${size}-mmlu-zeroshot
PRECISION="fp32" # "bf16"

"${LAUNCH[@]}" evaluate.py \
    --precision ${PRECISION} \
    --target_maxlength 16 \
    --reader_model_type google/t5-${size}-lm-adapt \
    --text_maxlength 512 \
    --model_path ${PRETRAINED_MODEL} \
    --eval_data ${EVAL_FILES} \
    --per_gpu_batch_size 1 \
    --n_context 30 --retriever_n_context 30 \
    --name ${EXPERIMENT_NAME} \
    --checkpoint_dir ${SAVE_DIR} \
    --main_port $port \
    --write_results \
    --task multiple_choice \
    --multiple_choice_train_permutations all \
    --multiple_choice_eval_permutations cyclic \
    --index_mode flat \
    --load_index_path ${PRETRAINED_INDEX}

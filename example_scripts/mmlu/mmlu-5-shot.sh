#!/bin/bash
#SBATCH --cpus-per-task=10
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --time=8:00:00
#SBATCH --job-name=mmlu
#SBATCH --output=run_dir/%A_%a.out
#SBATCH --error=run_dir/%A_%a.err
#SBATCH --signal=USR1@140
#SBATCH --open-mode=append
#SBATCH --array=0-56%4
# Site-specific in the original (FAIR cluster); enable with your cluster's values:
##SBATCH --partition=learnlab
##SBATCH --constraint=volta32gb

# MMLU 5-shot: one finetuning run per domain (57 domains: a SLURM job array, 4 at a time), 16 steps on the domain's
# 5 examples, evaluating on its valid and test sets every 4 steps. See README_MMLU.md for scoring.
# Prepare once (DATA_DIR defaults to ./atlas_data):
#   python preprocessing/prepare_mmlu.py --output_directory ${DATA_DIR}
#   python preprocessing/download_model.py --model models/atlas/xl --output_directory ${DATA_DIR}
#   python preprocessing/download_index.py --index indices/atlas/wiki/xl --output_directory ${DATA_DIR} --convert
# Run:  bash example_scripts/mmlu/mmlu-5-shot.sh [DOMAIN]            (torchrun, one domain; default abstract_algebra)
#       mkdir -p run_dir && sbatch example_scripts/mmlu/mmlu-5-shot.sh   (all 57 domains)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
[[ -f "$ROOT/train.py" ]] || ROOT=${SLURM_SUBMIT_DIR:-$PWD}  # sbatch runs a copy of the script from a spool dir
source "$ROOT/example_scripts/launcher.sh"  # LAUNCH (srun or torchrun), JOB_ID, port; cd to the repository root

size=${SIZE:-xl}
DATA_DIR=${DATA_DIR:-./atlas_data}

DOMAINS=(
    "abstract_algebra"
    "anatomy"
    "astronomy"
    "business_ethics"
    "clinical_knowledge"
    "college_biology"
    "college_chemistry"
    "college_computer_science"
    "college_mathematics"
    "college_medicine"
    "college_physics"
    "computer_security"
    "conceptual_physics"
    "econometrics"
    "electrical_engineering"
    "elementary_mathematics"
    "formal_logic"
    "global_facts"
    "high_school_biology"
    "high_school_chemistry"
    "high_school_computer_science"
    "high_school_european_history"
    "high_school_geography"
    "high_school_government_and_politics"
    "high_school_macroeconomics"
    "high_school_mathematics"
    "high_school_microeconomics"
    "high_school_physics"
    "high_school_psychology"
    "high_school_statistics"
    "high_school_us_history"
    "high_school_world_history"
    "human_aging"
    "human_sexuality"
    "international_law"
    "jurisprudence"
    "logical_fallacies"
    "machine_learning"
    "management"
    "marketing"
    "medical_genetics"
    "miscellaneous"
    "moral_disputes"
    "moral_scenarios"
    "nutrition"
    "philosophy"
    "prehistory"
    "professional_accounting"
    "professional_law"
    "professional_medicine"
    "professional_psychology"
    "public_relations"
    "security_studies"
    "sociology"
    "us_foreign_policy"
    "virology"
    "world_religions"
)
DOMAIN=${1:-${DOMAINS[${SLURM_ARRAY_TASK_ID:-0}]}}
TRAIN_FILE="${DATA_DIR}/data/mmlu_data/5-shot/individual_train/${DOMAIN}.5-shot-train.jsonl"
# (the original read the test file from individual_valid/, where it does not exist)
EVAL_FILES="${DATA_DIR}/data/mmlu_data/5-shot/individual_valid/${DOMAIN}.val.jsonl ${DATA_DIR}/data/mmlu_data/5-shot/individual_test/${DOMAIN}.test.jsonl"
PRETRAINED_MODEL=${DATA_DIR}/models/atlas/${size}
PRETRAINED_INDEX=${DATA_DIR}/indices/atlas/wiki/${size}-converted  # made by download_index.py --convert
SAVE_DIR=${DATA_DIR}/experiments/${JOB_ID}-${size}-mmlu-5-shot/
EXPERIMENT_NAME=$DOMAIN
PRECISION="fp32" # "bf16"

"${LAUNCH[@]}" train.py \
    --shuffle \
    --train_retriever --gold_score_mode ppmean \
    --use_gradient_checkpoint_reader \
    --use_gradient_checkpoint_retriever \
    --precision ${PRECISION} \
    --shard_optim --shard_grads \
    --temperature_gold 0.1 --temperature_score 0.1 \
    --refresh_index -1 \
    --target_maxlength 16 \
    --reader_model_type google/t5-${size}-lm-adapt \
    --dropout 0.1 \
    --lr 5e-5 --lr_retriever 1e-5 \
    --scheduler linear \
    --weight_decay 0.01 \
    --text_maxlength 512 \
    --model_path ${PRETRAINED_MODEL} \
    --train_data ${TRAIN_FILE} \
    --eval_data ${EVAL_FILES} \
    --per_gpu_batch_size 1 \
    --n_context 30 --retriever_n_context 30 \
    --name ${EXPERIMENT_NAME} \
    --checkpoint_dir ${SAVE_DIR} \
    --eval_freq 4 \
    --log_freq 4 \
    --total_steps 16 \
    --warmup_steps 4 \
    --save_freq 10000000000 \
    --main_port $port \
    --write_results \
    --task multiple_choice \
    --multiple_choice_train_permutations all \
    --multiple_choice_eval_permutations cyclic \
    --index_mode flat \
    --query_side_retriever_training \
    --load_index_path ${PRETRAINED_INDEX}

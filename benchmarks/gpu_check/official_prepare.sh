#!/usr/bin/env bash
# official_prepare.sh: the official Quiet-STaR code and its old transformers, kept out of the project.
#   vendor GIT_DIR        copy modeling_mistral.py and configuration_mistral.py from a fetched
#                         github.com/ezelikman/quiet-star (a git dir: read with git show, nothing checked out)
#                         into gpu_vendor/official/ (git-ignored; it travels to the GPU as a carried path)
#   wheels [DIR] [PYVER]  pip download transformers 4.37.2, tokenizers 0.15.2, huggingface_hub 0.20.3 (no deps)
#                         for CPython PYVER (default 312, the GPU image's) into DIR (default gpu_vendor/wheels)
#   install SITE [DIR]    pip install those wheels into the folder SITE (--target: the interpreter's own
#                         transformers stays untouched) and drop the two official files over its Mistral model;
#                         then run the official side with PYTHONPATH=SITE (benchmarks/official_step.py)
# On the GPU only `install` runs (no network there); `vendor` and `wheels` run on a networked machine first.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd); VENDOR=$ROOT/gpu_vendor; PY=${PY:-python3}
WHEELS=(transformers==4.37.2 tokenizers==0.15.2 huggingface_hub==0.20.3)
case ${1:-} in
  vendor)
    git_dir=${2:?usage: official_prepare.sh vendor GIT_DIR (from the fetch of github:ezelikman/quiet-star)}
    mkdir -p "$VENDOR/official"
    for f in modeling_mistral.py configuration_mistral.py; do git --git-dir="$git_dir" show "HEAD:$f" >"$VENDOR/official/$f"; done
    git --git-dir="$git_dir" rev-parse HEAD >"$VENDOR/official/COMMIT"
    echo "official files of $(cat "$VENDOR/official/COMMIT") in $VENDOR/official" ;;
  wheels)
    dir=${2:-$VENDOR/wheels}; pyver=${3:-312}; mkdir -p "$dir"
    $PY -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version "$pyver" \
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$dir" "${WHEELS[@]}"
    du -ch "$dir"/*.whl ;;
  install)
    site=${2:?usage: official_prepare.sh install SITE [WHEEL_DIR]}; dir=${3:-$VENDOR/wheels}
    [[ -f $VENDOR/official/modeling_mistral.py ]] || { echo "no $VENDOR/official: run 'official_prepare.sh vendor GIT_DIR' first" >&2; exit 2; }
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$dir"/*.whl
    cp "$VENDOR/official/modeling_mistral.py" "$VENDOR/official/configuration_mistral.py" "$site/transformers/models/mistral/"
    echo "official install in $site: $(ls "$dir")" ;;
  *) sed -n '2,11p' "$0"; exit 2 ;;
esac

#!/usr/bin/env bash
# Run timm's own model test battery (tests/test_models.py of the installed timm version)
# on the CrossFormer variants: `python -m pytest -q test_models.py -k crossformer`.
#
# Needs network access: it downloads timm's source distribution from PyPI with pip, so it
# is not part of CI. Run it from the environment crossformer is installed in, e.g.
#   OMP_NUM_THREADS=2 scripts/timm_model_tests.sh              # all 8 variants (64 tests, several minutes)
#   scripts/timm_model_tests.sh -x -k 'crossformer and default_cfgs'
# Extra arguments go to pytest after `-k crossformer`; pytest keeps only the last -k, so a
# narrower -k must name crossformer itself. KEEP_TMP=1 keeps the temp folder, PYTHON picks the
# interpreter (default: python).
set -euo pipefail

python=${PYTHON:-python}
version=$("$python" -c 'import timm; print(timm.__version__)')
tmp=$(mktemp -d "${TMPDIR:-/tmp}/timm-tests.XXXXXX")
if [[ -z ${KEEP_TMP:-} ]]; then trap 'rm -rf "$tmp"' EXIT; else echo "temp folder: $tmp"; fi

"$python" -m pip download -q --no-deps --no-binary :all: "timm==$version" -d "$tmp"
# tests/ (its conftest.py and __init__.py too) and pyproject.toml, for the pytest markers
sdist=("$tmp"/timm-*.tar.gz)
tar -xzf "${sdist[0]}" -C "$tmp" --strip-components=1 \
    "timm-$version/tests" "timm-$version/pyproject.toml"

# Register the models with timm before test_models.py builds its parameter lists at import.
conftest="$tmp/tests/conftest.py"
{ echo 'import crossformer  # noqa: F401  (registers the CrossFormer models with timm)'; cat "$conftest"; } > "$conftest.new"
mv "$conftest.new" "$conftest"

cd "$tmp"  # rootdir and config: timm's pyproject.toml, not ours
echo "timm $version, torch $("$python" -c 'import torch; print(torch.__version__)'), tests in $tmp/tests"
"$python" -m pytest -q -p no:cacheprovider tests/test_models.py -k crossformer "$@"

#!/bin/sh
# The artifact's build and install steps, the same for the Dockerfile and for
# tests/integration/test_wheel.py (which runs them, then the installed command).
#
#   deploy/wheel.sh build SOURCE OUTDIR   the wheel of the checkout SOURCE, into OUTDIR
#                                         (needs `build` in $PYTHON; pure Python, no compiler)
#   deploy/wheel.sh install VENV WHEEL    a new virtualenv VENV with WHEEL and its pinned
#                                         dependencies, from binary wheels only
#
# $PYTHON (default python3) runs both. pip's own variables apply (PIP_INDEX_URL,
# PIP_FIND_LINKS, PIP_NO_INDEX, PIP_CACHE_DIR): the test installs offline from a wheelhouse.
set -eu
PYTHON=${PYTHON:-python3}
case "${1:-}" in
build)
    "$PYTHON" -m build --wheel --outdir "$3" "$2"
    ;;
install)
    "$PYTHON" -m venv "$2"
    "$2/bin/pip" install --quiet --disable-pip-version-check --only-binary=:all: "$3"
    ;;
*)
    echo "usage: $0 build SOURCE OUTDIR | install VENV WHEEL" >&2
    exit 2
    ;;
esac

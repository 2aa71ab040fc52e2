#!/usr/bin/env bash
# Optional: build MinkowskiEngine 0.5.4 CPU-only into .venv so the `minkowski` encoder backend and its tests run.
# ~4-6 minutes on 2 cores. `make test` runs it once (stamp .venv/.minkowski) so the backend's tests run in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV_BIN="$PWD/.venv/bin"
if "$VENV_BIN/python" -c "import MinkowskiEngine" 2>/dev/null; then echo "MinkowskiEngine already installed"; exit 0; fi
command -v apt-get >/dev/null && { apt-get update -qq && apt-get install -y -qq libopenblas-dev; }
work=$(mktemp -d)
cd "$work"
# `pip download` of this sdist runs a metadata step that needs torch; take the URL pip resolves instead.
# (pip itself then fails on that metadata step, so its exit status is ignored.)
url=$( ("$VENV_BIN/pip" download -vv --no-deps --no-binary :all: MinkowskiEngine==0.5.4 -d . 2>&1 || true) \
      | grep -m1 -o 'https://[^ ]*MinkowskiEngine-0.5.4.tar.gz' || true)
[ -n "$url" ] || { echo "could not resolve the MinkowskiEngine 0.5.4 sdist URL from the package index" >&2; exit 1; }
curl -sSLo me.tar.gz "$url"
tar xzf me.tar.gz && cd MinkowskiEngine-0.5.4
# Python 3.10+ moved Sequence to collections.abc.
sed -i 's/^from collections import Sequence, namedtuple$/from collections import namedtuple\nfrom collections.abc import Sequence/; s/^from collections import Sequence$/from collections.abc import Sequence/' \
    MinkowskiEngine/*.py MinkowskiEngine/utils/*.py
sed -i 's/th_map\.data<Dtype>()/th_map.data_ptr<Dtype>()/' src/quantization.cpp
PATH="$VENV_BIN:$PATH" MAX_JOBS=2 python setup.py install --cpu_only --blas=openblas
"$VENV_BIN/python" -c "import MinkowskiEngine as ME; print('MinkowskiEngine', ME.__version__)"

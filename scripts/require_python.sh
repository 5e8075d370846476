# Sourced by gpu_check.sh and gpu_wheels.sh: `require_python TAG` stops with one line and exit 2 unless $PYTHON
# runs as Python 3.10 or later (pyproject.toml's requires-python); else every later step fails as if a package
# were missing, or with the shell's "No such file or directory".
require_python() {
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
        local found version
        if command -v "$PYTHON" >/dev/null; then
            version=$("$PYTHON" --version 2>&1 | head -n 1) || true
            found="\`--version\` says ${version:-nothing}"
        else
            found="no such command"
        fi
        echo "$1: PYTHON=$PYTHON: $found; expected Python 3.10 or later (default python3; after make install," \
             "PYTHON=.venv/bin/python)" >&2
        exit 2
    fi
}

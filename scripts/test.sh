#!/usr/bin/env bash
# The project's test command (README "Run the tests"; .ci/run calls exactly this).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --data --test-tools
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
# Client-side checks of `lavit serve`: the official openai client (strict validation) and the
# web playground in headless chromium, both against the tiny fixture on 127.0.0.1.
cargo build --quiet --bin lavit
PY=.venv/bin/python; [ -x "$PY" ] || PY=.venv/tools/bin/python
"$PY" scripts/openai-check.py --lavit target/debug/lavit
"$PY" scripts/browser-check.py --lavit target/debug/lavit
# Data-parallel training through the real CLI under the venv's torchrun (2 ranks, Gloo).
LAVIT=target/debug/lavit bash scripts/ddp-smoke.sh
# The embedding examples run: mock stages, a user's own stage, the real fixture's models.
cargo run --quiet --example pipeline
cargo run --quiet --example custom_stage
cargo run --quiet --example pipeline -- configs/serve.toml ../shared/fixtures/tiny-lavit

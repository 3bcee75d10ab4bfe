#!/usr/bin/env bash
# The project's test command (README "Quick start"; .ci/run calls exactly this).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --data --test-tools
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# Tests, examples and benches build with the `testing` feature; lint the shipped build too.
cargo clippy -p lavit -p lavit-runtime --lib --bins -- -D warnings
cargo test --workspace
# `cargo test` built target/debug/lavit with the `testing` feature (the mock stages and fault
# injection the client-side checks below need): keep that binary before the plain build.
cp target/debug/lavit target/debug/lavit-testing
# A plain build has no test-only code: it refuses the mock stages, naming the key.
cargo build --quiet --bin lavit
if out=$(target/debug/lavit serve --config configs/serve-mock.toml --bind 127.0.0.1:0 2>&1); then
  echo "test.sh: a build without --features testing served the mock stages" >&2; exit 1
fi
grep -q 'pipeline.stages' <<<"$out" || { echo "test.sh: unexpected refusal: $out" >&2; exit 1; }
# Client-side checks of `lavit serve`: the official openai client (strict validation) and the
# web playground in headless chromium, both against the tiny fixture on 127.0.0.1.
PY=.venv/bin/python; [ -x "$PY" ] || PY=.venv/tools/bin/python
"$PY" scripts/openai-check.py --lavit target/debug/lavit-testing
"$PY" scripts/browser-check.py --lavit target/debug/lavit-testing
# Data-parallel training through the real CLI under the venv's torchrun (2 ranks, Gloo).
LAVIT=target/debug/lavit-testing bash scripts/ddp-smoke.sh
# The embedding examples run: mock stages, a user's own stage, the real fixture's models.
cargo run --quiet --example pipeline
cargo run --quiet --example custom_stage
cargo run --quiet --example pipeline -- configs/serve.toml ../shared/fixtures/tiny-lavit

#!/usr/bin/env bash
# The project's test command (README "Run the tests"; .ci/run calls exactly this).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --data
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
# The embedding examples run: mock stages, a user's own stage, the real fixture's models.
cargo run --quiet --example pipeline
cargo run --quiet --example custom_stage
cargo run --quiet --example pipeline -- configs/serve.toml ../shared/fixtures/tiny-lavit

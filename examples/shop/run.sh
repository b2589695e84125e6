#!/usr/bin/env bash
# The shop example, end to end: builds zhili and the four shop services, then runs shop-demo,
# which starts `zhili server --dev` and the services on free ports (data in a temporary folder),
# places orders through the gateway, kills the payment service mid-charge, and prints the final
# state of every order (exit status 1 if any is inconsistent). Options: --keep, --verbose, --dir D.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --quiet --locked -p zhili -p zhili-shop
exec target/debug/shop-demo "$@"

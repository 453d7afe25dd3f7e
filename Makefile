# The two commands of the README. Both install what they need first
# (scripts/setup.sh: ONNX Runtime from the pinned PyPI wheel, and for tests
# a Python venv with grpcio), so a fresh clone needs nothing by hand.

.PHONY: run test setup

# Set up, build, and serve the built-in CIFAR-10 model on 127.0.0.1:50051.
# Extra flags: make run ARGS="--model m.onnx --card m.card.json"
run:
	scripts/setup.sh
	cargo run --release -- serve $(ARGS)

# Set up and run the whole test suite. Without ../shared/data, tests that
# need it skip with one line each and a count at the end.
test:
	scripts/setup.sh --tests
	scripts/test.sh

setup:
	scripts/setup.sh --tests

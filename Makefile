# SPDX-License-Identifier: MIT
# Thin wrapper over CMake. Every target installs missing Debian packages
# first (scripts/deps.sh), so a fresh machine needs nothing else.
#
#   make run        build (release) and run the demo on built-in sample data
#   make test       ASan+UBSan build, every test through ctest
#   make test-tsan  ThreadSanitizer build, the pool and queue tests
#   make fuzz       clang libFuzzer build, each target FUZZ_TIME seconds
#   make bench      release build, benchmarks against peers -> docs/benchmarks.md
#   make install    install library, header, offpath.pc, the CMake package,
#                   the command, its man page and completion, and the Lua
#                   module under PREFIX (default /usr/local; DESTDIR works)
#   make format     apply .clang-format to every C file
#   make check      formatting and checksrc, as CI runs them

BUILD   ?= build
JOBS    ?= $(shell nproc 2>/dev/null || echo 2)
PREFIX  ?= /usr/local
CMAKE_FLAGS ?=
CTEST_FLAGS ?=
C_FILES  = $(shell git ls-files '*.c' '*.h' 2>/dev/null || find src include tests bench examples -name '*.[ch]')

.PHONY: all run test test-tsan fuzz bench install format check deps clean man

all: $(BUILD)/release/offpath

deps:
	@sh scripts/deps.sh build

$(BUILD)/release/Makefile: CMakeLists.txt
	cmake -S . -B $(BUILD)/release -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX=$(PREFIX) $(CMAKE_FLAGS)

$(BUILD)/release/offpath: deps $(BUILD)/release/Makefile FORCE
	cmake --build $(BUILD)/release -j $(JOBS)

run: $(BUILD)/release/offpath
	sh examples/demo/run.sh $(BUILD)/release/offpath

test:
	@sh scripts/deps.sh test
	cmake -S . -B $(BUILD)/asan -DCMAKE_BUILD_TYPE=Debug -DOP_SANITIZE="address;undefined" -DOP_WERROR=$${CI:+ON} $(CMAKE_FLAGS)
	cmake --build $(BUILD)/asan -j $(JOBS)
	cd $(BUILD)/asan && ctest --output-on-failure -j $(JOBS) $(CTEST_FLAGS)

test-tsan:
	@sh scripts/deps.sh test
	cmake -S . -B $(BUILD)/tsan -DCMAKE_BUILD_TYPE=Debug -DOP_SANITIZE=thread $(CMAKE_FLAGS)
	cmake --build $(BUILD)/tsan -j $(JOBS)
	cd $(BUILD)/tsan && ctest --output-on-failure -L tsan -j $(JOBS) $(CTEST_FLAGS)

FUZZ_TIME ?= 30
fuzz:
	@sh scripts/deps.sh test
	cmake -S . -B $(BUILD)/fuzz -DCMAKE_C_COMPILER=clang -DCMAKE_BUILD_TYPE=Debug -DOP_FUZZ=ON -DOP_SANITIZE="address;undefined" -DOP_BUILD_TESTS=OFF -DOP_BUILD_BENCH=OFF -DOP_WERROR=$${CI:+ON} $(CMAKE_FLAGS)
	cmake --build $(BUILD)/fuzz -j $(JOBS)
	sh tests/fuzz/run.sh $(BUILD)/fuzz $(FUZZ_TIME)

bench:
	@sh scripts/deps.sh bench
	cmake -S . -B $(BUILD)/release -DCMAKE_BUILD_TYPE=Release $(CMAKE_FLAGS)
	cmake --build $(BUILD)/release -j $(JOBS)
	sh bench/run.sh $(BUILD)/release

# --prefix: the build directory keeps the prefix it was configured with;
# PREFIX given now must win.
install: $(BUILD)/release/offpath
	cmake --install $(BUILD)/release --prefix "$(PREFIX)"

format:
	clang-format -i $(C_FILES)

check:
	@sh scripts/deps.sh check
	clang-format --dry-run --Werror $(C_FILES)
	sh scripts/checksrc $(C_FILES)

clean:
	rm -rf $(BUILD)

FORCE:

# The man page is generated from docs/offpath.1.scd and committed, so a
# build needs no scdoc; tests/sh/man.sh checks that the two agree.
man:
	scdoc < docs/offpath.1.scd > docs/offpath.1

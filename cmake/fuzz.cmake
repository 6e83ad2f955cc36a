# SPDX-License-Identifier: MIT
# Fuzz targets: every tests/fuzz/fuzz-<name>.c defines LLVMFuzzerTestOneInput.
#
# With OP_FUZZ=ON (clang only) each becomes a libFuzzer executable,
# fuzz-<name>, and the whole build is instrumented for coverage; `make fuzz`
# builds them and runs each for a bounded time from its seed corpus
# (tests/fuzz/run.sh).
#
# Without it (the normal test build), each target is linked with
# tests/fuzz/replay.c instead and registered as the ctest fuzz/<name>, which
# runs every input in tests/fuzz/corpus/<name>/ once: the seeds and every
# input that once made a target fail stay regression tests under the
# sanitizers of that build.
if(OP_FUZZ)
  if(NOT CMAKE_C_COMPILER_ID MATCHES "Clang")
    message(FATAL_ERROR "OP_FUZZ needs clang (cmake -DCMAKE_C_COMPILER=clang)")
  endif()
endif()

# The sources a target needs besides the library, by target name.
set(OP_FUZZ_EXTRA_records ${PROJECT_SOURCE_DIR}/src/host/lines.c
                          ${PROJECT_SOURCE_DIR}/src/host/json.c)
set(OP_FUZZ_LIBS_records PkgConfig::JANSSON)

file(GLOB _fuzz_targets CONFIGURE_DEPENDS
     ${PROJECT_SOURCE_DIR}/tests/fuzz/fuzz-*.c)
foreach(f ${_fuzz_targets})
  get_filename_component(name ${f} NAME_WE)
  string(REGEX REPLACE "^fuzz-" "" area ${name})
  if(OP_FUZZ)
    add_executable(${name} ${f} ${OP_FUZZ_EXTRA_${area}})
    target_compile_options(${name} PRIVATE -fsanitize=fuzzer)
    target_link_options(${name} PRIVATE -fsanitize=fuzzer)
  else()
    add_executable(${name} ${f} ${OP_FUZZ_EXTRA_${area}}
                   ${PROJECT_SOURCE_DIR}/tests/fuzz/replay.c)
    add_test(NAME fuzz/${area}
             COMMAND ${name} ${PROJECT_SOURCE_DIR}/tests/fuzz/corpus/${area}
             WORKING_DIRECTORY ${PROJECT_SOURCE_DIR})
    op_apply_labels(fuzz/${area} "fuzz")
  endif()
  target_compile_options(${name} PRIVATE ${OP_WARNINGS})
  target_include_directories(${name} PRIVATE ${PROJECT_SOURCE_DIR}/src
                             ${PROJECT_SOURCE_DIR}/src/host)
  target_link_libraries(${name} PRIVATE offpath_static ${OP_FUZZ_LIBS_${area}})
endforeach()

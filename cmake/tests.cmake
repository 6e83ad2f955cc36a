# SPDX-License-Identifier: MIT
# Test registration. Every tests/c/test-<area>.c is one executable and one
# ctest entry named c/<area>; every tests/lua/<area>.lua (names starting with
# an underscore are helpers) is run by the offpath host as lua/<area>.
# Labels come from a line "LABELS: a b" in the first lines of the file:
# "tsan" puts a test in `make test-tsan`, a fixture name such as "redis"
# makes ctest start that server first (tests/fixtures/<name>.sh).

# ENVIRONMENT splits on ';': the sanitizer list goes with commas.
string(REPLACE ";" "," _op_san_env "${OP_SANITIZE}")
set(OP_TEST_ENV
    "ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:strict_string_checks=1"
    "UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1"
    "TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1"
    "OFFPATH_SOURCE_DIR=${PROJECT_SOURCE_DIR}"
    "OFFPATH_BINARY_DIR=${PROJECT_BINARY_DIR}"
    "OFFPATH=$<TARGET_FILE:offpath>"
    "OFFPATH_SANITIZE=${_op_san_env}"
    "OFFPATH_FIXTURES=${PROJECT_BINARY_DIR}/fixtures"
    "LUA_PATH=${PROJECT_SOURCE_DIR}/tests/lua/?.lua;${PROJECT_SOURCE_DIR}/lua/?.lua;;")

# Servers: tests/fixtures/<name>.sh start|stop DIR starts the real server on
# a free loopback port and writes DIR/<name>.env (shell assignments such as
# REDIS_PORT=...) for the tests to read.
set(OP_FIXTURES redis postgres nginx)
foreach(fx ${OP_FIXTURES})
  if(NOT EXISTS ${PROJECT_SOURCE_DIR}/tests/fixtures/${fx}.sh)
    continue()
  endif()
  add_test(NAME fixture/${fx}/start
           COMMAND sh ${PROJECT_SOURCE_DIR}/tests/fixtures/${fx}.sh start
                      ${PROJECT_BINARY_DIR}/fixtures)
  add_test(NAME fixture/${fx}/stop
           COMMAND sh ${PROJECT_SOURCE_DIR}/tests/fixtures/${fx}.sh stop
                      ${PROJECT_BINARY_DIR}/fixtures)
  set_tests_properties(fixture/${fx}/start PROPERTIES FIXTURES_SETUP ${fx}
                       LABELS "fixture" TIMEOUT 120)
  set_tests_properties(fixture/${fx}/stop PROPERTIES FIXTURES_CLEANUP ${fx}
                       LABELS "fixture" TIMEOUT 60)
endforeach()

# Read "LABELS: ..." from the head of a test file into OUT.
function(op_test_labels file out)
  file(STRINGS ${file} lines LIMIT_COUNT 12 REGEX "LABELS:")
  set(labels "")
  if(lines)
    list(GET lines 0 line)
    string(REGEX REPLACE ".*LABELS:[ ]*([a-z0-9 ]*).*" "\\1" line "${line}")
    string(STRIP "${line}" line)
    string(REPLACE " " ";" labels "${line}")
  endif()
  set(${out} ${labels} PARENT_SCOPE)
endfunction()

function(op_apply_labels test labels)
  set(fixtures "")
  foreach(l ${labels})
    if(l IN_LIST OP_FIXTURES)
      list(APPEND fixtures ${l})
    endif()
  endforeach()
  set_tests_properties(${test} PROPERTIES LABELS "${labels}"
                       ENVIRONMENT "${OP_TEST_ENV}" TIMEOUT 300)
  if(fixtures)
    set_tests_properties(${test} PROPERTIES FIXTURES_REQUIRED "${fixtures}")
  endif()
endfunction()

# op_add_c_test(<area>): builds tests/c/test-<area>.c into test-<area>.
function(op_add_c_test area)
  set(src ${PROJECT_SOURCE_DIR}/tests/c/test-${area}.c)
  add_executable(test-${area} ${src})
  target_compile_options(test-${area} PRIVATE ${OP_WARNINGS})
  target_include_directories(test-${area} PRIVATE
      ${PROJECT_SOURCE_DIR}/src ${PROJECT_SOURCE_DIR}/tests/c)
  target_link_libraries(test-${area} PRIVATE offpath_static)
  add_test(NAME c/${area} COMMAND test-${area}
           WORKING_DIRECTORY ${PROJECT_SOURCE_DIR})
  op_test_labels(${src} labels)
  op_apply_labels(c/${area} "${labels}")
endfunction()

# A C module for tests/lua/paths.lua, built like the ones Debian ships: no
# Lua linked in. It lands in <build>/cmod/opcmod.so.
add_library(op_test_cmod MODULE ${PROJECT_SOURCE_DIR}/tests/lua/fixtures/opcmod.c)
set_target_properties(op_test_cmod PROPERTIES OUTPUT_NAME opcmod PREFIX ""
    LIBRARY_OUTPUT_DIRECTORY ${PROJECT_BINARY_DIR}/cmod)
target_compile_options(op_test_cmod PRIVATE ${OP_WARNINGS})
target_include_directories(op_test_cmod PRIVATE ${LUA_INCLUDE_DIRS})

# op_add_lua_test(<area>): runs tests/lua/<area>.lua with the offpath host.
function(op_add_lua_test area)
  set(src ${PROJECT_SOURCE_DIR}/tests/lua/${area}.lua)
  add_test(NAME lua/${area}
           COMMAND offpath run ${src} --input /dev/null
           WORKING_DIRECTORY ${PROJECT_SOURCE_DIR})
  op_test_labels(${src} labels)
  op_apply_labels(lua/${area} "${labels}")
  # "TIMEOUT: seconds" near the top raises the limit of a long test.
  file(STRINGS ${src} tmo LIMIT_COUNT 12 REGEX "TIMEOUT: *[0-9]+")
  if(tmo)
    string(REGEX REPLACE ".*TIMEOUT: *([0-9]+).*" "\\1" tmo "${tmo}")
    set_tests_properties(lua/${area} PROPERTIES TIMEOUT ${tmo})
  endif()
endfunction()

file(GLOB _c_tests CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/tests/c/test-*.c)
foreach(f ${_c_tests})
  get_filename_component(name ${f} NAME_WE)
  string(REGEX REPLACE "^test-" "" area ${name})
  op_add_c_test(${area})
endforeach()

file(GLOB _lua_tests CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/tests/lua/*.lua)
foreach(f ${_lua_tests})
  get_filename_component(area ${f} NAME_WE)
  if(NOT area MATCHES "^_")
    op_add_lua_test(${area})
  endif()
endforeach()

# Shell-driven tests (host behaviour, examples): tests/sh/<name>.sh.
file(GLOB _sh_tests CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/tests/sh/*.sh)
foreach(f ${_sh_tests})
  get_filename_component(area ${f} NAME_WE)
  if(NOT area MATCHES "^_")
    add_test(NAME sh/${area} COMMAND sh ${f}
             WORKING_DIRECTORY ${PROJECT_SOURCE_DIR})
    op_test_labels(${f} labels)
    op_apply_labels(sh/${area} "${labels}")
  endif()
endforeach()

# test-oom fails C allocations too: the linker sends the malloc, calloc and
# realloc calls of liboffpath's objects through the test's wrappers.
if(TARGET test-oom)
  target_link_options(test-oom PRIVATE
      -Wl,--wrap=malloc,--wrap=calloc,--wrap=realloc)
endif()

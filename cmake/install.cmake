# SPDX-License-Identifier: MIT
# Install rules (included by the top CMakeLists.txt).
#
# Everything is installed relative to the prefix given at install time:
# `cmake --install BUILD --prefix DIR` (what `make install PREFIX=DIR`
# runs) puts the files, offpath.pc and the CMake package under DIR even
# when BUILD was configured for another prefix. offpath.pc is written at
# install time for the prefix actually used; the CMake package finds its
# files relative to itself.

include(CMakePackageConfigHelpers)
set(OP_LUA_CMOD_DIR "${CMAKE_INSTALL_LIBDIR}/lua/5.4" CACHE STRING
    "Where the Lua module goes, relative to the prefix")
set(OP_CMAKE_DIR "${CMAKE_INSTALL_LIBDIR}/cmake/offpath")

if(OP_INSTALL)
  install(TARGETS offpath_shared offpath_static EXPORT offpathTargets
      LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
      ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
      INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
  install(FILES ${PROJECT_SOURCE_DIR}/include/offpath.h
      DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
  install(FILES ${PROJECT_SOURCE_DIR}/LICENSE DESTINATION ${CMAKE_INSTALL_DOCDIR})

  # offpath.pc: made when installing, from CMAKE_INSTALL_PREFIX as the
  # install step sees it (--prefix wins over the configured prefix).
  set(_op_pc ${PROJECT_BINARY_DIR}/offpath.pc)
  install(CODE "
    set(OP_PC_LIBDIR_REL \"${CMAKE_INSTALL_LIBDIR}\")
    set(OP_PC_INCLUDEDIR_REL \"${CMAKE_INSTALL_INCLUDEDIR}\")
    set(PROJECT_VERSION \"${PROJECT_VERSION}\")
    set(OP_PC_PREFIX \"\${CMAKE_INSTALL_PREFIX}\")
    foreach(d LIBDIR INCLUDEDIR)
      set(v \"\${OP_PC_\${d}_REL}\")
      if(IS_ABSOLUTE \"\${v}\")
        set(OP_PC_\${d} \"\${v}\")
      else()
        set(OP_PC_\${d} \"\\\${prefix}/\${v}\")
      endif()
    endforeach()
    configure_file(\"${PROJECT_SOURCE_DIR}/offpath.pc.in\" \"${_op_pc}\" @ONLY)
  ")
  install(FILES ${_op_pc} DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)

  # The CMake package: offpath::offpath (shared) and offpath::offpath_static.
  install(EXPORT offpathTargets NAMESPACE offpath::
      DESTINATION ${OP_CMAKE_DIR})
  configure_package_config_file(
      ${PROJECT_SOURCE_DIR}/cmake/offpathConfig.cmake.in
      ${PROJECT_BINARY_DIR}/offpathConfig.cmake
      INSTALL_DESTINATION ${OP_CMAKE_DIR})
  write_basic_package_version_file(
      ${PROJECT_BINARY_DIR}/offpathConfigVersion.cmake
      VERSION ${PROJECT_VERSION} COMPATIBILITY SameMinorVersion)
  install(FILES ${PROJECT_BINARY_DIR}/offpathConfig.cmake
      ${PROJECT_BINARY_DIR}/offpathConfigVersion.cmake
      DESTINATION ${OP_CMAKE_DIR})
endif()

if(OP_INSTALL_CLI AND TARGET offpath)
  install(TARGETS offpath RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
  install(FILES ${PROJECT_SOURCE_DIR}/docs/offpath.1
      DESTINATION ${CMAKE_INSTALL_MANDIR}/man1)
  install(FILES ${PROJECT_SOURCE_DIR}/dist/offpath.bash
      DESTINATION ${CMAKE_INSTALL_DATADIR}/bash-completion/completions
      RENAME offpath)
endif()

if(OP_LUA_MODULE AND TARGET offpath_lua)
  install(TARGETS offpath_lua LIBRARY DESTINATION ${OP_LUA_CMOD_DIR})
endif()

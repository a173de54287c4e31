# Decides whether the CUDA backend is built and for which architectures, and says so in one line.
#
# CONVEYOR_EMULATE_CUDA=ON builds it instead for the CPU: the files of cuda/ compiled as host C++ against
# cuda/emulator/ (a test build that runs every kernel without a GPU; it needs the CUDA toolkit's headers, not
# nvcc). CONVEYOR_CUDA_EMULATED tells the rest of the build.
#
# Built when CONVEYOR_CUDA is ON and CMake finds a CUDA compiler. Architectures: the environment variable
# CONVEYOR_CUDA_ARCHITECTURES (a CMake list such as "80;90a;100"), else CMAKE_CUDA_ARCHITECTURES when given,
# else "90", which CMake builds as sm_90 machine code plus compute_90 PTX that newer GPUs compile on load.
set(CONVEYOR_WITH_CUDA OFF)
set(CONVEYOR_CUDA_EMULATED OFF)
set(_conveyor_cuda_reason "CONVEYOR_CUDA is OFF")
if(CONVEYOR_EMULATE_CUDA)
  find_package(CUDAToolkit QUIET)
  find_path(CONVEYOR_CUDA_HEADERS cuda_runtime.h cuda_fp16.h cuda_bf16.h
            HINTS ${CUDAToolkit_INCLUDE_DIRS} $ENV{CUDA_HOME}/include /usr/local/cuda/include)
  if(NOT CONVEYOR_CUDA_HEADERS)
    message(FATAL_ERROR "CONVEYOR_EMULATE_CUDA needs the CUDA toolkit's headers (cuda_runtime.h); set CUDA_HOME")
  endif()
  set(CONVEYOR_CUDA_EMULATED ON)
  message(STATUS "Conveyor: CUDA backend emulated on the CPU (test build; CUDA headers in ${CONVEYOR_CUDA_HEADERS})")
  return()
endif()
if(CONVEYOR_CUDA)
  include(CheckLanguage)
  check_language(CUDA)
  set(_conveyor_cuda_reason "no CUDA compiler (nvcc) found")
endif()
if(CONVEYOR_CUDA AND CMAKE_CUDA_COMPILER)
  if(DEFINED ENV{CONVEYOR_CUDA_ARCHITECTURES} AND NOT "$ENV{CONVEYOR_CUDA_ARCHITECTURES}" STREQUAL "")
    set(CMAKE_CUDA_ARCHITECTURES "$ENV{CONVEYOR_CUDA_ARCHITECTURES}")
  elseif(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
    set(CMAKE_CUDA_ARCHITECTURES 90)
  endif()
  enable_language(CUDA)
  set(CMAKE_CUDA_STANDARD 17)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  find_package(CUDAToolkit REQUIRED)
  set(CONVEYOR_WITH_CUDA ON)
  message(STATUS "Conveyor: CUDA backend built (nvcc ${CMAKE_CUDA_COMPILER_VERSION}, architectures ${CMAKE_CUDA_ARCHITECTURES})")
else()
  message(STATUS "Conveyor: CUDA backend not built (${_conveyor_cuda_reason}); CPU backend only")
endif()

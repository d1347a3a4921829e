#pragma once
/// @file
/// TESSERA_HD: marks a function callable from host and device code. Under nvcc it is
/// `__host__ __device__`; under a plain C++ compiler it is empty, so the same function is
/// tested on the host against the CPU reference layers.

#if defined(__CUDACC__)
/// `__host__ __device__` under nvcc, nothing otherwise.
#define TESSERA_HD __host__ __device__
#else
/// `__host__ __device__` under nvcc, nothing otherwise.
#define TESSERA_HD
#endif

"""Ahead-of-time compilation of the kernels into a C library (libvilbert_kernels) for programs without Python.

`generate` compiles the op modules' forward kernels to cubins and writes the C sources that embed and launch them;
CMakeLists.txt at the repository root builds them, with runtime/vk_runtime.c, into static and shared libraries whose
API is include/vilbert_kernels.h. See README.md here.
"""

//! CUDA runtime (cudarc, NVRTC, cuBLASLt) and the BLR layer kernels, compiled at run time for the device's own arch.

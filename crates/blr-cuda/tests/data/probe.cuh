// Header for the kernel_source! test: included by name, handed to NVRTC from memory.
#pragma once
#define PROBE_SCALE 3.0f

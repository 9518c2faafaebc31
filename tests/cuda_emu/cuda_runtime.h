// tests/cuda_emu: the emulated CUDA headers are all one file
#pragma once
#include "emu.h"

/* Stand-in for the CUDA toolkit's cuda_fp16.h under the emulator: __half and its conversions are defined in
 * cuda_emu.h, which the build force-includes before every kernel source. */
#pragma once

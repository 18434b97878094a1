/* NVTX ranges for llada, through the header-only NVTX3 API.
 *
 * NVTX3 loads a profiler's injection library only when one is attached (nsys sets
 * NVTX_INJECTION64_PATH); otherwise the first call installs no-op handlers, so a range costs a
 * function call. No libnvToolsExt is needed (CUDA 13 no longer ships it). */
#include <nvtx3/nvToolsExt.h>

void llada_nvtx_push(const char *name) { nvtxRangePushA(name); }
void llada_nvtx_pop(void) { nvtxRangePop(); }

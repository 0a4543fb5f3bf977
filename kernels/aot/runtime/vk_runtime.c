/* Runtime of the vilbert_kernels C library (see vk_runtime.h).
 *
 * The driver is opened with dlopen("libcuda.so.1") rather than linked: the library then builds without the driver's
 * stub library (the pip-installed toolkits have none) and loads in a process without a GPU, where every call returns
 * VK_ERROR_NO_DRIVER. This is how triton's own launcher reaches the driver.
 */
#define _GNU_SOURCE
#include "vk_runtime.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>

/* The driver entry points we use, with the prototypes of cuda.h. */
typedef CUresult (*cuCtxGetCurrent_t)(CUcontext *);
typedef CUresult (*cuCtxGetDevice_t)(CUdevice *);
typedef CUresult (*cuDeviceGetAttribute_t)(int *, CUdevice_attribute, CUdevice);
typedef CUresult (*cuModuleLoadData_t)(CUmodule *, const void *);
typedef CUresult (*cuModuleUnload_t)(CUmodule);
typedef CUresult (*cuModuleGetFunction_t)(CUfunction *, CUmodule, const char *);
typedef CUresult (*cuFuncSetAttribute_t)(CUfunction, CUfunction_attribute, int);
typedef CUresult (*cuLaunchKernel_t)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                                     CUstream, void **, void **);

static struct {
  cuCtxGetCurrent_t ctx_get_current;
  cuCtxGetDevice_t ctx_get_device;
  cuDeviceGetAttribute_t device_get_attribute;
  cuModuleLoadData_t module_load_data;
  cuModuleUnload_t module_unload;
  cuModuleGetFunction_t module_get_function;
  cuFuncSetAttribute_t func_set_attribute;
  cuLaunchKernel_t launch_kernel;
  int loaded;
} driver;

static pthread_once_t driver_once = PTHREAD_ONCE_INIT;
static _Thread_local CUresult last_cuda_result = CUDA_SUCCESS;
static _Thread_local const char *last_error_message = "";

static void load_driver(void) {
  void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (lib == NULL) return;
  driver.ctx_get_current = (cuCtxGetCurrent_t)dlsym(lib, "cuCtxGetCurrent");
  driver.ctx_get_device = (cuCtxGetDevice_t)dlsym(lib, "cuCtxGetDevice");
  driver.device_get_attribute = (cuDeviceGetAttribute_t)dlsym(lib, "cuDeviceGetAttribute");
  driver.module_load_data = (cuModuleLoadData_t)dlsym(lib, "cuModuleLoadData");
  driver.module_unload = (cuModuleUnload_t)dlsym(lib, "cuModuleUnload");
  driver.module_get_function = (cuModuleGetFunction_t)dlsym(lib, "cuModuleGetFunction");
  driver.func_set_attribute = (cuFuncSetAttribute_t)dlsym(lib, "cuFuncSetAttribute");
  driver.launch_kernel = (cuLaunchKernel_t)dlsym(lib, "cuLaunchKernel");
  driver.loaded = driver.ctx_get_current && driver.ctx_get_device && driver.device_get_attribute &&
                  driver.module_load_data && driver.module_unload && driver.module_get_function && driver.func_set_attribute &&
                  driver.launch_kernel;
}

vk_status vk_fail(vk_status status, const char *message) {
  last_error_message = message;
  return status;
}

const char *vk_last_error_message(void) { return last_error_message; }

static vk_status cuda_failed(CUresult result) {
  last_cuda_result = result;
  return vk_fail(VK_ERROR_CUDA, "a CUDA driver call failed (vk_last_cuda_result() says which error)");
}

CUresult vk_last_cuda_result(void) { return last_cuda_result; }

/* The context current on this thread, or an error when there is none. */
static vk_status current_context(CUcontext *ctx) {
  pthread_once(&driver_once, load_driver);
  if (!driver.loaded) return vk_fail(VK_ERROR_NO_DRIVER, "the CUDA driver (libcuda.so.1) could not be loaded");
  CUresult result = driver.ctx_get_current(ctx);
  if (result == CUDA_ERROR_NOT_INITIALIZED || (result == CUDA_SUCCESS && *ctx == NULL))
    return vk_fail(VK_ERROR_NO_CONTEXT, "no CUDA context is current on the calling thread (cudaSetDevice makes one)");
  return result == CUDA_SUCCESS ? VK_SUCCESS : cuda_failed(result);
}

vk_status vk_current_arch(int *arch) {
  CUcontext ctx;
  vk_status status = current_context(&ctx);
  if (status != VK_SUCCESS) return status;
  CUdevice device;
  int major, minor;
  CUresult result = driver.ctx_get_device(&device);
  if (result == CUDA_SUCCESS)
    result = driver.device_get_attribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device);
  if (result == CUDA_SUCCESS)
    result = driver.device_get_attribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device);
  if (result != CUDA_SUCCESS) return cuda_failed(result);
  *arch = major * 10 + minor;
  return VK_SUCCESS;
}

int vk_arch_runs(int image_arch, int device_arch) {
  /* Triton builds sm_90 as sm_90a (wgmma), which runs on 9.0 only; other cubins run on later minors of their major. */
  if (image_arch == 90) return device_arch == 90;
  return image_arch / 10 == device_arch / 10 && image_arch <= device_arch;
}

/* The loaded function of one image in one context. A list: a process has few contexts and few images, and an entry is
 * never removed (a module lives as long as its context; we do not track context destruction). */
typedef struct loaded_function {
  const vk_kernel_image *image;
  CUcontext ctx;
  CUfunction function;
  struct loaded_function *next;
} loaded_function;

static loaded_function *loaded_functions = NULL;
static pthread_mutex_t loaded_functions_lock = PTHREAD_MUTEX_INITIALIZER;

static vk_status load_function(const vk_kernel_image *image, CUcontext ctx, CUfunction *function) {
  CUmodule module;
  CUresult result = driver.module_load_data(&module, image->cubin);
  if (result != CUDA_SUCCESS) return cuda_failed(result);
  result = driver.module_get_function(function, module, image->name);
  /* Above 48 KiB, dynamic shared memory must be opted into per function. */
  if (result == CUDA_SUCCESS && image->shared_bytes > 48 * 1024)
    result = driver.func_set_attribute(*function, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                       (int)image->shared_bytes);
  loaded_function *entry = result == CUDA_SUCCESS ? (loaded_function *)malloc(sizeof *entry) : NULL;
  if (entry == NULL) {
    driver.module_unload(module);
    return cuda_failed(result == CUDA_SUCCESS ? CUDA_ERROR_OUT_OF_MEMORY : result);
  }
  entry->image = image;
  entry->ctx = ctx;
  entry->function = *function;
  entry->next = loaded_functions;
  loaded_functions = entry;
  return VK_SUCCESS;
}

static vk_status get_function(const vk_kernel_image *image, CUfunction *function) {
  CUcontext ctx;
  vk_status status = current_context(&ctx);
  if (status != VK_SUCCESS) return status;
  pthread_mutex_lock(&loaded_functions_lock);
  const loaded_function *entry = loaded_functions;
  while (entry != NULL && !(entry->image == image && entry->ctx == ctx)) entry = entry->next;
  if (entry != NULL) {
    *function = entry->function;
  } else {
    status = load_function(image, ctx, function);
  }
  pthread_mutex_unlock(&loaded_functions_lock);
  return status;
}

vk_status vk_launch(const vk_kernel_image *image, const unsigned grid[3], void **params, CUstream stream) {
  if (grid[0] == 0 || grid[1] == 0 || grid[2] == 0) return VK_SUCCESS;
  if (grid[0] > INT32_MAX || grid[1] > 65535 || grid[2] > 65535)  /* CUDA's limits */
    return vk_fail(VK_ERROR_INVALID_VALUE, "the launch grid exceeds CUDA's limits (too many query tiles)");
  CUfunction function;
  vk_status status = get_function(image, &function);
  if (status != VK_SUCCESS) return status;
  CUresult result = driver.launch_kernel(function, grid[0], grid[1], grid[2], image->num_warps * 32, 1, 1,
                                         image->shared_bytes, stream, params, NULL);
  return result == CUDA_SUCCESS ? VK_SUCCESS : cuda_failed(result);
}

const char *vk_status_string(vk_status status) {
  switch (status) {
    case VK_SUCCESS: return "success";
    case VK_ERROR_INVALID_VALUE: return "invalid argument (a size, stride or pointer out of range)";
    case VK_ERROR_MISALIGNED: return "a device pointer or an input's stride is not 16-byte aligned";
    case VK_ERROR_UNSUPPORTED: return "no kernel compiled for this GPU architecture, dtype and head dim";
    case VK_ERROR_NO_DRIVER: return "the CUDA driver (libcuda.so.1) could not be loaded";
    case VK_ERROR_NO_CONTEXT: return "no CUDA context is current on the calling thread";
    case VK_ERROR_CUDA: return "a CUDA driver call failed (see vk_last_cuda_result())";
  }
  return "unknown vk_status";
}

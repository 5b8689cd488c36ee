// mgvq.VQGemm for ONNX Runtime's CUDA execution provider: the ORT glue around vq_gemm_cuda.cu.
//
// The library registers one "mgvq" domain holding the CUDA kernels and the CPU kernels of
// vq_gemm_cpu.cc (compiled into it with RegisterCustomOps renamed): ORT refuses a second custom
// domain of the same name in one session ("Domain already set in registry"), so a CUDA session
// registers this library instead of the CPU one, and nodes ORT leaves on the CPU still run.
// Like the CPU library it uses only the OrtApi handed to RegisterCustomOps (no link to onnxruntime).

#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "vq_gemm_cuda.h"
#include "vq_gemm_op.h"

// vq_gemm_cpu.cc's RegisterCustomOps, renamed when it is compiled into this library.
extern "C" OrtStatus* ORT_API_CALL mgvq_cpu_register_custom_ops(OrtSessionOptions* options,
                                                                const OrtApiBase* api_base);

namespace {

using mgvq_op::str;
constexpr const char* kProvider = "CUDAExecutionProvider";
constexpr const char* kLabel = "mgvq.VQGemm (CUDA)";  // error messages start with it

// The layout part of the launch parameters, from the node's checked attributes.
mgvq_cuda::VQGemmParams make_layout(const mgvq_op::Attributes& a) {
  if (a.num_groups() > mgvq_cuda::kMaxGroups)
    throw std::runtime_error("the CUDA kernel handles at most " + str(mgvq_cuda::kMaxGroups) + " groups");
  mgvq_cuda::VQGemmParams p;
  p.n = a.n;
  p.m = a.m;
  p.d = a.d;
  p.scale_group = a.scale_group;
  p.num_groups = (int)a.num_groups();
  int64_t row = 0, byte = 0;
  for (size_t g = 0; g < a.code_bits.size(); ++g) {
    mgvq_cuda::Group& G = p.groups[g];
    G.start = a.bounds[g];
    G.stop = a.bounds[g + 1];
    G.code_bits = a.code_bits[g];
    G.codebook_row = row;
    G.code_byte = byte;
    row += a.codebook_size(g);
    byte += a.group_code_nbytes(g);
  }
  p.codebook_rows = a.codebook_rows;
  p.code_nbytes = a.code_nbytes;
  return p;
}

mgvq_cuda::KernelPath path_from_env() {
  const char* path = std::getenv("MGVQ_VQGEMM_CUDA_PATH");  // auto | fast | generic (tests force a path)
  if (path != nullptr && std::string(path) == "fast") return mgvq_cuda::KernelPath::kFast;
  if (path != nullptr && std::string(path) == "generic") return mgvq_cuda::KernelPath::kGeneric;
  return mgvq_cuda::KernelPath::kAuto;
}

// Device scratch from ORT's allocator for the tensor's device, released at the end of Compute. The
// release is safe before the kernels ran: the allocator hands the memory only to later work on the
// same stream (ORT's own CUDA kernels free their scratch the same way).
class Scratch {
 public:
  Scratch(const OrtApi& api, Ort::KernelContext& ctx, const OrtMemoryInfo* info, size_t bytes) : api_(api) {
    if (bytes == 0) return;
    allocator_ = ctx.GetAllocator(*info);
    ptr_ = allocator_->Alloc(allocator_, bytes);
    if (ptr_ == nullptr) throw std::runtime_error("could not allocate " + str((int64_t)bytes) + " bytes of scratch");
  }
  ~Scratch() {
    if (ptr_ != nullptr) allocator_->Free(allocator_, ptr_);
    if (allocator_ != nullptr) api_.ReleaseAllocator(allocator_);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  void* get() const { return ptr_; }

 private:
  const OrtApi& api_;
  OrtAllocator* allocator_ = nullptr;
  void* ptr_ = nullptr;
};

struct VQGemmCudaKernel {
  VQGemmCudaKernel(const OrtApi& api, const OrtKernelInfo* info)
      : api_(api), attributes_(mgvq_op::read_attributes(info)), layout_(make_layout(attributes_)) {
    layout_.path = path_from_env();
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return mgvq_op::status_of(api_, kLabel, [&] { Compute(context); });
  }

 private:
  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    mgvq_cuda::VQGemmParams p = layout_;
    const mgvq_op::Inputs in = mgvq_op::read_inputs(ctx, attributes_);
    const std::vector<int64_t>& x_shape = in.x_shape;
    const int64_t rows = in.rows;
    const Ort::ConstValue& x_val = in.x;
    // perm entries out of range are not checked here (device memory): they give NaN outputs
    if (in.perm) p.perm = in.perm.GetTensorData<int32_t>();
    if (in.scales) {
      p.scales = static_cast<const uint16_t*>(in.scales.GetTensorRawData());
    } else {
      p.scale_group = 0;  // scale_group_size without scales: nothing to scale
    }
    if (in.bias) p.bias = in.bias.GetTensorRawData();

    std::vector<int64_t> y_shape = x_shape;
    y_shape.back() = p.m;
    Ort::UnownedValue y_val = ctx.GetOutput(0, y_shape);
    if (rows == 0) return;

    Ort::ConstMemoryInfo x_memory = x_val.GetTensorMemoryInfo();
    p.rows = rows;
    p.dtype = in.x_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 ? mgvq_cuda::DType::kFloat16 : mgvq_cuda::DType::kFloat32;
    p.x = x_val.GetTensorRawData();
    p.codebooks = static_cast<const uint16_t*>(in.codebooks.GetTensorRawData());
    p.codes = in.codes.GetTensorData<uint8_t>();
    p.y = y_val.GetTensorMutableRawData();
    p.device = x_memory.GetDeviceId();
    Scratch scratch(api_, ctx, x_memory, mgvq_cuda::scratch_bytes(p));
    p.scratch = scratch.get();
    const std::string error = mgvq_cuda::launch_vq_gemm(p, static_cast<cudaStream_t>(ctx.GetGPUComputeStream()));
    if (!error.empty()) throw std::runtime_error(error);
  }

  const OrtApi& api_;
  mgvq_op::Attributes attributes_;
  mgvq_cuda::VQGemmParams layout_;
};

using VQGemmCudaOp = mgvq_op::Op<VQGemmCudaKernel>;

VQGemmCudaOp& op_float() {
  static VQGemmCudaOp op(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, kProvider, kLabel);
  return op;
}

VQGemmCudaOp& op_float16() {
  static VQGemmCudaOp op(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, kProvider, kLabel);
  return op;
}

// The CPU library's registration is run against a copy of the OrtApi whose AddCustomOpDomain only
// hands the domain back, so the CUDA kernels join that same domain before it is added for real.
std::mutex registration_mutex;
const OrtApiBase* real_api_base = nullptr;
OrtApi capturing_api;
OrtCustomOpDomain* captured_domain = nullptr;

OrtStatus* ORT_API_CALL capture_domain(OrtSessionOptions*, OrtCustomOpDomain* domain) NO_EXCEPTION {
  captured_domain = domain;
  return nullptr;
}

const OrtApi* ORT_API_CALL capturing_get_api(uint32_t version) NO_EXCEPTION {
  return version == ORT_API_VERSION ? &capturing_api : real_api_base->GetApi(version);
}

const char* ORT_API_CALL capturing_version_string() NO_EXCEPTION { return real_api_base->GetVersionString(); }

OrtStatus* cpu_domain(const OrtApi* api, const OrtApiBase* api_base, OrtSessionOptions* options,
                      OrtCustomOpDomain** domain) {
  real_api_base = api_base;
  std::memcpy(&capturing_api, api, sizeof capturing_api);  // the 1.21 part the CPU kernels use
  capturing_api.AddCustomOpDomain = capture_domain;
  captured_domain = nullptr;
  OrtApiBase capturing_base{capturing_get_api, capturing_version_string};
  OrtStatus* status = mgvq_cpu_register_custom_ops(options, &capturing_base);
  Ort::InitApi(api);  // the CPU registration pointed the C++ wrappers at the copy
  *domain = captured_domain;
  if (status == nullptr && captured_domain == nullptr)
    return api->CreateStatus(ORT_FAIL, "mgvq: the CPU kernels did not register a domain");
  return status;
}

}  // namespace

extern "C" {

__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                               const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) return mgvq_op::too_old_runtime(api_base);
  std::lock_guard<std::mutex> lock(registration_mutex);
  Ort::InitApi(api);
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* status = cpu_domain(api, api_base, options, &domain)) return status;
  if (OrtStatus* status = api->CustomOpDomain_Add(domain, &op_float())) return status;
  if (OrtStatus* status = api->CustomOpDomain_Add(domain, &op_float16())) return status;
  return api->AddCustomOpDomain(options, domain);
}

// Which CUDA kernel a layout would use on `device` (for tests and benchmarks): "fast", "generic", or
// "" for an invalid layout. Attributes as in the node; no memory is touched.
__attribute__((visibility("default"))) const char* MgvqCudaKernelPath(int64_t n, int64_t m, int64_t d,
                                                                      const int64_t* bounds, const int64_t* bits,
                                                                      int64_t num_groups, int64_t scale_group,
                                                                      int64_t rows, int device) {
  try {
    mgvq_op::Attributes a;
    a.n = n;
    a.m = m;
    a.d = d;
    a.scale_group = scale_group;
    a.bounds.assign(bounds, bounds + num_groups + 1);
    for (int64_t g = 0; g < num_groups; ++g) a.code_bits.push_back(bits[g] * d);
    mgvq_cuda::VQGemmParams p = make_layout(mgvq_op::check_attributes(a));
    alignas(16) static const char kDummy[16] = {};  // non-null stand-ins for the device buffers
    p.rows = rows;
    p.device = device;
    p.x = p.codebooks = reinterpret_cast<const uint16_t*>(kDummy);
    p.codes = reinterpret_cast<const uint8_t*>(kDummy);
    p.y = const_cast<char*>(kDummy);
    p.scales = scale_group > 0 ? reinterpret_cast<const uint16_t*>(kDummy) : nullptr;
    return mgvq_cuda::chosen_path(p);
  } catch (const std::exception&) {
    return "";
  }
}

}  // extern "C"

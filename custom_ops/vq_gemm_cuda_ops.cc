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

// vq_gemm_cpu.cc's RegisterCustomOps, renamed when it is compiled into this library.
extern "C" OrtStatus* ORT_API_CALL mgvq_cpu_register_custom_ops(OrtSessionOptions* options,
                                                                const OrtApiBase* api_base);

namespace {

const char* kOpName = "VQGemm";
const char* kProvider = "CUDAExecutionProvider";

std::string str(int64_t v) { return std::to_string(v); }

// The layout part of the launch parameters, from the node's attributes (checked once).
mgvq_cuda::VQGemmParams make_layout(int64_t n, int64_t m, int64_t d, const std::vector<int64_t>& bounds,
                                    const std::vector<int64_t>& bits, int64_t scale_group) {
  if (n <= 0 || m <= 0 || d <= 0) throw std::runtime_error("in_features, out_features and vector_dim must be > 0");
  if (bounds.size() != bits.size() + 1 || bits.empty())
    throw std::runtime_error("group_bounds must have one more entry than group_bits");
  if (bounds.front() != 0 || bounds.back() != n) throw std::runtime_error("group_bounds must go from 0 to in_features");
  if (bits.size() > (size_t)mgvq_cuda::kMaxGroups)
    throw std::runtime_error("the CUDA kernel handles at most " + str(mgvq_cuda::kMaxGroups) + " groups");
  if (scale_group < 0 || (scale_group > 0 && n % scale_group))
    throw std::runtime_error("scale_group_size must divide in_features");
  mgvq_cuda::VQGemmParams p;
  p.n = n;
  p.m = m;
  p.d = d;
  p.scale_group = scale_group;
  p.num_groups = (int)bits.size();
  int64_t row = 0, byte = 0;
  for (size_t g = 0; g < bits.size(); ++g) {
    mgvq_cuda::Group& G = p.groups[g];
    G.start = bounds[g];
    G.stop = bounds[g + 1];
    G.bits = bits[g];
    if (G.stop <= G.start || (G.stop - G.start) % d)
      throw std::runtime_error("group " + str(g) + " width is not a positive multiple of vector_dim");
    if (G.bits < 1 || G.bits * d > 16)
      throw std::runtime_error("group " + str(g) + ": bits * vector_dim must be in 1..16");
    G.codebook_row = row;
    G.code_byte = byte;
    row += int64_t(1) << (G.bits * d);
    byte += (m * ((G.stop - G.start) / d) * G.bits * d + 7) / 8;
  }
  p.codebook_rows = row;
  p.code_nbytes = byte;
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
  VQGemmCudaKernel(const OrtApi& api, const OrtKernelInfo* info) : api_(api) {
    Ort::ConstKernelInfo ki(info);
    int64_t scale_group = 0;
    try {
      scale_group = ki.GetAttribute<int64_t>("scale_group_size");
    } catch (const Ort::Exception&) {
      scale_group = 0;
    }
    layout_ = make_layout(ki.GetAttribute<int64_t>("in_features"), ki.GetAttribute<int64_t>("out_features"),
                          ki.GetAttribute<int64_t>("vector_dim"), ki.GetAttributes<int64_t>("group_bounds"),
                          ki.GetAttributes<int64_t>("group_bits"), scale_group);
    layout_.path = path_from_env();
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    try {
      Compute(context);
      return nullptr;
    } catch (const Ort::Exception& e) {
      return api_.CreateStatus(e.GetOrtErrorCode(), (std::string("mgvq.VQGemm (CUDA): ") + e.what()).c_str());
    } catch (const std::exception& e) {
      return api_.CreateStatus(ORT_INVALID_ARGUMENT, (std::string("mgvq.VQGemm (CUDA): ") + e.what()).c_str());
    }
  }

 private:
  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    mgvq_cuda::VQGemmParams p = layout_;
    const size_t num_inputs = ctx.GetInputCount();
    auto input = [&](size_t i) -> Ort::ConstValue {
      if (i >= num_inputs) return Ort::ConstValue{nullptr};
      return ctx.GetInput(i);
    };
    Ort::ConstValue x_val = input(0), perm_val = input(1), cb_val = input(2), codes_val = input(3),
                    scales_val = input(4), bias_val = input(5);
    if (!x_val || !cb_val || !codes_val) throw std::runtime_error("inputs X, codebooks and codes are required");

    auto x_info = x_val.GetTensorTypeAndShapeInfo();
    const ONNXTensorElementDataType x_type = x_info.GetElementType();
    if (x_type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && x_type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16)
      throw std::runtime_error("X must be float or float16");
    std::vector<int64_t> x_shape = x_info.GetShape();
    if (x_shape.empty() || x_shape.back() != p.n)
      throw std::runtime_error("X's last dimension must be in_features = " + str(p.n));
    int64_t rows = 1;
    for (size_t i = 0; i + 1 < x_shape.size(); ++i) rows *= x_shape[i];

    auto check = [](const Ort::ConstValue& v, ONNXTensorElementDataType type, const std::vector<int64_t>& shape,
                    const char* what) {
      auto info = v.GetTensorTypeAndShapeInfo();
      if (info.GetElementType() != type) throw std::runtime_error(std::string(what) + " has the wrong element type");
      if (info.GetShape() != shape) throw std::runtime_error(std::string(what) + " has the wrong shape");
    };
    check(cb_val, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, {p.codebook_rows, p.d}, "codebooks");
    check(codes_val, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, {p.code_nbytes}, "codes");
    if (perm_val) {  // entries out of range are not checked here (device memory): they give NaN outputs
      check(perm_val, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, {p.n}, "perm");
      p.perm = perm_val.GetTensorData<int32_t>();
    }
    if (scales_val) {
      if (p.scale_group == 0) throw std::runtime_error("scales given but scale_group_size is 0");
      check(scales_val, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, {p.m, p.n / p.scale_group}, "scales");
      p.scales = static_cast<const uint16_t*>(scales_val.GetTensorRawData());
    } else {
      p.scale_group = 0;  // scale_group_size without scales: nothing to scale
    }
    if (bias_val) {
      check(bias_val, x_type, {p.m}, "bias");
      p.bias = bias_val.GetTensorRawData();
    }

    std::vector<int64_t> y_shape = x_shape;
    y_shape.back() = p.m;
    Ort::UnownedValue y_val = ctx.GetOutput(0, y_shape);
    if (rows == 0) return;

    Ort::ConstMemoryInfo x_memory = x_val.GetTensorMemoryInfo();
    p.rows = rows;
    p.dtype = x_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 ? mgvq_cuda::DType::kFloat16 : mgvq_cuda::DType::kFloat32;
    p.x = x_val.GetTensorRawData();
    p.codebooks = static_cast<const uint16_t*>(cb_val.GetTensorRawData());
    p.codes = codes_val.GetTensorData<uint8_t>();
    p.y = y_val.GetTensorMutableRawData();
    p.device = x_memory.GetDeviceId();
    Scratch scratch(api_, ctx, x_memory, mgvq_cuda::scratch_bytes(p));
    p.scratch = scratch.get();
    const std::string error = mgvq_cuda::launch_vq_gemm(p, static_cast<cudaStream_t>(ctx.GetGPUComputeStream()));
    if (!error.empty()) throw std::runtime_error(error);
  }

  const OrtApi& api_;
  mgvq_cuda::VQGemmParams layout_;
};

// One registration per activation type (float, float16): ORT picks the kernel by X's type.
struct VQGemmCudaOp : Ort::CustomOpBase<VQGemmCudaOp, VQGemmCudaKernel, true> {
  explicit VQGemmCudaOp(ONNXTensorElementDataType type) : type_(type) {}
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    try {
      *kernel = new VQGemmCudaKernel(api, info);
      return nullptr;
    } catch (const Ort::Exception& e) {
      return api.CreateStatus(e.GetOrtErrorCode(), (std::string("mgvq.VQGemm (CUDA): ") + e.what()).c_str());
    } catch (const std::exception& e) {
      return api.CreateStatus(ORT_INVALID_ARGUMENT, (std::string("mgvq.VQGemm (CUDA): ") + e.what()).c_str());
    }
  }
  const char* GetName() const { return kOpName; }
  const char* GetExecutionProviderType() const { return kProvider; }
  size_t GetInputTypeCount() const { return 6; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    switch (index) {
      case 1:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
      case 2:
      case 4:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
      case 3:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
      default:  // X and bias
        return type_;
    }
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return (index == 1 || index >= 4) ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return type_; }

 private:
  ONNXTensorElementDataType type_;
};

VQGemmCudaOp& op_float() {
  static VQGemmCudaOp op(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  return op;
}

VQGemmCudaOp& op_float16() {
  static VQGemmCudaOp op(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16);
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
  if (api == nullptr) {  // a runtime older than the 1.21 headers: report it through the oldest API
    const OrtApi* v1 = api_base->GetApi(1);
    return v1 == nullptr ? nullptr
                         : v1->CreateStatus(ORT_FAIL, "mgvq custom ops need ONNX Runtime >= 1.21 (API version 21)");
  }
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
    mgvq_cuda::VQGemmParams p = make_layout(n, m, d, std::vector<int64_t>(bounds, bounds + num_groups + 1),
                                            std::vector<int64_t>(bits, bits + num_groups), scale_group);
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

// The ONNX Runtime side of mgvq.VQGemm that the CPU (vq_gemm_cpu.cc) and CUDA (vq_gemm_cuda_ops.cc)
// kernels share: the node's attributes and inputs, checked against the contract of
// mgvq_compile/vqgemm.py, and the custom-op definition ORT registers. Include it after
// onnxruntime_cxx_api.h (with ORT_API_MANUAL_INIT defined).

#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace mgvq_op {

constexpr const char* kDomain = "mgvq";
constexpr const char* kOpName = "VQGemm";

inline std::string str(int64_t v) { return std::to_string(v); }

// The node's attributes, checked once at kernel creation.
struct Attributes {
  int64_t n = 0, m = 0, d = 0, scale_group = 0;
  // group g: permuted columns [bounds[g], bounds[g + 1]), each vector's code code_bits[g] wide (b * d for
  // b bits per weight; the node gives group_bits b when every b is whole, else group_code_bits)
  std::vector<int64_t> bounds, code_bits;
  int64_t codebook_rows = 0, code_nbytes = 0;  // totals over the groups, set by check_attributes

  int64_t num_groups() const { return (int64_t)code_bits.size(); }
  int64_t width(size_t g) const { return bounds[g + 1] - bounds[g]; }
  int64_t codebook_size(size_t g) const { return int64_t(1) << code_bits[g]; }
  int64_t group_code_nbytes(size_t g) const { return (m * (width(g) / d) * code_bits[g] + 7) / 8; }  // whole bytes
};

inline Attributes check_attributes(Attributes a) {
  if (a.n <= 0 || a.m <= 0 || a.d <= 0)
    throw std::runtime_error("in_features, out_features and vector_dim must be > 0");
  if (a.bounds.size() != a.code_bits.size() + 1 || a.code_bits.empty())
    throw std::runtime_error("group_bounds must have one more entry than group_bits (or group_code_bits)");
  if (a.bounds.front() != 0 || a.bounds.back() != a.n)
    throw std::runtime_error("group_bounds must go from 0 to in_features");
  if (a.scale_group < 0 || (a.scale_group > 0 && a.n % a.scale_group))
    throw std::runtime_error("scale_group_size must divide in_features");
  for (size_t g = 0; g < a.code_bits.size(); ++g) {
    if (a.width(g) <= 0 || a.width(g) % a.d)
      throw std::runtime_error("group " + str(g) + " width is not a positive multiple of vector_dim");
    if (a.code_bits[g] < 1 || a.code_bits[g] > 16)
      throw std::runtime_error("group " + str(g) + ": code bits (bits * vector_dim) must be in 1..16");
  }
  a.codebook_rows = a.code_nbytes = 0;
  for (size_t g = 0; g < a.code_bits.size(); ++g) {
    a.codebook_rows += a.codebook_size(g);
    a.code_nbytes += a.group_code_nbytes(g);
  }
  return a;
}

inline Attributes read_attributes(const OrtKernelInfo* info) {
  Ort::ConstKernelInfo ki(info);
  Attributes a;
  a.n = ki.GetAttribute<int64_t>("in_features");
  a.m = ki.GetAttribute<int64_t>("out_features");
  a.d = ki.GetAttribute<int64_t>("vector_dim");
  a.bounds = ki.GetAttributes<int64_t>("group_bounds");
  try {
    a.code_bits = ki.GetAttributes<int64_t>("group_code_bits");
  } catch (const Ort::Exception&) {
    for (int64_t b : ki.GetAttributes<int64_t>("group_bits")) a.code_bits.push_back(b * a.d);
  }
  try {
    a.scale_group = ki.GetAttribute<int64_t>("scale_group_size");
  } catch (const Ort::Exception&) {
    a.scale_group = 0;  // optional
  }
  return check_attributes(a);
}

// The node's inputs (X, perm, codebooks, codes, scales, bias; absent optional ones are null), their
// element types and shapes checked; rows = the product of X's leading dimensions.
struct Inputs {
  Ort::ConstValue x{nullptr}, perm{nullptr}, codebooks{nullptr}, codes{nullptr}, scales{nullptr}, bias{nullptr};
  ONNXTensorElementDataType x_type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> x_shape;
  int64_t rows = 0;
};

inline Inputs read_inputs(Ort::KernelContext& ctx, const Attributes& a) {
  const size_t count = ctx.GetInputCount();
  auto input = [&](size_t i) { return i < count ? ctx.GetInput(i) : Ort::ConstValue{nullptr}; };
  Inputs in;
  in.x = input(0);
  in.perm = input(1);
  in.codebooks = input(2);
  in.codes = input(3);
  in.scales = input(4);
  in.bias = input(5);
  if (!in.x || !in.codebooks || !in.codes) throw std::runtime_error("inputs X, codebooks and codes are required");
  auto x_info = in.x.GetTensorTypeAndShapeInfo();
  in.x_type = x_info.GetElementType();
  if (in.x_type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && in.x_type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16)
    throw std::runtime_error("X must be float or float16");
  in.x_shape = x_info.GetShape();
  if (in.x_shape.empty() || in.x_shape.back() != a.n)
    throw std::runtime_error("X's last dimension must be in_features = " + str(a.n));
  in.rows = 1;
  for (size_t i = 0; i + 1 < in.x_shape.size(); ++i) in.rows *= in.x_shape[i];

  auto check = [](const Ort::ConstValue& v, ONNXTensorElementDataType type, const std::vector<int64_t>& shape,
                  const char* what) {
    auto info = v.GetTensorTypeAndShapeInfo();
    if (info.GetElementType() != type) throw std::runtime_error(std::string(what) + " has the wrong element type");
    if (info.GetShape() != shape) throw std::runtime_error(std::string(what) + " has the wrong shape");
  };
  check(in.codebooks, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, {a.codebook_rows, a.d}, "codebooks");
  check(in.codes, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, {a.code_nbytes}, "codes");
  if (in.perm) check(in.perm, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32, {a.n}, "perm");
  if (in.scales) {
    if (a.scale_group == 0) throw std::runtime_error("scales given but scale_group_size is 0");
    check(in.scales, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, {a.m, a.n / a.scale_group}, "scales");
  }
  if (in.bias) check(in.bias, in.x_type, {a.m}, "bias");
  return in;
}

// Runs fn, turning an exception into an ORT status whose message starts with `label`.
template <typename F>
OrtStatusPtr status_of(const OrtApi& api, const char* label, F&& fn) {
  try {
    fn();
    return nullptr;
  } catch (const Ort::Exception& e) {
    return api.CreateStatus(e.GetOrtErrorCode(), (std::string(label) + ": " + e.what()).c_str());
  } catch (const std::exception& e) {
    return api.CreateStatus(ORT_INVALID_ARGUMENT, (std::string(label) + ": " + e.what()).c_str());
  }
}

// The op for one execution provider and one activation type (float or float16: ORT picks the kernel
// by X's type). Kernel(api, info) is created per node; its ComputeV2 runs it.
template <typename Kernel>
struct Op : Ort::CustomOpBase<Op<Kernel>, Kernel, true> {
  Op(ONNXTensorElementDataType type, const char* provider, const char* label)
      : type_(type), provider_(provider), label_(label) {}
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    return status_of(api, label_, [&] { *kernel = new Kernel(api, info); });
  }
  const char* GetName() const { return kOpName; }
  const char* GetExecutionProviderType() const { return provider_; }
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
  const char* provider_;
  const char* label_;
};

// The registration result of a runtime older than the headers, reported through the oldest API.
inline OrtStatus* too_old_runtime(const OrtApiBase* api_base) {
  const OrtApi* v1 = api_base->GetApi(1);
  return v1 == nullptr ? nullptr
                       : v1->CreateStatus(ORT_FAIL, "mgvq custom ops need ONNX Runtime >= 1.21 (API version 21)");
}

}  // namespace mgvq_op

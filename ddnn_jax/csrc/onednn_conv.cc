// 2-D convolution (NHWC activations, HWIO kernels, float32) for XLA:CPU through
// oneDNN, as three XLA FFI handlers: forward, gradient of the input and gradient
// of the kernel. XLA:CPU's own convolutions run 2-3x slower than oneDNN's on
// the narrow layers (8-64 channels) of CIFAR ResNets; ddnn_jax/onednn_conv.py
// builds this file on first use and wraps the handlers in a custom_vjp.
//
// Primitives are cached per shape: a training run meets a few dozen shapes.

#include <cstdint>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

struct Geometry {
  memory::dims src, weights, dst, strides, padding_l, padding_r, dilates;

  std::string Key(const char* kind) const {
    std::string key(kind);
    for (const auto* dims : {&src, &weights, &dst, &strides, &padding_l, &padding_r}) {
      key += '|';
      for (auto d : *dims) key += std::to_string(d) + ',';
    }
    return key;
  }
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// Logical dims are oneDNN's (N, C, H, W) and (O, I, H, W); the memory tags say
// the buffers are NHWC and HWIO.
Geometry MakeGeometry(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>& w,
                      const ffi::Span<const int64_t> y_dims, int64_t stride_h,
                      int64_t stride_w, int64_t pad_top, int64_t pad_bottom,
                      int64_t pad_left, int64_t pad_right) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  Geometry g;
  g.src = {xd[0], xd[3], xd[1], xd[2]};
  g.weights = {wd[3], wd[2], wd[0], wd[1]};
  g.dst = {y_dims[0], y_dims[3], y_dims[1], y_dims[2]};
  g.strides = {stride_h, stride_w};
  g.padding_l = {pad_top, pad_left};
  g.padding_r = {pad_bottom, pad_right};
  g.dilates = {0, 0};
  return g;
}

dnnl::convolution_forward::primitive_desc ForwardDesc(const Geometry& g) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      memory::desc(g.src, dt::f32, tag::nhwc), memory::desc(g.weights, dt::f32, tag::any),
      memory::desc(g.dst, dt::f32, tag::nhwc), g.strides, g.dilates, g.padding_l,
      g.padding_r);
}

// A backward primitive (data or weights) of the convolution `g`, with the
// forward one as oneDNN's hint.
template <typename PrimitiveDesc>
PrimitiveDesc BackwardDesc(const Geometry& g) {
  return PrimitiveDesc(
      Engine(), dnnl::algorithm::convolution_direct,
      memory::desc(g.src, dt::f32, tag::nhwc), memory::desc(g.weights, dt::f32, tag::any),
      memory::desc(g.dst, dt::f32, tag::nhwc), g.strides, g.dilates, g.padding_l,
      g.padding_r, ForwardDesc(g));
}

// An NHWC activation buffer of XLA's, as oneDNN memory of logical dims `dims`.
memory Nhwc(const memory::dims& dims, float* data) {
  return memory(memory::desc(dims, dt::f32, tag::nhwc), Engine(), data);
}

// What one cached convolution needs: the primitive and its kernel layout.
struct Entry {
  dnnl::primitive primitive;
  memory::desc weights_desc;  // the layout the primitive wants for the kernel
};

template <typename Build>
Entry& Cached(const std::string& key, Build build) {
  static std::mutex mutex;
  static std::unordered_map<std::string, Entry> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(key);
  if (it == cache.end()) it = cache.emplace(key, build()).first;
  return it->second;
}

memory::desc HwioDesc(const Geometry& g) { return memory::desc(g.weights, dt::f32, tag::hwio); }

// Runs `primitive` with the kernel converted between HWIO (`hwio_data`) and the
// primitive's preferred layout; `kernel_is_output` says which way.
void Run(const Entry& entry, std::unordered_map<int, memory> args, int kernel_arg,
         const Geometry& g, float* hwio_data, bool kernel_is_output) {
  // One convolution at a time: each already uses every core through OpenMP, and
  // two XLA threads entering OpenMP at once would start two teams that fight
  // over the same cores.
  static std::mutex running;
  std::lock_guard<std::mutex> lock(running);
  dnnl::stream stream(Engine());
  memory hwio(HwioDesc(g), Engine(), hwio_data);
  memory kernel = hwio;
  if (entry.weights_desc != hwio.get_desc()) {
    kernel = memory(entry.weights_desc, Engine());
    if (!kernel_is_output) dnnl::reorder(hwio, kernel).execute(stream, hwio, kernel);
  }
  args.insert({kernel_arg, kernel});
  entry.primitive.execute(stream, args);
  if (kernel_is_output && kernel != hwio) dnnl::reorder(kernel, hwio).execute(stream, kernel, hwio);
  stream.wait();
}

template <typename Fn>
ffi::Error Guard(Fn fn) {
  try {
    fn();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error ConvForwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                           ffi::ResultBuffer<ffi::F32> y, int64_t stride_h, int64_t stride_w,
                           int64_t pad_top, int64_t pad_bottom, int64_t pad_left,
                           int64_t pad_right) {
  return Guard([&] {
    Geometry g = MakeGeometry(x, w, y->dimensions(), stride_h, stride_w, pad_top,
                              pad_bottom, pad_left, pad_right);
    Entry& entry = Cached(g.Key("fwd"), [&] {
      auto pd = ForwardDesc(g);
      return Entry{dnnl::convolution_forward(pd), pd.weights_desc()};
    });
    Run(entry,
        {{DNNL_ARG_SRC, Nhwc(g.src, x.typed_data())},
         {DNNL_ARG_DST, Nhwc(g.dst, y->typed_data())}},
        DNNL_ARG_WEIGHTS, g, w.typed_data(), /*kernel_is_output=*/false);
  });
}

// dx from dy and w; `x` is passed for its shape only.
ffi::Error ConvInputGradImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                             ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dx,
                             int64_t stride_h, int64_t stride_w, int64_t pad_top,
                             int64_t pad_bottom, int64_t pad_left, int64_t pad_right) {
  return Guard([&] {
    Geometry g = MakeGeometry(x, w, dy.dimensions(), stride_h, stride_w, pad_top,
                              pad_bottom, pad_left, pad_right);
    Entry& entry = Cached(g.Key("bwd_data"), [&] {
      auto pd = BackwardDesc<dnnl::convolution_backward_data::primitive_desc>(g);
      return Entry{dnnl::convolution_backward_data(pd), pd.weights_desc()};
    });
    Run(entry,
        {{DNNL_ARG_DIFF_DST, Nhwc(g.dst, dy.typed_data())},
         {DNNL_ARG_DIFF_SRC, Nhwc(g.src, dx->typed_data())}},
        DNNL_ARG_WEIGHTS, g, w.typed_data(), /*kernel_is_output=*/false);
  });
}

// dw from x and dy; `w` is passed for its shape only.
ffi::Error ConvKernelGradImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                              ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dw,
                              int64_t stride_h, int64_t stride_w, int64_t pad_top,
                              int64_t pad_bottom, int64_t pad_left, int64_t pad_right) {
  return Guard([&] {
    Geometry g = MakeGeometry(x, w, dy.dimensions(), stride_h, stride_w, pad_top,
                              pad_bottom, pad_left, pad_right);
    Entry& entry = Cached(g.Key("bwd_weights"), [&] {
      auto pd = BackwardDesc<dnnl::convolution_backward_weights::primitive_desc>(g);
      return Entry{dnnl::convolution_backward_weights(pd), pd.diff_weights_desc()};
    });
    Run(entry,
        {{DNNL_ARG_SRC, Nhwc(g.src, x.typed_data())},
         {DNNL_ARG_DIFF_DST, Nhwc(g.dst, dy.typed_data())}},
        DNNL_ARG_DIFF_WEIGHTS, g, dw->typed_data(), /*kernel_is_output=*/true);
  });
}

template <typename B>
auto BindGeometry(B binding) {
  return std::move(binding).template Attr<int64_t>("stride_h")
      .template Attr<int64_t>("stride_w")
      .template Attr<int64_t>("pad_top")
      .template Attr<int64_t>("pad_bottom")
      .template Attr<int64_t>("pad_left")
      .template Attr<int64_t>("pad_right");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    DdnnConvForward, ConvForwardImpl,
    BindGeometry(ffi::Ffi::Bind()
                     .Arg<ffi::Buffer<ffi::F32>>()
                     .Arg<ffi::Buffer<ffi::F32>>()
                     .Ret<ffi::Buffer<ffi::F32>>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    DdnnConvInputGrad, ConvInputGradImpl,
    BindGeometry(ffi::Ffi::Bind()
                     .Arg<ffi::Buffer<ffi::F32>>()
                     .Arg<ffi::Buffer<ffi::F32>>()
                     .Arg<ffi::Buffer<ffi::F32>>()
                     .Ret<ffi::Buffer<ffi::F32>>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    DdnnConvKernelGrad, ConvKernelGradImpl,
    BindGeometry(ffi::Ffi::Bind()
                     .Arg<ffi::Buffer<ffi::F32>>()
                     .Arg<ffi::Buffer<ffi::F32>>()
                     .Arg<ffi::Buffer<ffi::F32>>()
                     .Ret<ffi::Buffer<ffi::F32>>()));
